"""`ngram`: prompt lookup decoding (vLLM's `ngram`, transformers' `prompt_lookup_num_tokens`).

Find the most recent earlier occurrence of the sequence's last n tokens
(n from max_ngram down to min_ngram) and propose the k tokens that followed it.
Model-free and nearly free; strong when the output copies from the prompt.
"""
from __future__ import annotations

import numpy as np

from draftpick.workers.drafters.base import LookupDrafter, LookupSession


def prompt_lookup(ids: np.ndarray, k: int, min_ngram: int, max_ngram: int) -> list[int]:
    """ids: [L] int64. Returns up to k tokens that followed the latest earlier match of a suffix.

    The longest suffix of n <= max_ngram tokens (down to min_ngram) that occurs earlier, ending
    before the last token; its latest occurrence. Found from the earlier positions holding the
    last token, extended backwards one token at a time (a few array operations whatever max_ngram,
    where sliding windows of every n cost several times more per round)."""
    L = len(ids)
    if k <= 0 or L < 2:
        return []
    ends = np.flatnonzero(ids[: L - 1] == ids[L - 1])  # where an earlier match of the last token ends
    matched = np.ones(len(ends), dtype=np.int64)  # how many suffix tokens match there, up to max_ngram
    alive = ends
    for j in range(1, min(max_ngram, L - 1)):
        alive = alive[alive >= j]
        alive = alive[ids[alive - j] == ids[L - 1 - j]]
        if not len(alive):
            break
        matched[np.searchsorted(ends, alive)] += 1
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        hits = ends[matched >= n]
        if len(hits):
            start = int(hits[-1]) + 1
            return ids[start : start + k].tolist()
    return []


class NgramDrafter(LookupDrafter):
    def __init__(self, name: str = "ngram", min_ngram: int = 1, max_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"ngram drafter {name!r}: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.name, self.min_ngram, self.max_ngram = name, min_ngram, max_ngram

    @classmethod
    def from_config(cls, cfg, ctx) -> "NgramDrafter":
        return cls(cfg.name, cfg.min_ngram, cfg.max_ngram)

    def session(self, tenant: str, prompt_len: int, features=None):
        return _NgramSession(self)


class _NgramSession(LookupSession):
    def __init__(self, drafter: NgramDrafter):
        self.d = drafter

    def lookup(self, ids, k):
        return prompt_lookup(np.asarray(ids, dtype=np.int64), k, self.d.min_ngram, self.d.max_ngram)
