"""Per-round cost estimates for full-information policies (hedge, contextual).

Full-information feedback gives every arm's tokens per round, but only played arms show their
cost. A played arm's seconds per round are measured directly (they depend on the drafter as well
as on k: an n-gram drafter that finds no match verifies a single token); the estimate for an arm
shrinks toward a model: verify seconds per k pooled over drafters, with a prior
v(k) = v(0) * (1 + VERIFY_SLOPE * k) for draft lengths not yet played, plus the drafter's
seconds per drafted token times k. Statistics: cs|arm, cn|arm (seconds, rounds of a played
arm), vs|k, vn|k (verify seconds, rounds), ds|drafter, dn|drafter (draft seconds, tokens).
"""
from __future__ import annotations

import numpy as np

from draftpick.policies.base import key, record_arm
from draftpick.policies.types import Arm, RoundRecord

VERIFY_SLOPE = 0.06  # prior: each drafted token adds 6 % to a verify step (measured data replaces it)


def cost_increments(record: RoundRecord, tag: str = "") -> dict[str, float]:
    """With a tag, the played arm's seconds, rounds and emitted tokens are also counted under it
    (cs|tag|arm, cn|tag|arm, ct|tag|arm)."""
    arm = record_arm(record)
    seconds, rounds = record.verify_s + record.draft_s, float(record.rounds)
    inc = {key("vs", record.k): record.verify_s, key("vn", record.k): rounds,
           key("cs", arm): seconds, key("cn", arm): rounds}
    if tag:
        inc[key("cs", tag, arm)] = seconds
        inc[key("cn", tag, arm)] = rounds
        inc[key("ct", tag, arm)] = float(record.emitted)
    if record.k:
        inc[key("ds", record.drafter)] = record.draft_s
        inc[key("dn", record.drafter)] = float(record.num_drafted)
    return inc


def round_costs(stats, arms: list[Arm], prior_rounds: float = 5.0, tag: str = "") -> np.ndarray:
    """[K] estimated seconds per round of each arm (all 1.0 before anything was observed).
    With a tag, the arm's seconds measured under that tag come first, shrunk toward the rest."""
    ks = {a.k for a in arms}
    seen = {k: (stats.get(key("vs", k), 0.0), stats.get(key("vn", k), 0.0)) for k in ks}
    base = [s / n / (1 + VERIFY_SLOPE * k) for k, (s, n) in seen.items() if n > 0]
    if not base:
        return np.ones(len(arms))
    v0 = float(np.mean(base))
    out = []
    for arm in arms:
        s, n = seen[arm.k]
        verify = (s + prior_rounds * v0 * (1 + VERIFY_SLOPE * arm.k)) / (n + prior_rounds)
        ds, dn = stats.get(key("ds", arm.drafter), 0.0), stats.get(key("dn", arm.drafter), 0.0)
        model = verify + (ds / dn * arm.k if arm.k and dn else 0.0)
        cs, cn = stats.get(key("cs", arm), 0.0), stats.get(key("cn", arm), 0.0)
        est = (cs + prior_rounds * model) / (cn + prior_rounds)
        if tag:
            cs, cn = stats.get(key("cs", tag, arm), 0.0), stats.get(key("cn", tag, arm), 0.0)
            est = (cs + prior_rounds * est) / (cn + prior_rounds)
        out.append(est)
    return np.array(out)
