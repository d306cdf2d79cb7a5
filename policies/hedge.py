"""`hedge`: full-information exponential weights, as in HedgeSpec / "Not-a-Bandit".

Every round measures every drafter's per-position acceptance on the verified
tokens, so every arm (drafter, k) gets a reward estimate from every round, not
only the arm that was played: arm_tokens[a] is the tokens arm a would have
emitted. Costs per round are estimated from what was played: verify seconds by
k (with a prior v(k) = v(0) * (1 + 0.06 k) for draft lengths not yet seen, as
measured for fp32 on CPU) and draft seconds per drafted token by drafter.

Weights: p_a proportional to exp(eta * N * mu_a), mu_a the estimated reward of a,
N the records folded, eta = sqrt(8 ln K / N) (anytime Hedge). Statistics are sums, so
delayed or out-of-order feedback is simply folded when it arrives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import BasePolicy, PolicyConfig, key
from policies.registry import register
from policies.types import aggregate

VERIFY_SLOPE = 0.06  # prior: each drafted token adds 6 % to a verify step (fp32, 2-core CPU)


@dataclass(frozen=True)
class HedgeConfig(PolicyConfig):
    floor: float = 0.01
    prior_rounds: float = 5.0  # pseudo-rounds of the cost prior for each k


@register("hedge")
class Hedge(BasePolicy):
    Config = HedgeConfig

    def estimates(self, stats) -> np.ndarray:
        """[K] estimated reward in [0, 1] of every arm."""
        tok = np.array([stats.get(key("tok", a), 0.0) for a in self.arms])
        rnd = np.array([stats.get(key("rnd", a), 0.0) for a in self.arms])
        cost = np.array([self._cost(stats, a) for a in self.arms])
        with np.errstate(divide="ignore", invalid="ignore"):
            thr = (tok / rnd) / cost
        mu = np.minimum(thr / self.cfg.scale, 1.0)
        known = (rnd > 0) & np.isfinite(mu)
        return np.where(known, mu, mu[known].max() if known.any() else 1.0)  # unmeasured: optimistic

    def _cost(self, stats, arm) -> float:
        ks = {a.k for a in self.arms}
        seen = {k: (stats.get(key("vs", k), 0.0), stats.get(key("vn", k), 0.0)) for k in ks}
        base = [s / n / (1 + VERIFY_SLOPE * k) for k, (s, n) in seen.items() if n > 0]
        if not base:
            return 1.0  # nothing played yet: every arm looks alike
        prior = float(np.mean(base)) * (1 + VERIFY_SLOPE * arm.k)
        s, n = seen[arm.k]
        verify = (s + self.cfg.prior_rounds * prior) / (n + self.cfg.prior_rounds)
        if arm.k == 0:
            return verify
        ds, dn = stats.get(key("ds", arm.drafter), 0.0), stats.get(key("dn", arm.drafter), 0.0)
        return verify + (ds / dn if dn else 0.0) * arm.k

    def select(self, context, stats, rng):
        n = stats.get("obs", 0.0)
        if n == 0:
            return self.with_floor(np.ones(len(self.arms)), rng)
        mu = self.estimates(stats)
        eta = np.sqrt(8 * np.log(len(self.arms)) / n)
        w = np.exp(eta * n * (mu - mu.max()))
        return self.with_floor(w, rng)

    def increments(self, record):
        if not record.arm_tokens:
            record = aggregate([record], self.arms)
        inc = {"obs": 1.0, key("vs", record.k): record.verify_s, key("vn", record.k): float(record.rounds)}
        if record.k:
            inc[key("ds", record.drafter)] = record.draft_s
            inc[key("dn", record.drafter)] = float(record.num_drafted)
        for arm, tokens in record.arm_tokens.items():
            inc[key("tok", arm)] = tokens
            inc[key("rnd", arm)] = float(record.rounds)
        return inc
