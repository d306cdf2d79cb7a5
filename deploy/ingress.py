"""The OpenAI-compatible HTTP ingress (FastAPI), a thin shim over an injected backend.

`make_app(backend)` serves `POST /v1/completions`, `POST /v1/chat/completions` (with `stream`:
server-sent events ending with `data: [DONE]`, and `stream_options.include_usage`), `GET /v1/models`
and `GET /health`. The backend turns a parsed request into tokens; `EngineBackend` runs an
in-process engine (and, given a `LocalLearning`, lets the policy decide unpinned requests). The
Ray Serve deployment of the coming `build_app` wraps this same app. Bad input is a 4xx with an
OpenAI-style body (deploy.openai_protocol); the app stays up.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from draftpick.deploy.openai_protocol import ParsedRequest, ProtocolError, error_body, parse


class EngineBackend:
    """An in-process engine behind the ingress; requests run one at a time in a worker thread.
    learning: decides unpinned requests (`context`, `decide`, `chooser`, `status`), e.g.
    controller.local.LocalLearning; None serves every request with its pinned or default arm."""

    def __init__(self, cfg, engine, learning=None, max_tokens_limit: int = 1024):
        self.cfg, self.engine, self.learning = cfg, engine, learning
        self.model_name = cfg.target.name
        self.max_tokens_limit = max_tokens_limit
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
        return JSONResponse(body, status_code=status)

    return app


def health(backend) -> dict:
    state = {"engine": "up"}
    if backend.learning is not None:
        state.update(backend.learning.status())
    return {"status": "ok", **state}


def models(backend) -> dict:
    return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "owned_by": "draftpick"}]}


async def handle(backend, request: Request, kind: str):
    """One completion or chat request: parse, encode, decide, generate (or stream)."""
    req = parse(await request.body(), kind, backend.model_name, backend.cfg.drafter_names(),
                backend.cfg.engine.max_k, backend.max_tokens_limit, [backend.cfg.policy.name])
    ids = backend.encode(req)
    g, plan = backend.start(req, ids)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    if req.stream:
        return StreamingResponse(_stream(backend, g, plan, req, rid), media_type="text/event-stream")
    async for _ in backend.steps(g):
        pass
    return _response(g.result(), plan, req, rid)


def make_app(backend) -> FastAPI:
    """The ingress over one backend, without Serve (tests, embedding)."""
    app = new_app()
    app.get("/health")(lambda: health(backend))
    app.get("/v1/models")(lambda: models(backend))

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
