"""The OpenAI-compatible request layer of the coming endpoint: parse and validate a request body,
refuse what the engine cannot honour losslessly, and build OpenAI-style error bodies.

Pure functions, testable without Serve or HTTP. Every refusal is a `ProtocolError` with an HTTP
status (4xx) and the body `{"error": {"message", "type", "param", "code"}}` naming the problem.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from draftpick.controller.feedback import CONTEXT
from draftpick.workers.sampling import MAX_SEED, MIN_TEMPERATURE, SamplingParams

# parameters the engine cannot honour without changing what the target would produce, and when a
# value is harmless (the default): anything else gets a 400 naming the parameter, never silent neglect
UNSUPPORTED = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "logit_bias": lambda v: not v,
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v is None,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "min_tokens": lambda v: v in (None, 0),
}


class ProtocolError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class DraftpickOptions(BaseModel):
    """The optional `draftpick` object of a request: pin the arm, or name a configured policy or a context."""

    model_config = ConfigDict(extra="forbid")
    drafter: str | None = None
    num_speculative_tokens: int | None = Field(None, ge=0)
    policy: str | None = None
    context: str | None = Field(None, pattern=CONTEXT.pattern)  # what a feedback record's context may be


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are checked against UNSUPPORTED, others ignored
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; -1 and 0: no top-k cut
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)  # the tenant: the suffix drafter indexes each one's outputs apart
    draftpick: DraftpickOptions | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # "completion" or "chat"
    model: str
    input: dict  # {"prompt": str} | {"prompt_token_ids": [...]} | {"messages": [...]}
    params: SamplingParams
    stream: bool
    include_usage: bool
    options: DraftpickOptions
    user: str | None


def parse(body: bytes | str | dict, kind: str, model_name: str, drafters: list[str], max_k: int,
          max_tokens_limit: int, policies: list[str] | None = None) -> ParsedRequest:
    """Validate an OpenAI-style body for `kind` ("completion" or "chat") against the configuration."""
    data = _json(body)
    cls = CompletionRequest if kind == "completion" else ChatRequest
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _type_tag(p)) or None
        raise ProtocolError(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    for name, harmless in UNSUPPORTED.items():
        if name in (req.model_extra or {}) and not harmless(req.model_extra[name]):
            raise ProtocolError(f"`{name}` is not supported: draftpick serves the target's exact distribution "
                                f"and does not implement it", name)
    if req.model != model_name:
        raise ProtocolError(f"model {req.model!r} does not exist; this server serves {model_name!r}", "model",
                            status=404, code="model_not_found")
    options = req.draftpick or DraftpickOptions()
    _check_options(options, drafters, max_k, policies or [])
    return ParsedRequest(kind, req.model, _input(req, kind), _params(req, kind, max_tokens_limit), req.stream,
                         bool(req.stream_options and req.stream_options.include_usage), options, req.user)


def _type_tag(part) -> bool:
    """Whether a pydantic error location part names a union member's type ("str", "list[int]"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part or "-" in part)


def _json(body) -> dict:
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object")
    return body


def _input(req, kind: str) -> dict:
    if kind == "chat":
        return {"messages": [{"role": m.role, "content": m.content} for m in req.messages]}
    if isinstance(req.prompt, list):
        if not req.prompt:
            raise ProtocolError("prompt: an empty list of token ids", "prompt")
        return {"prompt_token_ids": list(req.prompt)}
    if not req.prompt:
        raise ProtocolError("prompt: an empty string", "prompt")
    return {"prompt": req.prompt}


def _params(req, kind: str, limit: int) -> SamplingParams:
    # completions default to 16 tokens (OpenAI's default); chat to the server's limit
    default = 16 if kind == "completion" else limit
    max_tokens = (getattr(req, "max_completion_tokens", None) if kind == "chat" else None) or req.max_tokens or default
    if max_tokens > limit:
        raise ProtocolError(f"max_tokens: {max_tokens} is over this server's limit of {limit}", "max_tokens")
    if not math.isfinite(req.temperature) or 0 < req.temperature < MIN_TEMPERATURE:
        raise ProtocolError(f"temperature: must be 0 (greedy) or at least {MIN_TEMPERATURE}", "temperature")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), seed=req.seed, stop=stop)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ProtocolError(str(e), param if param in ("stop", "seed", "top_p", "top_k") else None) from None


def _check_options(o: DraftpickOptions, drafters: list[str], max_k: int, policies: list[str]) -> None:
    if o.drafter is not None and o.drafter not in drafters:
        raise ProtocolError(f"draftpick.drafter: {o.drafter!r} is not configured ({', '.join(drafters)})",
                            "draftpick.drafter")
    if o.num_speculative_tokens is not None and o.num_speculative_tokens > max_k:
        raise ProtocolError(f"draftpick.num_speculative_tokens: at most {max_k} (engine.max_k)",
                            "draftpick.num_speculative_tokens")
    if o.policy is not None and o.policy not in policies:
        raise ProtocolError(f"draftpick.policy: {o.policy!r} is not a configured policy ({', '.join(policies)})",
                            "draftpick.policy")


def error_body(e: Exception) -> tuple[int, dict[str, Any]]:
    """(status, body) of any error raised while parsing: ProtocolError as it is, others a 400."""
    if isinstance(e, ProtocolError):
        return e.status, e.body()
    return 400, ProtocolError(str(e)).body()
