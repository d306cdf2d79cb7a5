"""The trace format: what `draftpick record` writes and `draftpick replay` reads (one module owns it).

One JSON object per line, one request each (documented in docs/formats.md):
  version, id, domain, tag, features, prompt_tokens, max_tokens, num_tokens, finish_reason, k_max,
  prefill_s, plain_generate_s, verify_s [k_max + 1], draft_s_per_token {drafter: s},
  drafters {name: {"proposed": [n - 1], "matched": [n - 1], "full_information": bool,
                   optional "confidence" [n] (model drafters), "draft_confidence" [n - 1][<= k_max] (feature)}},
  optional batch_verify_s {B: [k_max + 1]} (a request's share of a batched forward, see workers.record),
  optional batch_draft_s {drafter: {B: s}} (seconds per drafted token, B requests drafting together)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from draftpick.workers.inputs import iter_jsonl

TRACE_VERSION = 1
REQUIRED = ("num_tokens", "max_tokens", "k_max", "prefill_s", "verify_s", "draft_s_per_token", "drafters")
FIELDS = ("id", "domain", "tag", "features", "prompt_tokens", "finish_reason", "plain_generate_s") + REQUIRED


class TraceError(ValueError):
    pass


def trace_line(**fields) -> dict:
    """A trace line from its fields (all of FIELDS, nothing else)."""
    missing, unknown = set(FIELDS) - set(fields), set(fields) - set(FIELDS)
    if missing or unknown:
        raise TraceError(f"trace line: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {"version": TRACE_VERSION, **fields}


@dataclass
class TraceRequest:
    data: dict

    @property
    def n(self) -> int:
        return self.data["num_tokens"]


def load_trace(path: str | Path) -> list[TraceRequest]:
    reqs = []
    for i, d in iter_jsonl(path, "trace", TraceError):
        missing = set(REQUIRED) - set(d)
        if missing:
            raise TraceError(f"{path}:{i}: trace line lacks {', '.join(sorted(missing))}")
        if d.get("version", TRACE_VERSION) != TRACE_VERSION:
            raise TraceError(f"{path}:{i}: trace version {d.get('version')!r}, this version reads {TRACE_VERSION}")
        reqs.append(TraceRequest(d))
    if not reqs:
        raise TraceError(f"{path}: empty trace")
    return reqs
