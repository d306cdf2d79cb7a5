"""The OpenAI-compatible HTTP ingress (FastAPI), a thin shim over an injected backend.

`make_app(backend)` serves `POST /v1/completions`, `POST /v1/chat/completions` (with `stream`:
server-sent events ending with `data: [DONE]`, and `stream_options.include_usage`), `GET /v1/models`,
`GET /health` and `GET /v1/draftpick/stats`. An optional API key (401 without it) and a bound on
admitted requests (429 with `Retry-After` beyond it) guard the routes. The backend turns a parsed
request into tokens: `EngineBackend` runs an in-process engine (and, given a `LocalLearning`, lets
the policy decide unpinned requests). The Ray Serve deployment (deploy.serve) serves the same routes. Bad input is a 4xx with an
OpenAI-style body (deploy.openai_protocol); the app stays up.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from draftpick.deploy.openai_protocol import ParsedRequest, ProtocolError, error_body, parse


class EngineBackend:
    """An in-process engine behind the ingress; requests run one at a time in a worker thread.
    learning: decides unpinned requests (`context`, `decide`, `chooser`, `status`), e.g.
    controller.local.LocalLearning; None serves every request with its pinned or default arm."""

    def __init__(self, cfg, engine, learning=None, max_tokens_limit: int = 1024, api_key: str | None = None,
                 max_queued: int | None = None):
        """api_key: required as `Authorization: Bearer KEY` (default: $DRAFTPICK_API_KEY; unset: open).
        max_queued: requests admitted at once (default: worker.max_concurrency); more get a 429."""
        self.cfg, self.engine, self.learning = cfg, engine, learning
        self.model_name = cfg.target.name
        self.max_tokens_limit = max_tokens_limit
        self.api_key = api_key if api_key is not None else os.environ.get("DRAFTPICK_API_KEY") or None
        self.max_queued = max_queued or cfg.worker.max_concurrency
        self.admitted = 0
        self.lock = asyncio.Lock()

    def encode(self, req: ParsedRequest) -> list[int]:
        from draftpick.workers.inputs import InputError, encode_input

        if "prompt_token_ids" in req.input:
            ids = req.input["prompt_token_ids"]
        else:
            try:
                ids = encode_input(self.engine.tokenizer, req.input)
            except InputError as e:
                raise ProtocolError(str(e), "messages" if req.kind == "chat" else "prompt") from None
        try:
            self.engine.check_prompt(ids, req.params)
        except ValueError as e:
            raise ProtocolError(str(e), "prompt" if req.kind == "completion" else "messages") from None
        return ids

    def start(self, req: ParsedRequest, ids: list[int]):
        """(generation, plan or None): the request's pinned arm, else the policy's decision."""
        o = req.options
        context = o.context or ""
        if o.drafter is not None or o.num_speculative_tokens is not None or self.learning is None:
            arm = self.cfg.pinned_arm(o.drafter, o.num_speculative_tokens)
            return self.engine.start(ids, req.params, arm, context=context), None
        item = {"prompt_token_ids": ids, "tag": context, **({"prompt": req.input["prompt"]} if "prompt" in req.input
                                                             else {"messages": req.input.get("messages", [])})}
        ctx = self.learning.context(item, ids, req.params.temperature)
        plan = self.learning.decide(ctx)
        g = self.engine.start(ids, req.params, plan.arm, context=context, features=ctx.features,
                              chooser=self.learning.chooser(plan, ctx))
        return g, plan

    async def steps(self, g):
        """The tokens of each step, as the engine appends them."""
        while not g.done:
            async with self.lock:
                tokens = await asyncio.to_thread(g.step)
            yield tokens


def new_app() -> FastAPI:
    """A FastAPI app whose ProtocolErrors become their OpenAI-style 4xx responses."""
    app = FastAPI(title="draftpick")

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request, exc: ProtocolError):
        status, body = error_body(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(body, status_code=status, headers=headers)

    return app


def authorize(backend, request: Request) -> None:
    if backend.api_key and request.headers.get("authorization") != f"Bearer {backend.api_key}":
        raise ProtocolError("a valid API key is required: `Authorization: Bearer KEY`", None, status=401,
                            code="invalid_api_key")


@asynccontextmanager
async def admitted(backend):
    """Admit a request, or refuse it with a 429 when max_queued are already admitted."""
    if backend.admitted >= backend.max_queued:
        raise ProtocolError(f"the server is at its bound of {backend.max_queued} requests; retry later", None,
                            status=429, type_="rate_limit_error", code="rate_limit_exceeded")
    backend.admitted += 1
    try:
        yield
    finally:
        backend.admitted -= 1


def stats(backend, request: Request) -> dict:
    """What `draftpick stats --json` prints, for the service's namespace."""
    authorize(backend, request)
    if backend.learning is None:
        raise ProtocolError("this server does not learn (no Redis)", None, status=404, code="not_learning")
    return backend.learning.stats()


