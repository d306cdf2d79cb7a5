"""`thompson`: Thompson sampling with Beta posteriors on [0, 1] rewards (fractional successes).

The propensity of the chosen arm is estimated from `draws` extra posterior samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.registry import register


@dataclass(frozen=True)
class ThompsonConfig(PolicyConfig):
    floor: float = 0.01
    draws: int = 256  # posterior samples used to estimate the propensity


@register("thompson")
class Thompson(BasePolicy):
    Config = ThompsonConfig

    def select(self, context, stats, rng):
        n, r = self.arm_stats(stats)
        samples = rng.beta(1 + r, 1 + np.maximum(n - r, 0), size=(self.cfg.draws, len(self.arms)))  # [draws, K]
        wins = np.bincount(samples.argmax(1), minlength=len(self.arms)).astype(float)  # [K]
        return self.with_floor(wins, rng)

    def increments(self, record):
        return self.mean_increments(record)
