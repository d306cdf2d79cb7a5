"""Prompt prefix caching: the target's keys and values (and last hidden states) of prompt prefixes
seen before, so that a request whose prompt starts like an earlier one's (a chat template's system
prompt, a shared instruction, the same document) prefills only the rest.

Prompts are cut into blocks of BLOCK tokens. A block is stored under its whole prefix (every token
from the prompt's start to the block's end) and its tenant, so a hit means the same tokens at the
same positions: the keys and values a prefill of this prompt would compute there. A tenant never
reuses another's prefixes (as the suffix drafter never drafts from another's outputs): a shared
cache would tell one, by its time to first token, what another's prompts begin with.

A request takes the longest run of stored blocks from its start, leaving at least its last token
to prefill (the first output token needs that row's logits), and prefills the rest after them, as
a chunked prefill runs its later chunks. The reused rows were computed in another request's
forward, whose row count may have taken another product for the linear layers
(workers.models.small_batch_linears): the same dot products summed in another order, as a chunk of
a chunked prefill is. Beyond the configured number of blocks, the least recently used go, the
later blocks of a prefix before its first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from draftpick.workers.models import GrowingLayer

BLOCK = 8  # tokens a block holds (the SmolLM2 chat template's system prompt is 24 tokens)


class PrefixCache:
    """Up to `blocks` blocks of one target's prompt prefixes (about 0.37 MB a block for SmolLM2-135M in fp32)."""

    def __init__(self, blocks: int, block: int = BLOCK):
        if blocks < 1 or block < 1:
            raise ValueError(f"a prefix cache needs blocks >= 1 and block >= 1 (got {blocks}, {block})")
        self.blocks, self.block = blocks, block
        # (tenant, whole prefix) -> the block's keys and values [layers, kv heads, block, head dim], and its
        # last hidden states [block, d] (None when stored without them)
        self._store: OrderedDict[tuple[str, tuple[int, ...]],
                                 tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()  # (an engine may be stepped from more than one thread)
        self.lookups = 0  # requests that looked
        self.queried_tokens = 0  # their prompt tokens
        self.reused_tokens = 0  # those they did not prefill

    @staticmethod
    def fits(cache) -> bool:
        """Whether a cache's layers are all full attention (a sliding window or a convolution state is not
        made of per-position keys and values alone)."""
        return bool(cache.layers) and all(isinstance(layer, GrowingLayer) for layer in cache.layers)

    def seed(self, ids: list[int], cache, features=None, tenant: str = "") -> int:
        """Writes the longest prefix of `ids` the tenant stored into an empty `cache` (and its last hidden
        states into `features`, a TargetFeatures, when given); returns how many tokens it holds (0: none)."""
        if not self.fits(cache) or cache.get_seq_length():
            return 0
        found, end = [], self.block
        with self._lock:
            self.lookups += 1
            self.queried_tokens += len(ids)
            used = []
            while end < len(ids):  # the last token is always prefilled
                key = (tenant, tuple(ids[:end]))
                entry = self._store.get(key)
                if entry is None or (features is not None and entry[2] is None):
                    break
                used.append(key)
                found.append(entry)
                end += self.block
            self._touch(used)
            self.reused_tokens += len(found) * self.block
        if not found:
            return 0
        with torch.inference_mode():  # as a forward writes the cache
            keys = torch.cat([k for k, _, _ in found], dim=-2)  # [layers, kv heads, tokens, head dim]
            values = torch.cat([v for _, v, _ in found], dim=-2)
            for i, layer in enumerate(cache.layers):
                layer.update(keys[i][None], values[i][None])
        if features is not None:  # (outside inference mode, as the engine appends the others)
            features.append(torch.cat([h for _, _, h in found]))
        return len(found) * self.block

    @torch.inference_mode()
    def store(self, ids: list[int], cache, features=None, tenant: str = "") -> None:
        """After a prompt's prefill (`cache` holds exactly `ids`): keeps its whole blocks not stored yet."""
        if not self.fits(cache) or cache.get_seq_length() != len(ids):
            return
        rows = features.rows if features is not None else None
        with self._lock:
            keys = [(tenant, tuple(ids[:end])) for end in range(self.block, len(ids) + 1, self.block)]
            new = [len(key[1]) for key in keys if key not in self._store]  # the ends of the blocks to store
            if new:  # every layer's positions from the first new block on, in one tensor each (not a copy a layer)
                first = new[0] - self.block
                stacked = [torch.stack([getattr(layer, name)[0, :, first:new[-1]] for layer in cache.layers])
                           for name in ("keys", "values")]  # [layers, kv heads, positions, head dim]
                for end in new:
                    span = slice(end - self.block - first, end - first)
                    self._store[(tenant, tuple(ids[:end]))] = (
                        stacked[0][:, :, span].clone(), stacked[1][:, :, span].clone(),
                        None if rows is None else rows[end - self.block: end].clone())
            self._touch(keys)
            while len(self._store) > self.blocks:
                self._store.popitem(last=False)

    def _touch(self, keys: list) -> None:
        """Marks a prompt's blocks used, its first the most recently: a block is only reached through
        the ones before it, so the later blocks of a prefix go first when the cache is full."""
        for key in reversed(keys):
            self._store.move_to_end(key)

    def status(self) -> dict:
        return {"blocks": len(self), "lookups": self.lookups, "queried_tokens": self.queried_tokens,
                "reused_tokens": self.reused_tokens}

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)
