"""`suffix`: drafts from earlier outputs, like SuffixDecoding (Oliaro et al. 2024), per tenant.

Every finished request's output is indexed under its tenant: a hash table maps
each n-gram (n = min_ngram..max_ngram) to its latest occurrence. To draft, the
longest suffix of the current sequence found in the tenant's index (or in the
request's own output so far) is followed for k tokens. A tenant only ever
drafts from its own outputs, so nothing leaks between tenants. The index is
bounded: when a tenant holds more than `max_tokens_per_tenant` tokens, its
oldest outputs are dropped.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from draftpick.workers.drafters.base import LookupDrafter, LookupSession
from draftpick.workers.drafters.ngram import prompt_lookup


class SuffixIndex:
    """Outputs of one tenant, with an n-gram -> latest (sequence, end position) table."""

    def __init__(self, min_ngram: int, max_ngram: int, max_tokens: int):
        self.min_ngram, self.max_ngram, self.max_tokens = min_ngram, max_ngram, max_tokens
        self.seqs: OrderedDict[int, list[int]] = OrderedDict()
        self.table: dict[tuple[int, ...], tuple[int, int]] = {}
        self.num_tokens = 0
        self._next_id = 0

    def add(self, tokens: list[int]) -> None:
        if not tokens:
            return
        sid, self._next_id = self._next_id, self._next_id + 1
        self.seqs[sid] = list(tokens)
        self.num_tokens += len(tokens)
        self._index(sid, self.seqs[sid])
        if self.num_tokens > self.max_tokens:
            while self.seqs and self.num_tokens > 0.9 * self.max_tokens:
                _, old = self.seqs.popitem(last=False)
                self.num_tokens -= len(old)
            self.table = {}
            for s, toks in self.seqs.items():
                self._index(s, toks)

    def _index(self, sid: int, toks: list[int]) -> None:
        for n in range(self.min_ngram, self.max_ngram + 1):
            for end in range(n, len(toks)):  # an n-gram with at least one token after it
                self.table[tuple(toks[end - n : end])] = (sid, end)

    def lookup(self, ids: list[int], k: int) -> tuple[int, list[int]]:
        """Returns (matched n-gram length, up to k continuation tokens); (0, []) if no match."""
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            hit = self.table.get(tuple(ids[len(ids) - n :]))
            if hit is not None:
                sid, end = hit
                return n, self.seqs[sid][end : end + k]
        return 0, []


class SuffixDrafter(LookupDrafter):
    def __init__(self, name: str = "suffix", min_ngram: int = 2, max_ngram: int = 8, max_tokens_per_tenant: int = 200_000):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"suffix drafter {name!r}: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_tokens_per_tenant < 1:
            raise ValueError(f"suffix drafter {name!r}: max_tokens_per_tenant must be >= 1")
        self.name, self.min_ngram, self.max_ngram = name, min_ngram, max_ngram
        self.max_tokens_per_tenant = max_tokens_per_tenant
        self._indexes: dict[str, SuffixIndex] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, ctx) -> "SuffixDrafter":
        return cls(cfg.name, cfg.min_ngram, cfg.max_ngram, cfg.max_tokens_per_tenant)

    def index(self, tenant: str) -> SuffixIndex:
        with self._lock:
            if tenant not in self._indexes:
                self._indexes[tenant] = SuffixIndex(self.min_ngram, self.max_ngram, self.max_tokens_per_tenant)
            return self._indexes[tenant]

    def session(self, tenant: str, prompt_len: int, features=None):
        return _SuffixSession(self, tenant, prompt_len)


class _SuffixSession(LookupSession):
    def __init__(self, drafter: SuffixDrafter, tenant: str, prompt_len: int):
        self.d, self.tenant, self.prompt_len = drafter, tenant, prompt_len

    def lookup(self, ids, k):
        with self.d._lock:
            idx = self.d._indexes.get(self.tenant)
            n, draft = idx.lookup(ids, k) if idx is not None else (0, [])
        # the request's own output so far can also repeat itself
        own = np.asarray(ids[self.prompt_len :], dtype=np.int64)
        if len(own) > n:
            own_draft = prompt_lookup(own, k, max(self.d.min_ngram, n + 1), self.d.max_ngram)
            if own_draft:
                return own_draft
        return draft

    def close(self, ids):
        index = self.d.index(self.tenant)
        with self.d._lock:
            index.add(ids[self.prompt_len :])
