"""The OpenAI-compatible HTTP ingress (FastAPI) in front of worker(s) hosting the engine.

`Ingress` does what happens once per request, before and after the worker: the API key (401), the
bound on admitted requests (429 with `Retry-After`), parsing and validation (deploy.openai_protocol:
4xx with an OpenAI-style body), tokenisation and the chat template, the prompt check, the pinned
arm or the prompt features the policy decides on, then the response (JSON, or server-sent events
ending with `data: [DONE]`) and the Prometheus metrics. The worker is a backend with an async
`stream(GenerateRequest)` of the events of workers.actor.EngineWorker.generate_stream:
`LocalBackend` runs an EngineWorker in this process (tests, embedding), deploy.serve's
`ServeBackend` calls the worker deployment through a Serve handle. A client that goes away cancels
its generation; the rounds it ran still feed back.

`make_app(ingress)` serves `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`, `GET /metrics` and `GET /v1/draftpick/stats`; the Serve deployment serves the same
app, its routes reading the replica's `Ingress` from `app.state.ingress`.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from draftpick.deploy.metrics import Metrics
from draftpick.deploy.openai_protocol import ParsedRequest, ProtocolError, error_body, parse
from draftpick.workers.actor import GenerateRequest

log = logging.getLogger(__name__)


class LocalBackend:
    """An EngineWorker in this process behind the ingress."""

    def __init__(self, worker):
        self.worker = worker

    async def limits(self) -> dict:
        return self.worker.limits()

    def stream(self, req: GenerateRequest):
        return self.worker.generate_stream(req)

    async def status(self) -> dict:
        return self.worker.status()

    async def stats(self) -> dict | None:
        return self.worker.stats()


class Ingress:
    def __init__(self, cfg, backend, tokenizer, api_key: str | None = None, max_admitted: int | None = None):
        """api_key: required as `Authorization: Bearer KEY` (default: serve.api_key of the configuration,
        else $DRAFTPICK_API_KEY; neither: open). max_admitted: requests admitted at once, streams until
        they end (default: the workers' max_concurrency plus serve.max_queued); more get a 429."""
        self.cfg, self.backend, self.tokenizer = cfg, backend, tokenizer
        self.model_name = cfg.target.name
        self.api_key = api_key if api_key is not None else cfg.serve.resolved_api_key()
        w = cfg.worker
        replicas = w.autoscaling.max_replicas if w.autoscaling else w.replicas
        self.max_admitted = max_admitted or w.max_concurrency * replicas + cfg.serve.max_queued
        self.admitted = 0
        self.draining = False  # shutting down: new requests get a 503, admitted ones run to their end
        self.metrics = Metrics()
        self._limits: dict | None = None

    # --- guards -------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ProtocolError("a valid API key is required: `Authorization: Bearer KEY`", None, status=401,
                                code="invalid_api_key")

    @asynccontextmanager
    async def admit(self):
        if self.draining:
            raise ProtocolError("the server is shutting down; retry on another", None, status=503,
                                type_="service_unavailable", code="shutting_down")
        if self.admitted >= self.max_admitted:
            raise _rate_limited(f"the server is at its bound of {self.max_admitted} requests; retry later")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    # --- routes -------------------------------------------------------------------------------
    async def health(self) -> dict:
        """200 while requests can be answered, also degraded (Redis or the controller down)."""
        try:
            state = await self.backend.status()
        except Exception as e:
            raise ProtocolError(f"the worker cannot answer: {type(e).__name__}", None, status=503,
                                type_="service_unavailable", code="worker_down") from None
        degraded = any(str(state.get(k, "up")).startswith("down") for k in ("redis", "controller"))
        status = "draining" if self.draining else "degraded" if degraded else "ok"
        return {"status": status, "ingress": {"admitted": self.admitted}, **state}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "draftpick"}]}

    async def stats(self, request: Request) -> dict:
        """What `draftpick stats --json` prints, for the service's namespace."""
        self.authorize(request)
        out = await self.backend.stats()
        if out is None:
            raise ProtocolError("this server does not learn (no Redis)", None, status=404, code="not_learning")
        return out

    async def prometheus(self, request: Request) -> str:
        self.authorize(request)
        try:
            self.metrics.observe_worker(await self.backend.status())
        except Exception:  # the ingress's own metrics are still worth scraping
            log.exception("draftpick: worker status for /metrics failed")
        return self.metrics.exposition()

    async def handle(self, request: Request, kind: str):
        """One completion or chat request: authorize, admit, parse, encode, generate (or stream)."""
        arrived = time.perf_counter()
        try:
            self.authorize(request)
            async with self.admit():
                return await self._handle(request, kind, arrived)
        except ProtocolError as e:
            self.metrics.errors.labels(str(e.status)).inc()
            raise

    # --- one request --------------------------------------------------------------------------
    async def _handle(self, request: Request, kind: str, arrived: float):
        if self._limits is None:
            self._limits = await self.backend.limits()
        cfg = self.cfg
        req = parse(await request.body(), kind, self.model_name, cfg.drafter_names(), cfg.engine.max_k,
                    cfg.serve.max_tokens, [cfg.policy.name])
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        events = self.backend.stream(self.generate_request(req, rid))
        first = await _first(events)  # an error before any token is still an HTTP status
        if req.stream:
            self.admitted += 1  # admitted until the stream ends
            return StreamingResponse(self._release(self._stream(first, events, req, rid, arrived)),
                                     media_type="text/event-stream")
        async with aclosing(events):
            last = first
            async for last in _timed(self.metrics, first, events, arrived):
                if await request.is_disconnected():  # in Serve the proxy cancels this handler instead
                    break
        if "result" not in last:
            return JSONResponse({}, status_code=499)
        return self._response(last, req, rid)

    def generate_request(self, req: ParsedRequest, rid: str) -> GenerateRequest:
        """Tokens (the chat template applied here, once), checked; the pinned arm, else the features
        the policy decides on."""
        from draftpick.workers.engine import check_prompt
        from draftpick.workers.inputs import InputError, encode_input

        param = "messages" if req.kind == "chat" else "prompt"
        try:
            ids = req.input.get("prompt_token_ids") or encode_input(self.tokenizer, req.input)
            check_prompt(ids, req.params.max_tokens, self._limits["vocab_size"], self._limits["context_window"])
        except (InputError, ValueError) as e:
            raise ProtocolError(str(e), param) from None
        o = req.options
        context, tenant = o.context or "", req.user or ""  # the suffix drafter's index is kept per tenant
        if o.drafter is not None or o.num_speculative_tokens is not None or not self._limits["learns"]:
            arm = self.cfg.pinned_arm(o.drafter, o.num_speculative_tokens)
            return GenerateRequest(ids, req.params, arm, tenant=tenant, context=context, request_id=rid)
        from draftpick.controller.local import request_context

        item = {"tag": context, **req.input}
        ctx = request_context(item, ids, req.params.temperature)
        return GenerateRequest(ids, req.params, None, tenant=tenant, context=context, request_id=rid,
                               features=ctx.features)

    async def _release(self, events):
        try:
            async for e in events:
                yield e
        finally:
            self.admitted -= 1

    def _response(self, last: dict, req: ParsedRequest, rid: str) -> dict:
        res = last["result"]
        self.metrics.observe_result(last)
        obj = "chat.completion" if req.kind == "chat" else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                "choices": [_choice(req.kind, res["text"], res["finish_reason"])], "usage": _usage(res),
                **_extras(last)}

    async def _stream(self, first: dict, events, req: ParsedRequest, rid: str, arrived: float):
        """Server-sent events: a chunk per step with the new text, the final chunk with the finish
        reason, then (stream_options.include_usage) a usage chunk carrying the speculative metrics."""
        obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        sent, detok, last = "", IncrementalDecoder(self.tokenizer), first

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                                          "choices": choices, **extra}) + "\n\n"

        async with aclosing(events):
            try:
                async for last in _timed(self.metrics, first, events, arrived):
                    if "token_ids" not in last:
                        break
                    text = detok.add(last["token_ids"], last["stop_at"])
                    if len(text) > len(sent):
                        yield chunk([_choice(req.kind, text[len(sent):], None, delta=True)])
                        sent = text
            except Exception as e:  # the status line is sent: the error goes in the stream
                log.exception("draftpick: a stream failed")
                yield "data: " + json.dumps({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                                       "param": None, "code": None}}) + "\n\n"
                return
        res = last["result"]
        self.metrics.observe_result(last)
        yield chunk([_choice(req.kind, res["text"][len(sent):], res["finish_reason"], delta=True)])
        if req.include_usage:
            yield chunk([], usage=_usage(res), **_extras(last))
        yield "data: [DONE]\n\n"


