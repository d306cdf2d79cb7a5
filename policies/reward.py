"""Rewards: what a round (or a request's rounds) was worth, in [0, 1].

- "throughput" (default): tokens emitted per second of drafting + verifying, divided by
  `scale` (tokens/s that count as 1.0) and clipped. A free n-gram drafter with modest
  acceptance can beat an accurate but costly one; k = 0 is worth its plain-decoding speed.
- "acceptance": tokens per round divided by (max_k + 1). It ignores cost, so it prefers long
  drafts and never learns to switch speculation off; offered for comparison with the
  acceptance-driven heuristics of other servers.
"""
from __future__ import annotations

from draftpick.policies.types import RoundRecord

KINDS = ("throughput", "acceptance")


def tokens_per_second(rec: RoundRecord) -> float:
    return rec.emitted / max(rec.draft_s + rec.verify_s, 1e-9)


def reward(rec: RoundRecord, kind: str = "throughput", scale: float = 100.0, max_k: int = 8) -> float:
    if kind == "throughput":
        return min(tokens_per_second(rec) / scale, 1.0)
    if kind == "acceptance":
        return min(rec.emitted / rec.rounds / (max_k + 1), 1.0)
    raise ValueError(f"reward must be one of {KINDS}, got {kind!r}")
