"""One target forward for many requests, each with its own tokens, position and KV cache.

The rows of all requests are flattened into one sequence through the linear layers (embedding,
projections, MLP, output layer: the weights are read once per step for every request in flight);
each request attends to its own cache, as varlen attention does on a GPU: the requests of few rows
whose caches are in the model's KVPool (workers.models) in one masked product over the pool
(`_PooledRows`), the others (a prefill, a cache of its own) one by one. This is what makes
concurrent requests cheap: on the 2-core CPU a forward over 16 rows costs a few single-row
forwards (docs/results.md).

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


class ForwardCost:
    """How a batched forward's seconds grow with its requests and rows, fitted online, and each
    request's share of them: the marginal cost of a row, not the average.

    A forward over R rows for n requests costs about a + c n + b R: `a` reads the weights once for all
    of them, `c` is each request's own work (its attention reads its own cache, its rows are gathered
    and scattered), `b` is each row's own compute. Sharing the seconds by rows (the average) charges a
    request's drafted row a / R + b, and what a row costs then depends on how many rows the other
    requests ran: in a batch where the others draft, every row looks cheap. Here a request pays
    a / n + c + b r_i (its rows r_i), scaled so that the shares still sum to the forward's seconds:
    what its own choice of draft length adds is b a row, whatever the others do, and plain decoding
    pays the same a / n + c + b in any mix.

    (a, c, b) is a least-squares fit over the recent batched forwards without a prefill (exponentially
    weighted, `decay` a forward). A line in rows alone (c = 0) would charge a row what a request costs:
    the rows of plain forwards grow with their requests, so its slope takes each request's own work
    too. On this CPU that line gave 2.1 ms a row at 16 requests where a drafted row adds 0.9-1.3 ms,
    and drafting looked twice its price (docs/results.md). So c is fitted where the rows varied apart
    from the requests (a spread of `min_spread` rows beyond what the requests explain); until then, and
    where that fit is not usable (a negative part), the line in rows alone; and without a usable line
    (b < 0, or a < 0: more than the average a row), the share is by rows."""

    def __init__(self, decay: float = 0.995, min_weight: float = 20.0, min_spread: float = 1.0):
        self.decay, self.min_weight, self.min_spread = decay, min_weight, min_spread
        self.w = self.n = self.r = self.t = self.nn = self.nr = self.rr = self.nt = self.rt = 0.0

    def observe(self, rows: int, seconds: float, requests: int = 1) -> None:
        """One forward without a prefill: `rows` rows of `requests` requests, `seconds` long."""
        d, n = self.decay, requests
        self.w, self.n, self.r, self.t = d * self.w + 1, d * self.n + n, d * self.r + rows, d * self.t + seconds
        self.nn, self.nr, self.rr = d * self.nn + n * n, d * self.nr + n * rows, d * self.rr + rows * rows
        self.nt, self.rt = d * self.nt + n * seconds, d * self.rt + rows * seconds

    def line(self) -> tuple[float, float, float] | None:
        """(a, c, b): seconds of a forward = a + c requests + b rows (c = 0: the line in rows alone), or
        None while no fit is usable."""
        if self.w < self.min_weight:
            return None
        w = self.w
        mn, mr, mt = self.n / w, self.r / w, self.t / w
        vn, vr = self.nn / w - mn * mn, self.rr / w - mr * mr
        cnr, cnt, crt = self.nr / w - mn * mr, self.nt / w - mn * mt, self.rt / w - mr * mt
        if vn > 1e-9 and vr - cnr * cnr / vn >= self.min_spread:  # rows varied apart from the requests
            det = vn * vr - cnr * cnr
            c, b = (vr * cnt - cnr * crt) / det, (vn * crt - cnr * cnt) / det
            a = mt - c * mn - b * mr
            if a >= 0 and b >= 0 and c >= 0:
                return a, c, b
        if vr < self.min_spread:
            return None
        b = crt / vr
        a = mt - b * mr
        return (a, 0.0, b) if b >= 0 and a >= 0 else None

    def shares(self, rows: list[int], seconds: float) -> list[float]:
        """Each request's seconds of a forward that ran rows[i] rows for request i."""
        total = sum(rows)
        fit = self.line()
        cost = [fit[0] / len(rows) + fit[1] + fit[2] * r for r in rows] if fit else []
        if not cost or sum(cost) <= 0:  # no usable line (or forwards timed at 0): by rows
            return [seconds * r / total if total else seconds / len(rows) for r in rows]
        scale = seconds / sum(cost)
        return [c * scale for c in cost]


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
    bounds = torch.tensor([0] + n).cumsum(0).tolist()  # request i's rows are bounds[i]:bounds[i + 1]
    pooled = _PooledRows(caches, starts, n, bounds, device)  # the requests whose few rows attend together in the pool
    # [m, s + m] causal masks of the others with more than one row (True: may attend)
    masks = [None if m == 1 or i in pooled.members else torch.ones(m, s + m, dtype=torch.bool, device=device).tril(s)
             for i, (s, m) in enumerate(zip(starts, n))]
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
        o = q.new_empty(q.shape)  # [1, H, R, hd]
        if pooled.members:
            o[0, :, pooled.rows] = pooled.attend(attn, q, k, v)
        for i, (cache, mask) in enumerate(zip(caches, masks)):
            if i in pooled.members:
                continue
            rows = slice(bounds[i], bounds[i + 1])
            keys, values = cache.update(k[:, :, rows], v[:, :, rows], attn.layer_idx)  # [1, Hkv, s + m, hd]
            o[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], keys, values, attn_mask=mask,
                                                           scale=attn.scaling, enable_gqa=True)  # [1, H, m, hd]
        o = o.transpose(1, 2).reshape(1, R, -1)  # [1, R, H * hd]
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    pooled.done()
    h = inner.norm(h)[0]  # [R, d]
    last_only = last_only or [False] * len(tokens)
    ends = bounds[1:]
    keep = [torch.arange(e - 1, e) if lo else torch.arange(e - m, e) for e, m, lo in zip(ends, n, last_only)]
    rows = h[torch.cat(keep)]
    logits = model.lm_head(rows).float() if head is None else head(rows)  # [rows kept, vocab]
    out, off = [], 0
    for e, m, idx in zip(ends, n, keep):
        lg = logits[off: off + len(idx)]
        off += len(idx)
        out.append((lg, h[e - m: e]) if hidden else (lg, None))
    return out


