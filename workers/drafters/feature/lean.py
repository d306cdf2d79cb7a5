"""A feature head's decoder layer run without transformers' model machinery, for drafting.

Drafting runs the head one token at a time, where the layer's arithmetic is small
(SmolLM2: ~4 M weights) and transformers' per-call work dominates: building the
causal mask, the cache bookkeeping, output objects, rotary tables. `LeanHead` runs
the same Llama decoder layer on the head's own weights (the same tensors, not a
copy) with a plain key/value buffer, several times faster per draft step
(`draftpick bench engine` shows the draft share). It is used for Llama-family heads only (the target families whose
layer it reproduces); other heads run through transformers. Training
(`training.distill`) always uses the transformers module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEAN_LAYERS = ("LlamaDecoderLayer",)  # decoder layers LeanHead reproduces exactly (up to rounding)


class LeanCache:
    """Keys and values of the head's one layer: [kv_heads, capacity, head_dim] buffers that double
    when full. Offers the two calls `workers.models.rollback` uses (DynamicCache's semantics)."""

    def __init__(self):
        self.k = self.v = None
        self.n = 0

    def get_seq_length(self) -> int:
        return self.n

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (<= 0, as transformers' caches take it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to drop, got {tokens_to_remove}")
        self.n = max(self.n + tokens_to_remove, 0)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [kv_heads, T, head_dim] -> every cached key and value, these included."""
        need = self.n + k.shape[1]
        if self.k is None or need > self.k.shape[1]:
            cap = max(need, 2 * self.n, 64)
            grown_k = k.new_empty((k.shape[0], cap, k.shape[2]))
            grown_v = v.new_empty((v.shape[0], cap, v.shape[2]))
            if self.n:
                grown_k[:, : self.n] = self.k[:, : self.n]
                grown_v[:, : self.n] = self.v[:, : self.n]
            self.k, self.v = grown_k, grown_v
        self.k[:, self.n : need] = k
        self.v[:, self.n : need] = v
        self.n = need
        return self.k[:, :need], self.v[:, :need]


def supports_lean(head) -> bool:
    return type(head.body.layers[0]).__name__ in LEAN_LAYERS and len(head.body.layers) == 1


class LeanHead:
    """head.fc -> the Llama decoder layer -> final norm, as `FeatureHead.forward` computes it, on
    unbatched inputs [T, d]. Reads the weights of `head` (convert the head's dtype first)."""

    def __init__(self, head):
        if not supports_lean(head):
            raise ValueError(f"LeanHead reproduces {', '.join(LEAN_LAYERS)} only")
        layer, body = head.body.layers[0], head.body
        attn, mlp = layer.self_attn, layer.mlp
        self.fc = head.fc
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = mlp.act_fn
        self.norms = (layer.input_layernorm, layer.post_attention_layernorm, body.norm)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.rotary = body.rotary_emb
        self._cos = self._sin = None  # rotary tables [positions, head_dim]

    def _tables(self, upto: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < upto or self._cos.dtype != like.dtype:
            n = max(upto, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            pos = torch.arange(n, device=like.device)[None]
            cos, sin = self.rotary(like[None], pos)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos, self._sin

    @staticmethod
    def _norm(norm, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def __call__(self, feats: torch.Tensor, tok_emb: torch.Tensor, cache: LeanCache) -> torch.Tensor:
        """feats, tok_emb: [T, d] after what `cache` holds -> predicted features [T, d]."""
        return self.step_rows(feats, tok_emb, [cache], [feats.shape[0]])

    @torch.inference_mode()
    def step_rows(self, feats: torch.Tensor, tok_emb: torch.Tensor, caches: list[LeanCache],
                  counts: list[int] | None = None) -> torch.Tensor:
        """Several requests at once: rows of feats, tok_emb [N, d], counts[b] of them (1 each by
        default: a draft step) in turn for request b, after what caches[b] holds. The weights are
        read once for all rows; attention runs per request against its own cache (causal among its
        new rows). Returns the predicted features [N, d] (what one call per request gives, up to the
        rounding of an N-row matmul)."""
        counts = counts or [1] * len(caches)
        x = self.fc(torch.cat([tok_emb, feats], -1))  # [N, d]
        N = x.shape[0]
        pos = torch.cat([torch.arange(c.n, c.n + t, device=x.device) for c, t in zip(caches, counts)])
        cos, sin = self._tables(int(pos.max()) + 1, x)
        cos, sin = cos[pos][:, None], sin[pos][:, None]  # [N, 1, head_dim]
        h = self._norm(self.norms[0], x)
        q = self._rotate(self.q(h).view(N, -1, self.head_dim), cos, sin).transpose(0, 1)  # [heads, N, hd]
        k = self._rotate(self.k(h).view(N, -1, self.head_dim), cos, sin).transpose(0, 1)  # [kv_heads, N, hd]
        v = self.v(h).view(N, -1, self.head_dim).transpose(0, 1)
        out, start = [], 0
        for cache, T in zip(caches, counts):
            rows = slice(start, start + T)
            past = cache.n
            keys, values = cache.append(k[:, rows], v[:, rows])
            if T == 1:  # a draft step: plain matmuls beat the fused kernel's set-up for one query
                qg = q[:, rows].reshape(keys.shape[0], -1, self.head_dim)  # [kv_heads, group, hd]: heads sharing a key
                w = (qg @ keys.transpose(1, 2) * self.scaling).float().softmax(-1).to(values.dtype)
                a = (w @ values).reshape(-1, 1, self.head_dim)  # [heads, 1, hd]
            else:  # causal among the new positions; every cached one is visible
                mask = (torch.arange(past + T, device=x.device)[None]
                        <= torch.arange(past, past + T, device=x.device)[:, None])
                a = F.scaled_dot_product_attention(q[None, :, rows], keys[None], values[None], attn_mask=mask,
                                                   scale=self.scaling, enable_gqa=True)[0]  # [heads, T, hd]
            out.append(a.transpose(0, 1).reshape(T, -1))
            start += T
        x = x + self.o(torch.cat(out))
        h = self._norm(self.norms[1], x)
        x = x + self.down(self.act(self.gate(h)) * self.up(h))
        return self._norm(self.norms[2], x)
