"""`hedge`: full-information exponential weights, as in HedgeSpec / "Not-a-Bandit".

Every round measures every drafter's per-position acceptance on the verified
tokens, so every arm (drafter, k) gets a reward estimate from every round, not
only the arm that was played: each drafter's acceptance at each draft position is
estimated from its reach/hit counts (censoring-aware, see
policies.types.position_counts), which gives every k's tokens per round. Costs
per round are estimated from what was played (policies.costs).

Weights: p_a proportional to exp(eta * N * mu_a), mu_a the estimated reward of a,
N the records folded, eta = sqrt(8 ln K / N) (anytime Hedge). Statistics are sums, so
delayed or out-of-order feedback is simply folded when it arrives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig
from draftpick.policies.costs import cost_increments, round_costs
from draftpick.policies.registry import register
from draftpick.policies.estimators import arm_tokens_per_round, position_increments


@dataclass(frozen=True)
class HedgeConfig(PolicyConfig):
    floor: float = 0.01
    prior_rounds: float = 5.0  # pseudo-rounds of the cost prior for each k


@register("hedge")
class Hedge(BasePolicy):
    Config = HedgeConfig

    def estimates(self, stats, load: int | None = None, drafting: dict[str, int] | None = None) -> np.ndarray:
        """[K] estimated reward in [0, 1] of every arm (its costs at that load and with those other
        requests drafting, see policies.costs)."""
        tpr = arm_tokens_per_round(stats, self.arms)
        cost = round_costs(stats, self.arms, self.cfg.prior_rounds, load=load, drafting=drafting)
        return np.minimum(tpr / cost / self.cfg.scale, 1.0)

    def select(self, context, stats, rng):
        n = stats.get("obs", 0.0)
        if n == 0:
            return self.with_floor(np.ones(len(self.arms)), rng)
        mu = self.estimates(stats, context.load, context.drafting)
        eta = np.sqrt(8 * np.log(len(self.arms)) / n)
        w = np.exp(eta * n * (mu - mu.max()))
        return self.with_floor(w, rng)

    def increments(self, record):
        return {"obs": 1.0, **cost_increments(record), **position_increments(record)}
