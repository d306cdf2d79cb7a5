"""Estimators shared by several policies: UCB indices, and per-position acceptance from
full-information reach / hit counts (censoring-aware, see policies.types.position_counts).
Cost estimates per round live in policies.costs."""
from __future__ import annotations

import numpy as np

from draftpick.policies.base import key
from draftpick.policies.types import Arm, aggregate, tokens_per_round


def ucb_index(n: np.ndarray, r: np.ndarray, c: float) -> np.ndarray:
    """n, r: [K] observations and summed rewards -> [K] upper confidence bounds (inf if unplayed)."""
    total = max(n.sum(), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        idx = r / n + c * np.sqrt(2 * np.log(total) / n)
    return np.where(n > 0, idx, np.inf)


def position_increments(record, prefix: str = "") -> dict[str, float]:
    """reach|[prefix|]drafter|j and hit|... deltas from a record's full-information feedback."""
    if not record.reach:
        record = aggregate([record])
    inc = {}
    for name, reach in record.reach.items():
        for j, (r, h) in enumerate(zip(reach, record.hits[name])):
            if r:
                inc[key("reach", prefix, name, j)] = r
                inc[key("hit", prefix, name, j)] = h
    if record.counterfactual_tokens:
        for name, rounds in record.counterfactual.items():
            inc[key("cftok", prefix, name)] = record.counterfactual_tokens
            for k, n in enumerate(rounds, start=1):
                inc[key("cfround", prefix, name, k)] = n
    return inc


def arm_tokens_per_round(stats, arms: list[Arm], prefix: str = "") -> np.ndarray:
    """[K] estimated tokens per round of each arm (k = 0: 1 token): exact where the arm's own rounds
    were re-run along the outputs (counterfactual tokens / rounds, deterministic drafters), else from
    the reach/hit statistics of the rounds that were played."""
    out = []
    for a in arms:
        cf_rounds = stats.get(key("cfround", prefix, a.drafter, a.k), 0.0) if a.k else 0.0
        if cf_rounds > 0:
            out.append(stats.get(key("cftok", prefix, a.drafter), 0.0) / cf_rounds)
            continue
        reach = [stats.get(key("reach", prefix, a.drafter, j), 0.0) for j in range(a.k)]
        hits = [stats.get(key("hit", prefix, a.drafter, j), 0.0) for j in range(a.k)]
        out.append(tokens_per_round(reach, hits, a.k))
    return np.array(out)