class IncrementalDecoder:
    """The text of a growing output without decoding all of it on every chunk (vLLM's way): only the
    tokens since the last emitted text, after a few before them for context, are decoded, and what
    those context tokens decode to is cut off. A partial UTF-8 character is held back until complete."""

    def __init__(self, tokenizer):
        self.tokenizer, self.out, self.text = tokenizer, [], ""
        self.prefix = self.read = 0  # out[prefix:read] decodes to the end of self.text

    def add(self, tokens: list[int], stop_at: int | None = None) -> str:
        """The text so far (cut at stop_at, an index in the whole text, once a stop string ended it)."""
        self.out += tokens
        if stop_at is not None:  # the last chunk: the whole text, once
            self.text = self.tokenizer.decode(self.out, skip_special_tokens=True)[:stop_at]
            return self.text
        before = self.tokenizer.decode(self.out[self.prefix: self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.out[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = max(self.read - 4, 0), len(self.out)
        return self.text


async def _first(events) -> dict:
    """The first event of a worker stream; the worker's refusals become 4xx."""
    try:
        return await events.__anext__()
    except Exception as e:
        await events.aclose()
        raise _as_protocol_error(e) from None


def _rate_limited(message: str) -> ProtocolError:
    """A 429 (sent with Retry-After): the ingress's bound, or the workers' queues, are full."""
    return ProtocolError(message, None, status=429, type_="rate_limit_error", code="rate_limit_exceeded")


def _as_protocol_error(e: Exception) -> Exception:
    if type(e).__name__ == "BackPressureError":  # ray.serve.exceptions: the worker's queue is full
        return _rate_limited("the workers' queues are full; retry later")
    if isinstance(e, ValueError):  # the worker refused the request (Ray wraps it as its cause's type)
        return ProtocolError(str(getattr(e, "cause", None) or e).strip().splitlines()[-1])
    return e


async def _timed(metrics: Metrics, first: dict, events, arrived: float):
    """The events, first included, timing the first token and each later step's tokens."""
    last_at = None
    event = first
    while True:
        n = len(event.get("token_ids", ()))
        if n:
            now = time.perf_counter()
            if last_at is None:
                metrics.ttft.observe(now - arrived)
            else:
                for _ in range(n):
                    metrics.itl.observe((now - last_at) / n)
            last_at = now
        yield event
        try:
            event = await events.__anext__()
        except StopAsyncIteration:
            return


def new_app() -> FastAPI:
    """The ingress app: routes read the `Ingress` from `app.state.ingress`; ProtocolErrors become their
    OpenAI-style 4xx responses, anything else a 500 with the same body shape."""
    app = FastAPI(title="draftpick")

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request, exc: ProtocolError):
        status, body = error_body(exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("draftpick: internal error")
        body = {"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error", "param": None,
                          "code": None}}
        return JSONResponse(body, status_code=500)

    def ingress(request: Request) -> Ingress:
        return request.app.state.ingress

    @app.get("/health")
    async def health(request: Request):
        return await ingress(request).health()

    @app.get("/v1/models")
    async def models(request: Request):
        return ingress(request).models()

    @app.get("/metrics")
    async def metrics(request: Request):
        return PlainTextResponse(await ingress(request).prometheus(request),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/draftpick/stats")
    async def draftpick_stats(request: Request):
        return await ingress(request).stats(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ingress(request).handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await ingress(request).handle(request, "chat")

    return app


def make_app(ingress: Ingress) -> FastAPI:
    """The ingress over one backend, without Serve (tests, embedding)."""
    app = new_app()
    app.state.ingress = ingress
    return app


def local_app(cfg, worker, **kw) -> FastAPI:
    """The app over an in-process EngineWorker."""
    return make_app(Ingress(cfg, LocalBackend(worker), worker.engine.tokenizer, **kw))


def _choice(kind: str, text: str, finish: str | None, delta: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    key = "delta" if delta else "message"
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


def _usage(res: dict) -> dict:
    prompt, completion = len(res["prompt_token_ids"]), len(res["token_ids"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extras(last: dict) -> dict:
    out = {"metrics": {"speculative_decoding": last["result"]["metrics"]["speculative_decoding"]}}
    if last.get("plan") is not None:
        out["draftpick"] = last["plan"]
    return out
