"""`exp3`: exponential weights for adversarial (non-stochastic) rewards (Auer et al. 2002).

p_a = (1 - gamma) * w_a / sum(w) + gamma / K, w_a = exp(gamma / K * G_a), where G_a sums
importance-weighted rewards r / p of the times a was chosen. The record's propensity
must therefore be the probability this policy gave the arm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig, key, record_arm
from draftpick.policies.registry import register


@dataclass(frozen=True)
class EXP3Config(PolicyConfig):
    floor: float = 0.1  # gamma: the uniform share, which is also the exploration floor

    def __post_init__(self):
        super().__post_init__()
        if self.floor <= 0:
            raise ValueError("floor (gamma) must be > 0 for exp3")


@register("exp3")
class EXP3(BasePolicy):
    Config = EXP3Config

    def select(self, context, stats, rng):
        g = np.array([stats.get(key("G", a), 0.0) for a in self.arms])
        eta = self.cfg.floor / len(self.arms)
        w = np.exp(eta * (g - g.max()))
        return self.with_floor(w, rng)

    def increments(self, record):
        return {key("G", record_arm(record)): self.reward(record) / max(record.propensity, 1e-6)}
