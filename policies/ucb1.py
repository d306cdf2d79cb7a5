"""`ucb1`: optimism in the face of uncertainty (Auer et al. 2002).

Index of arm a: mean_a + c * sqrt(2 ln N / n_a), rewards in [0, 1]; unplayed arms first.
Deterministic, so its propensity is 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.estimators import ucb_index
from draftpick.policies.registry import register
from draftpick.policies.types import Choice


@dataclass(frozen=True)
class UCB1Config(PolicyConfig):
    c: float = 1.0  # exploration weight (1 = the textbook bound)


@register("ucb1")
class UCB1(BasePolicy):
    Config = UCB1Config

    def select(self, context, stats, rng):
        n, r = self.arm_stats(stats)
        return Choice(self.arms[int(np.argmax(ucb_index(n, r, self.cfg.c)))], 1.0)

    def increments(self, record):
        return self.mean_increments(record)