POOLED_ROWS = 16  # a request with at most this many rows attends with the others in the pool; more (a prefill) alone
ALONE_SHARE = 8  # of n pooled requests, up to n // ALONE_SHARE with the most rows attend alone (see pooled_rows_cap)


def pooled_rows_cap(rows: list[int]) -> int:
    """The most rows a request may have to attend in the pool this step. The pool's product runs
    every member at the largest member's rows, so one request verifying 8 drafts among 31 decoding
    ones makes all 32 attend at 9 rows (a 32-request forward 104 -> 137 ms on the 2-core CPU, as
    dear as every request verifying 2 rows). Up to 1 in ALONE_SHARE of the requests, those with
    the most rows, attend alone instead (112-116 ms there), and the others at the rows the rest need:
    measured over mixes of 1-, 2-, 4- and 9-row requests, this picked the fastest of the caps
    1, 2, 4 and 16 in each (docs/results.md)."""
    few = sorted(r for r in rows if r <= POOLED_ROWS)
    if not few:
        return 0
    return few[len(few) - 1 - len(few) // ALONE_SHARE]


RANGE_COST = 1024  # slot-positions: what reading one more slot range costs (its products' own overhead)


def slot_ranges(members: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The pooled product's slot ranges [(first slot, end slot, positions)], members (slot, end)
    sorted by slot. The product reads every slot of a range (members or not) as far as the range's
    longest member, so one range over all of them reads width x the longest end, while the ends
    vary several-fold (the prompts do). The cut minimises the slot-positions read plus RANGE_COST a
    range (a dynamic program over the cuts between consecutive members; KVPool.take puts long
    caches at the top slots and short ones at the bottom, so that a cut separates them)."""
    best, cut = [0.0] + [float("inf")] * len(members), [0] * (len(members) + 1)
    for j in range(1, len(members) + 1):  # best[j]: the cheapest reading of the first j members
        longest = 0
        for i in range(j - 1, -1, -1):  # the last range: members i .. j - 1
            longest = max(longest, members[i][1])
            c = best[i] + (members[j - 1][0] - members[i][0] + 1) * longest + RANGE_COST
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], len(members)
    while j:
        i = cut[j]
        out.append((members[i][0], members[j - 1][0] + 1, max(e for _, e in members[i:j])))
        j = i
    return out[::-1]


class _PooledRows:
    """The requests of a batched forward whose caches are in one KVPool and whose rows are few
    (decoding, verification): each layer writes their new keys and values into the pool and runs
    their attention as one masked product over the pool's first slots (a request's row sees its
    slot's positions up to its own), instead of a small product per request. The same attention
    summed in another order: logits within float rounding of the per-request path."""

    def __init__(self, caches, starts: list[int], n: list[int], bounds: list[int], device):
        from draftpick.workers.models import PooledLayer

        self.members: dict[int, int] = {}  # request index -> slot
        firsts = [c.layers[0] if c.layers else None for c in caches]
        pool = next((f.pool for f in firsts if isinstance(f, PooledLayer) and f.slot is not None), None)
        # only a request holding a slot can be a member (one that left the pool or has none yet cannot)
        inpool = [isinstance(f, PooledLayer) and f.pool is pool and f.slot is not None for f in firsts]
        cap = pooled_rows_cap([m for ok, m in zip(inpool, n) if ok])
        for i, (c, f, s, m, ok) in enumerate(zip(caches, firsts, starts, n, inpool)):
            if not (ok and m <= cap):
                continue
            if not pool.fits(s + m):
                for layer in c.layers:
                    layer.leave_pool()
                continue
            self.members[i] = f.slot.take(s + m)
        if not self.members:
            return
        self.pool, self.caches = pool, caches
        self.ends = {i: starts[i] + n[i] for i in self.members}
        pool.reserve(max(self.ends.values()))
        slot, row, posn, flat = [], [], [], []  # per member row: its slot, its row in the request, its position, its row in R
        for i, sl in self.members.items():
            for j in range(n[i]):
                slot.append(sl), row.append(j), posn.append(starts[i] + j), flat.append(bounds[i] + j)
        as_t = lambda xs: torch.tensor(xs, device=device)  # noqa: E731
        self.slot, self.row, self.pos, self.rows = as_t(slot), as_t(row), as_t(posn), as_t(flat)
        self.width = max(slot) + 1  # the pool's first slots: the product's queries and outputs
        self.m = max(n[i] for i in self.members)
        self.length = max(self.ends.values())
        # the slot ranges the product reads, each as far as its longest member
        self.ranges = slot_ranges(sorted((sl, self.ends[i]) for i, sl in self.members.items()))
        # [width, 1, 1, m, length]: True where a member's row may not attend; unused rows see position 0
        seen = torch.zeros(self.width, self.m, dtype=torch.long, device=device)
        seen[self.slot, self.row] = self.pos + 1
        seen[seen == 0] = 1
        self.masked = (torch.arange(self.length, device=device) >= seen[..., None])[:, None, None]

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The members' attention outputs [H, rows, hd] for this layer, after writing their keys and values."""
        K, V = self.pool.k[attn.layer_idx], self.pool.v[attn.layer_idx]  # [slots, Hkv, positions, hd]
        K[self.slot, :, self.pos] = k[0, :, self.rows].transpose(0, 1)  # [rows, Hkv, hd]
        V[self.slot, :, self.pos] = v[0, :, self.rows].transpose(0, 1)
        heads, kv_heads, hd = q.shape[1], K.shape[1], q.shape[-1]
        Q = q.new_zeros(self.width, heads, self.m, hd)
        Q[self.slot, :, self.row] = q[0, :, self.rows].transpose(0, 1)  # [rows, H, hd]
        g = heads // kv_heads  # query heads per key head (grouped-query attention)
        out = Q.new_empty(Q.shape)  # slots between the ranges are never read
        for a, b, length in self.ranges:
            w = b - a
            scores = torch.matmul(Q[a:b].view(w, kv_heads, g * self.m, hd), K[a:b, :, :length].transpose(-1, -2))
            scores = (scores * attn.scaling).view(w, kv_heads, g, self.m, length)
            scores.masked_fill_(self.masked[a:b, ..., :length], float("-inf"))
            p = torch.softmax(scores, dim=-1).view(w, kv_heads, g * self.m, length)
            out[a:b] = torch.matmul(p, V[a:b, :, :length]).view(w, heads, self.m, hd)
        return out[self.slot, :, self.row].transpose(0, 1)  # [H, rows, hd]

    def done(self) -> None:
        """The members' layers now hold their new positions (views of the pool)."""
        for i in self.members:
            for layer in self.caches[i].layers:
                layer.refresh(self.ends[i])
