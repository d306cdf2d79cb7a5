"""`draft-length`: a bandit (UCB1) over k for one drafter, with k = 0 always among its arms."""
from __future__ import annotations

from dataclasses import dataclass

from draftpick.policies.base import pick_drafter
from draftpick.policies.registry import register
from draftpick.policies.types import Arm
from draftpick.policies.ucb1 import UCB1, UCB1Config


@dataclass(frozen=True)
class DraftLengthConfig(UCB1Config):
    drafter: str = ""  # empty = the first drafter among the arms


@register("draft-length")
class DraftLength(UCB1):
    Config = DraftLengthConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.drafter = pick_drafter(self.arms, self.cfg.drafter)
        self.arms = [a for a in self.arms if a.drafter == self.drafter] + [Arm("none", 0)]
