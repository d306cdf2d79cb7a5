"""`hf-heuristic`: transformers' assisted-generation schedule, the baseline every policy must beat.

Per round: k + 2 after a round whose drafts were all accepted, else max(1, k - 1)
(`num_assistant_tokens_schedule="heuristic"`), starting from `initial_k`, with one drafter.
It learns nothing across requests.
"""
from __future__ import annotations

from dataclasses import dataclass

from draftpick.policies.base import BasePolicy, PolicyConfig, pick_drafter
from draftpick.policies.registry import register
from draftpick.policies.types import Arm, Choice


@dataclass(frozen=True)
class HFHeuristicConfig(PolicyConfig):
    drafter: str = ""  # empty = the first drafter among the arms
    initial_k: int = 5  # transformers' assistant starts from num_assistant_tokens


@register("hf-heuristic")
class HFHeuristic(BasePolicy):
    level = "round"
    Config = HFHeuristicConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.drafter = pick_drafter(self.arms, self.cfg.drafter)
        self.max_k = max(a.k for a in self.arms if a.drafter == self.drafter)

    def select(self, context, stats, rng):
        last = context.last
        if last is None or last.drafter != self.drafter:
            k = self.cfg.initial_k
        elif last.num_drafted == last.k and last.accepted == last.k:
            k = last.k + 2
        else:
            k = max(1, last.k - 1)
        return Choice(Arm(self.drafter, min(k, self.max_k)), 1.0)

    def increments(self, record):
        return {}
