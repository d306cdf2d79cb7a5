"""`none`: k = 0, plain decoding. Always available so that a policy can switch speculation off."""
from __future__ import annotations

import torch


class NoneDrafter:
    name = "none"
    is_model = False

    def session(self, tenant: str, prompt_len: int):
        return _NoneSession()


class _NoneSession:
    def propose(self, ids, k, params, generator, threshold=None):
        return torch.empty(0, dtype=torch.long), None

    def sync(self, ids, start, p, params):
        return None

    def close(self, ids):
        pass
