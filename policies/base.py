"""The policy protocol, and a small base class the built-ins share.

A policy is a pair of functions over *sufficient statistics* (a flat dict of
numbers, str -> float, kept by the controller in Redis):

    select(context, stats, rng) -> Choice       reads statistics, returns an arm and its propensity
    increments(record) -> {statistic: delta}    pure: how one round record (or an aggregate of a
                                                request's rounds) changes the statistics

Because `increments` is pure and its deltas are added, the controller can fold
any policy's statistics atomically (HINCRBYFLOAT in one transaction) and
exactly once, and many replicas can share one learned state. Randomness comes
only from the injected `rng`. A randomised policy reports the probability it
had of choosing the arm (its propensity) and keeps an exploration floor, so
that logged choices allow off-policy evaluation.

`level` says when the policy is asked: "request" (once per request) or
"round" (before every round; `context.last` holds the previous round).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from draftpick.policies.reward import KINDS, reward
from draftpick.policies.types import Arm, Choice, Context, RoundRecord

Stats = Mapping[str, float]


@runtime_checkable
class Policy(Protocol):
    name: str
    level: str
    arms: list[Arm]

    def select(self, context: Context, stats: Stats, rng: np.random.Generator) -> Choice: ...

    def increments(self, record: RoundRecord) -> dict[str, float]: ...


@dataclass(frozen=True)
class PolicyConfig:
    """Options every built-in accepts. Subclasses add theirs; unknown options are refused."""

    reward: str = "throughput"  # see policies.reward
    scale: float = 100.0  # tokens/s worth a reward of 1.0 (throughput reward)
    floor: float = 0.0  # probability of a uniform choice mixed in (randomised policies set > 0)

    def __post_init__(self):
        if self.reward not in KINDS:
            raise ValueError(f"reward must be one of {KINDS}, got {self.reward!r}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")


def key(*parts) -> str:
    """Statistic names: parts joined by '|', e.g. key('n', arm) -> 'n|ngram:3'. Empty parts are left
    out, so an optional prefix or tag can be passed as "" (key("", "n", arm) == key("n", arm))."""
    return "|".join([p if type(p) is str else str(p) for p in parts if p != ""])


class BasePolicy:
    name = "base"
    level = "request"
    Config = PolicyConfig

    def __init__(self, arms: list[Arm], **config):
        if not arms:
            raise ValueError("a policy needs at least one arm")
        self.arms = sorted(set(arms))
        names = {f.name for f in fields(self.Config)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        self.cfg = self.Config(**config)
        self.max_k = max(a.k for a in self.arms)

    # -- helpers shared by the built-ins --
    def reward(self, record: RoundRecord) -> float:
        return reward(record, self.cfg.reward, self.cfg.scale, self.max_k)

    def arm_stats(self, stats: Stats, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(observations [K], summed reward [K]) per arm, under an optional key prefix."""
        n = np.array([stats.get(key(prefix, "n", a), 0.0) for a in self.arms])
        r = np.array([stats.get(key(prefix, "r", a), 0.0) for a in self.arms])
        return n, r

    def mean_increments(self, record: RoundRecord, prefix: str = "") -> dict[str, float]:
        arm = record_arm(record)
        return {key(prefix, "n", arm): 1.0, key(prefix, "r", arm): self.reward(record)}

    def with_floor(self, probs: np.ndarray, rng: np.random.Generator) -> Choice:
        """Mix in the exploration floor, draw an arm, report its propensity."""
        K = len(self.arms)
        probs = (1 - self.cfg.floor) * probs / probs.sum() + self.cfg.floor / K
        i = int(rng.choice(K, p=probs))
        return Choice(self.arms[i], float(probs[i]))

    def __repr__(self):
        return f"{self.name}({len(self.arms)} arms)"


def record_arm(record: RoundRecord) -> Arm:
    return Arm(record.drafter, record.k) if record.k else Arm("none", 0)


def pick_drafter(arms: list[Arm], name: str) -> str:
    """The drafter a one-drafter policy controls: `name`, or the first drafter among the arms."""
    drafters = [a.drafter for a in arms if a.k]
    if not drafters:
        raise ValueError("needs an arm with k > 0")
    name = name or drafters[0]
    if name not in drafters:
        raise ValueError(f"drafter {name!r} is not among the arms")
    return name
