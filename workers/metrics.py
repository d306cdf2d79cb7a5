"""Per-request speculative decoding metrics, with vLLM's names and convention (the one place they are computed).

Conventions:
- `num_spec_steps` counts every decoding round (each target forward after the prefill), including
  k = 0 rounds and rounds where the drafter proposed nothing. The prefill yields the first token
  and is not a step.
- `num_accepted_draft_tokens` counts accepted drafts that were emitted: a round cut short by EOS,
  a stop string or max_tokens counts only the drafts before the cut.
- `mean_acceptance_length` = 1 + accepted / num_spec_steps (tokens per round, counting the bonus or
  recovered token; 1.0 for plain decoding; None when there was no round).
- `draft_acceptance_rate` = accepted / drafted tokens (None when nothing was drafted).
- `acceptance_histogram[i]` = rounds that accepted exactly i drafts;
  `num_accepted_tokens_per_pos[i]` = rounds whose draft position i was accepted.
Summed over many requests' records, the same function gives the pooled figures (benches, distill).
"""
from __future__ import annotations

from draftpick.policies.types import RoundRecord


def spec_decode_metrics(records: list[RoundRecord]) -> dict:
    """The metrics above, plus the seconds spent drafting, verifying and syncing drafters."""
    steps = len(records)
    drafted = sum(r.num_drafted for r in records)
    accepted = sum(r.accepted for r in records)
    max_k = max((r.num_drafted for r in records), default=0)
    hist = [0] * (max_k + 1)
    per_pos = [0] * max_k
    for r in records:
        hist[r.accepted] += 1
        for i in range(r.accepted):
            per_pos[i] += 1
    return {
        "num_spec_steps": steps,
        "num_drafts": sum(1 for r in records if r.num_drafted),
        "num_draft_tokens": drafted,
        "num_accepted_draft_tokens": accepted,
        "mean_acceptance_length": (1 + accepted / steps) if steps else None,
        "draft_acceptance_rate": (accepted / drafted) if drafted else None,
        "acceptance_histogram": hist,
        "num_accepted_tokens_per_pos": per_pos,
        "draft_s": sum(r.draft_s for r in records),
        "verify_s": sum(r.verify_s for r in records),
        "sync_s": sum(r.sync_s for r in records),
    }


def per_position_acceptance(records: list[RoundRecord]) -> list[float]:
    """Acceptance rate at each draft position among the rounds whose position the target judged
    (a position after the first rejection is not judged)."""
    judged: list[int] = []
    hits: list[int] = []
    for r in records:
        for i in range(min(r.accepted + 1, r.num_drafted)):
            if i == len(judged):
                judged.append(0)
                hits.append(0)
            judged[i] += 1
            hits[i] += i < r.accepted
    return [h / j for h, j in zip(hits, judged)]
