"""A complete third-party draftpick policy: play the arm with the best mean throughput so far.

Load it by dotted path in configuration (`policy: greedy_mean:GreedyMean`, with this folder on
PYTHONPATH) or register it under the entry-point group `draftpick.policies` in your package:

    [project.entry-points."draftpick.policies"]
    greedy-mean = "greedy_mean:GreedyMean"
"""
from __future__ import annotations

import numpy as np

from draftpick.policies import Arm, Choice, Context, RoundRecord


class GreedyMean:
    name = "greedy-mean"
    level = "request"  # asked once per request ("round": before every round)

    def __init__(self, arms: list[Arm], scale: float = 100.0):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.arms = list(arms)
        self.scale = scale

    def select(self, context: Context, stats, rng: np.random.Generator) -> Choice:
        # statistics are a flat dict of numbers: read them, never write them
        means = []
        for arm in self.arms:
            n = stats.get(f"n|{arm}", 0.0)
            means.append(stats.get(f"r|{arm}", 0.0) / n if n else np.inf)  # try every arm once
        return Choice(self.arms[int(np.argmax(means))], propensity=1.0)  # deterministic

    def increments(self, record: RoundRecord) -> dict[str, float]:
        # pure: how this feedback changes the statistics; the controller adds the deltas atomically
        arm = Arm(record.drafter, record.k) if record.k else Arm("none", 0)
        tokens_per_s = record.emitted / max(record.draft_s + record.verify_s, 1e-9)
        return {f"n|{arm}": 1.0, f"r|{arm}": min(tokens_per_s / self.scale, 1.0)}
