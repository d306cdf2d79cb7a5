"""`confidence`: draft up to the longest k, stopping token by token when the drafter's top-1
probability falls below a threshold (SpecDec++ / transformers' `assistant_confidence_threshold`);
the threshold itself is chosen by UCB1 among `thresholds`. Only model drafters have a
confidence; model-free drafters ignore the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig, key, pick_drafter
from draftpick.policies.estimators import ucb_index
from draftpick.policies.registry import register
from draftpick.policies.types import Choice


@dataclass(frozen=True)
class ConfidenceConfig(PolicyConfig):
    drafter: str = ""
    thresholds: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    c: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.thresholds or not all(0 <= t < 1 for t in self.thresholds):
            raise ValueError("thresholds must be a non-empty list of numbers in [0, 1)")


@register("confidence")
class ConfidenceThreshold(BasePolicy):
    Config = ConfidenceConfig

    def __init__(self, arms, **config):
        if "thresholds" in config:
            config["thresholds"] = tuple(config["thresholds"])
        super().__init__(arms, **config)
        self.drafter = pick_drafter(self.arms, self.cfg.drafter)
        self.arm = max((a for a in self.arms if a.drafter == self.drafter), key=lambda a: a.k)

    def select(self, context, stats, rng):
        n = np.array([stats.get(key("n", "thr", t), 0.0) for t in self.cfg.thresholds])
        r = np.array([stats.get(key("r", "thr", t), 0.0) for t in self.cfg.thresholds])
        t = self.cfg.thresholds[int(np.argmax(ucb_index(n, r, self.cfg.c)))]
        return Choice(self.arm, 1.0, threshold=t)

    def increments(self, record):
        if record.threshold is None:
            return {}
        return {key("n", "thr", record.threshold): 1.0, key("r", "thr", record.threshold): self.reward(record)}