def health(backend) -> dict:
    state = {"engine": "up"}
    if backend.learning is not None:
        state.update(backend.learning.status())
    return {"status": "ok", **state}


def models(backend) -> dict:
    return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "owned_by": "draftpick"}]}


async def handle(backend, request: Request, kind: str):
    """One completion or chat request: authorize, admit, parse, encode, decide, generate (or stream)."""
    authorize(backend, request)
    async with admitted(backend):
        return await _handle(backend, request, kind)


async def _handle(backend, request: Request, kind: str):
    req = parse(await request.body(), kind, backend.model_name, backend.cfg.drafter_names(),
                backend.cfg.engine.max_k, backend.max_tokens_limit, [backend.cfg.policy.name])
    ids = backend.encode(req)
    g, plan = backend.start(req, ids)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    if req.stream:  # admitted until the stream ends
        backend.admitted += 1
        return StreamingResponse(_release(backend, _stream(backend, g, plan, req, rid)), media_type="text/event-stream")
    async for _ in backend.steps(g):
        pass
    return _response(g.result(), plan, req, rid)


async def _release(backend, events):
    try:
        async for e in events:
            yield e
    finally:
        backend.admitted -= 1


def make_app(backend) -> FastAPI:
    """The ingress over one backend, without Serve (tests, embedding)."""
    app = new_app()
    app.get("/health")(lambda: health(backend))
    app.get("/v1/models")(lambda: models(backend))

    @app.get("/v1/draftpick/stats")
    def draftpick_stats(request: Request):
        return stats(backend, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(backend, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(backend, request, "chat")

    return app


def _choice(kind: str, text: str, finish: str | None, delta: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    key = "delta" if delta else "message"
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


def _usage(res) -> dict:
    return {"prompt_tokens": len(res.prompt_token_ids), "completion_tokens": len(res.token_ids),
            "total_tokens": len(res.prompt_token_ids) + len(res.token_ids)}


def _extras(res, plan) -> dict:
    out = {"metrics": {"speculative_decoding": res.to_json()["metrics"]["speculative_decoding"]}}
    if plan is not None:
        out["draftpick"] = {"arm": str(plan.arm), "policy": plan.policy, "context": plan.context,
                            "decision_s": plan.decided_s}
    return out


def _response(res, plan, req: ParsedRequest, rid: str) -> dict:
    obj = "chat.completion" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": [_choice(req.kind, res.text, res.finish_reason)], "usage": _usage(res), **_extras(res, plan)}


async def _stream(backend, g, plan, req: ParsedRequest, rid: str):
    """Server-sent events: a chunk per step with the new text, the final chunk with the finish
    reason, then (stream_options.include_usage) a usage chunk carrying the speculative metrics."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    sent = ""

    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                                      "choices": choices, **extra}) + "\n\n"

    async for _ in backend.steps(g):
        text = g.engine.tokenizer.decode(g.out, skip_special_tokens=True)
        if g.stop_at is not None:
            text = text[: g.stop_at]
        if len(text) > len(sent) and not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            yield chunk([_choice(req.kind, text[len(sent):], None, delta=True)])
            sent = text
    res = g.result()
    yield chunk([_choice(req.kind, res.text[len(sent):], res.finish_reason, delta=True)])
    if req.include_usage:
        yield chunk([], usage=_usage(res), **_extras(res, plan))
    yield "data: [DONE]\n\n"
