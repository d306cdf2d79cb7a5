"""`epsilon-greedy`: the best mean reward so far, or (with probability epsilon) a uniform arm."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.registry import register
from draftpick.policies.types import Choice


@dataclass(frozen=True)
class EpsilonGreedyConfig(PolicyConfig):
    epsilon: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1], got {self.epsilon}")


@register("epsilon-greedy")
class EpsilonGreedy(BasePolicy):
    Config = EpsilonGreedyConfig

    def select(self, context, stats, rng):
        n, r = self.arm_stats(stats)
        means = np.where(n > 0, r / np.maximum(n, 1), np.inf)  # unplayed arms first
        probs = np.full(len(self.arms), self.cfg.epsilon / len(self.arms))
        probs[int(np.argmax(means))] += 1 - self.cfg.epsilon
        i = int(rng.choice(len(self.arms), p=probs))
        return Choice(self.arms[i], float(probs[i]))

    def increments(self, record):
        return self.mean_increments(record)
