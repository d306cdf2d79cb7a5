"""`sw-ucb`: sliding-window UCB for drifting traffic (Garivier & Moulines 2011).

Statistics are kept per time bucket (`bucket` seconds wide, from the record's
time), so they remain plain additive counters; `select` reads only the last
`window` buckets. Old buckets can simply expire in Redis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.registry import register
from draftpick.policies.types import Choice
from draftpick.policies.estimators import ucb_index


@dataclass(frozen=True)
class SWUCBConfig(PolicyConfig):
    c: float = 1.0
    bucket: float = 1.0  # seconds per bucket (virtual seconds in replay)
    window: int = 50  # buckets that count

    def __post_init__(self):
        super().__post_init__()
        if self.bucket <= 0 or self.window < 1:
            raise ValueError("bucket must be > 0 and window >= 1")


@register("sw-ucb")
class SlidingWindowUCB(BasePolicy):
    Config = SWUCBConfig

    def select(self, context, stats, rng):
        now = math.floor(context.time / self.cfg.bucket)
        n = np.zeros(len(self.arms))
        r = np.zeros(len(self.arms))
        for b in range(now - self.cfg.window + 1, now + 1):
            bn, br = self.arm_stats(stats, prefix=f"w{b}")
            n += bn
            r += br
        return Choice(self.arms[int(np.argmax(ucb_index(n, r, self.cfg.c)))], 1.0)

    def increments(self, record):
        b = math.floor(record.time / self.cfg.bucket)
        return self.mean_increments(record, prefix=f"w{b}")
