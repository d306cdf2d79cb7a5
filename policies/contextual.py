"""`contextual`: LinUCB (Li et al. 2010), one linear model per arm over the request's context.

Context vector x = the request's cheap prompt features (policies.features: bias, length,
repetition, code punctuation, newlines, temperature, load) followed by a one-hot of its
explicit tag (hashed into `tag_buckets`), so that each tag also gets statistics of its own.
Statistics per arm: A = sum x x^T (upper triangle) and b = sum r x; the score is
theta^T x + alpha * sqrt(x^T A^-1 x) with theta = A^-1 b, A regularised by `ridge`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from policies.base import BasePolicy, PolicyConfig, key, record_arm
from policies.features import NAMES
from policies.registry import register
from policies.types import Choice


@dataclass(frozen=True)
class ContextualConfig(PolicyConfig):
    alpha: float = 0.3  # exploration bonus weight
    ridge: float = 1.0
    tag_buckets: int = 8


@register("contextual")
class Contextual(BasePolicy):
    Config = ContextualConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.d = len(NAMES) + self.cfg.tag_buckets
        self.iu = np.triu_indices(self.d)

    def vector(self, features, tag: str) -> np.ndarray:
        x = np.zeros(self.d)
        f = np.asarray(features, dtype=float)[: len(NAMES)] if len(features) else np.array([1.0])
        x[: len(f)] = f
        if tag:
            x[len(NAMES) + zlib.crc32(tag.encode()) % self.cfg.tag_buckets] = 1.0
        return x

    def select(self, context, stats, rng):
        x = self.vector(context.features, context.tag)  # [d]
        K, d = len(self.arms), self.d
        A = np.zeros((K, d, d))
        b = np.zeros((K, d))
        for i, arm in enumerate(self.arms):
            upper = np.array([stats.get(key("A", arm, p, q), 0.0) for p, q in zip(*self.iu)])
            A[i][self.iu] = upper
            b[i] = [stats.get(key("b", arm, p), 0.0) for p in range(d)]
        A = A + np.triu(A, 1).transpose(0, 2, 1) + self.cfg.ridge * np.eye(d)  # symmetric [K, d, d]
        sol = np.linalg.solve(A, np.concatenate([b[..., None], np.broadcast_to(x, (K, d))[..., None]], -1))
        theta, Ainv_x = sol[..., 0], sol[..., 1]  # [K, d] each
        score = theta @ x + self.cfg.alpha * np.sqrt(np.maximum(Ainv_x @ x, 0))
        return Choice(self.arms[int(np.argmax(score))], 1.0)

    def increments(self, record):
        x = self.vector(record.features, record.context)
        arm = record_arm(record)
        r = self.reward(record)
        inc = {}
        nz = np.flatnonzero(x)
        for p in nz:
            inc[key("b", arm, p)] = r * x[p]
            for q in nz[nz >= p]:
                inc[key("A", arm, p, q)] = x[p] * x[q]
        return inc
