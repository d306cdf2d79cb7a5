"""Seeded synthetic environments with known optima, for the policy tests."""
from __future__ import annotations

import numpy as np

from draftpick.policies.types import Arm, Context, RoundRecord

SLOPE = 0.06  # verify cost grows 6 % per drafted token (the cost prior hedge assumes)


def arms_of(n: int) -> list[Arm]:
    return [Arm(f"d{i:02d}", 1) for i in range(n)]


def run(policy, means, T: int, seed: int = 0, noise: float = 0.1, contexts=None, full_info: bool = False):
    """Play T steps. means(t, ctx) -> {arm: mean reward in [0, 1]}. Returns (chosen arms, regret per step, choices).

    A step is one observation: reward r for arm (drafter, k) is encoded as a round of
    verify_s = 1 + 0.06 k seconds that emitted r * verify_s tokens (so tokens/s = r with scale 1),
    and, for the policies that read per-position acceptance (hedge, contextual), as acceptance r
    at the arm's one draft position (tokens per round 1 + r: the same order of arms). The chosen
    arm's acceptance is always recorded, as the engine does; full_info adds every other arm's.
    """
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(seed + 1)
    stats: dict[str, float] = {}
    chosen, regret = [], []
    for t in range(T):
        ctx = contexts(t, rng) if contexts else Context(time=float(t))
        mu = means(t, ctx)
        choice = policy.select(ctx, stats, prng)
        draws = {a: float(np.clip(m + noise * rng.standard_normal(), 0, 1)) for a, m in mu.items()}
        a = choice.arm
        cost = 1 + SLOPE * a.k
        rec = RoundRecord(
            drafter=a.drafter, k=a.k, num_drafted=a.k, accepted=0, emitted=draws[a] * cost, draft_s=0.0,
            verify_s=cost, propensity=choice.propensity, context=ctx.tag, features=list(ctx.features), time=float(t),
            per_drafter={b.drafter: [draws[b]] for b in mu if full_info or b == a},
        )
        for key, delta in policy.increments(rec).items():
            stats[key] = stats.get(key, 0.0) + delta
        chosen.append(a)
        regret.append(max(mu.values()) - mu[a])
    return chosen, np.array(regret)


def ucb1_bound(means: list[float], T: int) -> float:
    """Auer et al. (2002), Theorem 1: sum over suboptimal arms of 8 ln T / gap + (1 + pi^2 / 3) gap."""
    best = max(means)
    gaps = [best - m for m in means if m < best]
    return sum(8 * np.log(T) / g + (1 + np.pi**2 / 3) * g for g in gaps)
