"""`fixed`: always the same arm (the configured one, or the only arm given)."""
from __future__ import annotations

from dataclasses import dataclass

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.registry import register
from draftpick.policies.types import Arm, Choice


@dataclass(frozen=True)
class FixedConfig(PolicyConfig):
    arm: str = ""  # "drafter:k"; empty = the first arm


@register("fixed")
class Fixed(BasePolicy):
    Config = FixedConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.arm = Arm.parse(self.cfg.arm) if self.cfg.arm else self.arms[0]
        if self.arm not in self.arms:
            raise ValueError(f"arm {self.arm} is not among the arms ({', '.join(map(str, self.arms))})")

    def select(self, context, stats, rng):
        return Choice(self.arm, 1.0)

    def increments(self, record):
        return self.mean_increments(record)  # kept so that its arm's value is visible
