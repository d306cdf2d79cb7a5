"""One target forward for many requests, each with its own tokens, position and KV cache.

The rows of all requests are flattened into one sequence through the linear layers (embedding,
projections, MLP, output layer: the weights are read once per step for every request in flight);
attention runs per request against its own cache (`DynamicCache`, as the single-request path
uses), as varlen attention does on a GPU. This is what makes concurrent requests cheap: on the
2-core CPU a forward over 16 rows costs a few single-row forwards (docs/results.md).

Supported: decoder stacks of the Llama kind (full attention, pre-norm, rotary positions: Llama,
SmolLM2, and Mistral / Qwen2 without a sliding window). `batchable(model)` says whether a model is;
for any other the caller runs one forward per request (`workers.models.forward`).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from transformers import DynamicCache

BATCHABLE_TYPES = {"llama", "mistral", "qwen2"}


def batchable(model) -> bool:
    """Whether `batched_forward` runs this model exactly as its own forward would."""
    cfg = model.config
    if cfg.model_type not in BATCHABLE_TYPES or getattr(cfg, "sliding_window", None):
        return False
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "layer_types", None) and any(
            t != "full_attention" for t in cfg.layer_types):
        return False
    return hasattr(model, "model") and hasattr(model.model, "rotary_emb")


@torch.inference_mode()
def batched_forward(model, caches: list[DynamicCache], tokens: list[list[int]], last_only: list[bool] | None = None,
                    hidden: bool = False, head=None):
    """Run each request's `tokens[i]` after what `caches[i]` holds, all in one forward.

    Returns per request float32 logits [len(tokens[i]) or 1 (last_only[i]), vocab] and, with
    `hidden`, its last hidden states [len(tokens[i]), d] (what the output layer reads), as a list of
    (logits, hidden). The caches grow by their request's rows, as with `models.forward`. head: the
    output layer to use instead of the model's (hidden rows [r, d] -> float32 logits [r, vocab]; a
    drafter with a reduced output vocabulary computes only those rows).
    """
    inner = model.model
    rope = sys.modules[type(inner.layers[0].self_attn).__module__].apply_rotary_pos_emb
    n = [len(t) for t in tokens]
    R = sum(n)
    starts = [c.get_seq_length() for c in caches]
    device = model.device
    ids = torch.tensor([[t for ts in tokens for t in ts]], device=device)  # [1, R]
    pos = torch.cat([torch.arange(s, s + m) for s, m in zip(starts, n)]).to(device)[None]  # [1, R]
    # [m, s + m] causal masks of the requests with more than one row (True: may attend)
    masks = [None if m == 1 else torch.ones(m, s + m, dtype=torch.bool, device=device).tril(s)
             for s, m in zip(starts, n)]
    h = inner.embed_tokens(ids)  # [1, R, d]
    cos, sin = inner.rotary_emb(h, position_ids=pos)  # [1, R, head_dim]
    for layer in inner.layers[: model.config.num_hidden_layers]:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (1, R, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [1, H, R, hd]
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, Hkv, R, hd]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        outs, off = [], 0
        for cache, m, mask in zip(caches, n, masks):
            rows = slice(off, off + m)
            keys, values = cache.update(k[:, :, rows], v[:, :, rows], attn.layer_idx)  # [1, Hkv, s + m, hd]
            outs.append(F.scaled_dot_product_attention(q[:, :, rows], keys, values, attn_mask=mask,
                                                       scale=attn.scaling, enable_gqa=True))  # [1, H, m, hd]
            off += m
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, R, -1)  # [1, R, H * hd]
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = inner.norm(h)[0]  # [R, d]
    last_only = last_only or [False] * len(tokens)
    ends = torch.tensor(n).cumsum(0).tolist()
    keep = [torch.arange(e - 1, e) if lo else torch.arange(e - m, e) for e, m, lo in zip(ends, n, last_only)]
    rows = h[torch.cat(keep)]
    logits = model.lm_head(rows).float() if head is None else head(rows)  # [rows kept, vocab]
    out, off = [], 0
    for e, m, idx in zip(ends, n, keep):
        lg = logits[off: off + len(idx)]
        off += len(idx)
        out.append((lg, h[e - m: e]) if hidden else (lg, None))
    return out
