"""`none`: k = 0, plain decoding. Always available so that a policy can switch speculation off."""
from __future__ import annotations

import torch


class NoneDrafter:
    name = "none"
    is_model = False
    uses_target_features = False

    def session(self, tenant: str, prompt_len: int, features=None):
        return _NoneSession()

    def trace(self, prompt_ids, out, k_max, hidden=None, tenant=""):
        n = max(len(out) - 1, 0)
        return {"proposed": [0] * n, "matched": [0] * n}, 0.0


class _NoneSession:
    def propose(self, ids, k, sampler, threshold=None):
        return torch.empty(0, dtype=torch.long), None

    def sync(self, ids, start, p, sampler):
        return None

    def close(self, ids):
        pass
