"""The Redis-friendly form of a policy's statistics: a hash of field -> decimal string.

`repr(float)` is the shortest string that reads back to the same double, so
encode -> decode is exact. (Redis' HINCRBYFLOAT adds in long double and prints
17 significant digits, which also reads back exactly as a double.)
"""
from __future__ import annotations

from typing import Mapping


def encode(stats: Mapping[str, float]) -> dict[str, str]:
    return {k: repr(float(v)) for k, v in stats.items()}


def decode(fields: Mapping[str | bytes, str | bytes]) -> dict[str, float]:
    out = {}
    for k, v in fields.items():
        k = k.decode() if isinstance(k, bytes) else k
        out[k] = float(v.decode() if isinstance(v, bytes) else v)
    return out


def add(stats: dict[str, float], increments: Mapping[str, float]) -> None:
    """Fold a policy's increments into a plain dict of statistics (what HINCRBYFLOAT does in Redis)."""
    for k, v in increments.items():
        stats[k] = stats.get(k, 0.0) + v
