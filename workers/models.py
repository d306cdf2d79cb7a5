"""Loading target and drafter models; device and precision; the one forward helper.

Models are Hugging Face causal LMs given by hub id, local directory, or a
directory plus `gguf_file`. `builtin:<name>` names a model that `draftpick
setup` converts once and caches (see `workers.builtin`).
"""
from __future__ import annotations

import collections
import copy
import heapq
import logging
import os
import statistics
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype


def place(device: str = "auto", dtype: str = "auto") -> Placement:
    """auto: CUDA with bf16 when a GPU is visible, else CPU with fp32 (the lossless default there)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for but no GPU is visible")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return Placement(device, DTYPES[dtype])


def resolve_path(path: str) -> tuple[str, str | None]:
    """Returns (directory or hub id, gguf file name or None) for a model path as configured."""
    if path.startswith("builtin:"):
        from draftpick.workers.builtin import ensure_builtin

        return str(ensure_builtin(path.removeprefix("builtin:"))), None
    if path.endswith(".gguf") and Path(path).is_file():
        return str(Path(path).parent), Path(path).name
    return path, None


def load_model(path: str, placement: Placement, gguf_file: str | None = None, small_batch: bool = True):
    where, gguf = resolve_path(path)
    gguf = gguf_file or gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=placement.dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {path!r}: {e}") from e
    model = model.to(placement.device).eval()
    if small_batch:
        small_batch_linears(model)
    return model


FEW_ROWS = 64  # forwards of up to this many rows (tokens) may take another path than `linear`
WIDE_LAYER = 8192  # output features from which a layer keeps a transposed copy of its weights (the output layer)
MARGIN = 0.1  # another product replaces `linear` only if it timed this much faster (the timings are noisy)
CALIBRATED_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts timed; the others take the choice below
# the products a linear layer of few rows may take, x [rows, in] by the layer's weight W [out, in] or a copy of it
KERNELS = {
    "linear": lambda x, mod: torch.nn.functional.linear(x, mod.weight),
    "w_xt": lambda x, mod: (mod.weight @ x.t()).t().contiguous(),  # what reads it next reads rows: timed with the copy
    "x_wt": lambda x, mod: x @ mod.weight_t,  # W.T stored contiguously (wide layers)
    # MKL's product on W packed once (`linear` packs it again on every call)
    "packed": lambda x, mod: torch.ops.mkl._mkl_linear(x.contiguous(), mod.weight_packed, mod.weight, None, x.shape[0]),
}


def mkl_packing() -> bool:
    """Whether this PyTorch offers MKL's pre-packed fp32 product (CPU builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


@torch.inference_mode()
def _pack(mod) -> bool:
    """Keep W packed for MKL (`weight_packed`, as large as W) if the packed product computes what
    `linear` does here (checked on 3 and FEW_ROWS rows), else nothing."""
    try:
        mod.weight_packed = torch.ops.mkl._mkl_reorder_linear_weight(mod.weight.detach(), FEW_ROWS)
        x = torch.randn(FEW_ROWS, mod.in_features, generator=torch.Generator().manual_seed(0))
        for rows in (3, FEW_ROWS):
            if not torch.allclose(KERNELS["packed"](x[:rows], mod), torch.nn.functional.linear(x[:rows], mod.weight),
                                  rtol=1e-4, atol=1e-5):
                raise ValueError("the packed product differs from linear")
        return True
    except (RuntimeError, ValueError) as e:  # an MKL that packs otherwise: the other products only
        log.warning("draftpick: no MKL-packed product for a %s linear layer (%s)", tuple(mod.weight.shape), e)
        vars(mod).pop("weight_packed", None)
        return False


def small_batch_linears(model, repeats: int = 2, timer=None) -> int:
    """Faster linear layers for decoding, verification and batched steps on the CPU in fp32 (the
    same dot products, summed in another order). PyTorch's CPU `linear` can be slow for a few rows
    (MKL packs the whole weight matrix again on every call), and which product is fastest for 1-64
    rows depends on the CPU: `W @ x.T` halved a 2-3-token forward on one machine and doubled it on
    another (docs/results.md). So the choice is measured here, once, on this machine
    (`calibrate`): for each shape of linear layer and each row count, `linear`, `W @ x.T`, MKL's
    product on a copy of W packed once (where MKL offers it; 16 % faster than `linear` at 16 rows
    on a 2-core AVX-512 machine, and it rounds the same whatever the row count) and, for layers at
    least WIDE_LAYER wide (the output layer, which keeps a transposed copy of its weights), `x @ W.T`;
    each layer keeps the fastest per row count (`kernels`, indexed by rows) and only the copies it
    reads. It takes a few seconds for the embedded default's target. Larger inputs (prefill,
    training) keep `linear`; `draftpick bench forward` compares the result with the stock layers.
    Models on other devices or in other precisions are left alone. The copies are taken once: the
    model must be used for inference (its weights not changed afterwards). `timer`: the clock (a
    test's). Returns the number of layers changed."""
    groups: dict[tuple[int, int], list] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if type(mod) is not torch.nn.Linear or w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        groups.setdefault(tuple(w.shape), []).append(mod)
    for (out, _), layers in groups.items():
        names = ["linear", "w_xt"]
        if out >= WIDE_LAYER:
            names.append("x_wt")
            for mod in layers:
                mod.register_buffer("weight_t", mod.weight.detach().t().contiguous(), persistent=False)
        if mkl_packing() and all(_pack(mod) for mod in layers):
            names.append("packed")
        kernels = calibrate(layers, names, repeats, timer or time.perf_counter)
        for mod in layers:
            if "x_wt" not in kernels and hasattr(mod, "weight_t"):
                delattr(mod, "weight_t")  # the copy is kept only where it is read (113 MB for the default's)
            if "packed" not in kernels:
                vars(mod).pop("weight_packed", None)
            mod.kernels = kernels
            mod.forward = _small_batch_forward.__get__(mod)
            mod.__deepcopy__ = _plain_deepcopy.__get__(mod)
    return sum(len(layers) for layers in groups.values())


_ADDED = ("weight_packed", "kernels", "forward", "__deepcopy__")  # what small_batch_linears sets on a layer


def _plain_deepcopy(self, memo):
    """A deep copy of a layer small_batch_linears changed is a plain nn.Linear again: its copies of W
    (packed, transposed) and their kernels are left out, as the copy's weights may then change (a
    noisy copy of a target), and MKL's packed tensor (opaque) cannot be deep-copied anyway."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    for name, value in vars(self).items():
        if name not in _ADDED:
            vars(new)[name] = copy.deepcopy(value, memo)
    new._buffers.pop("weight_t", None)
    new._non_persistent_buffers_set.discard("weight_t")
    return new


@torch.inference_mode()
def calibrate(layers, names: list[str], repeats: int, timer) -> tuple[str, ...]:
    """The fastest of the `names`d KERNELS for each row count 0..FEW_ROWS over `layers` (one shape),
    timed at CALIBRATED_ROWS over all the layers (their weights streamed from memory as a forward
    streams them: timing a few layers, which the CPU's caches hold, chose worse), kernels
    interleaved, the fastest of `repeats` passes after a warm-up; `linear` unless another is MARGIN
    faster. A count between two timed ones takes the choice of the one below; index 0 is unused."""
    d = layers[0].in_features
    gen = torch.Generator().manual_seed(0)
    xs = {r: torch.randn(r, d, generator=gen) for r in CALIBRATED_ROWS}
    best = {(r, k): float("inf") for r in CALIBRATED_ROWS for k in names}
    for rep in range(repeats + 1):
        for r in CALIBRATED_ROWS:
            for k in names:
                t0 = timer()
                for mod in layers:
                    KERNELS[k](xs[r], mod)
                if rep:
                    best[r, k] = min(best[r, k], timer() - t0)
    chosen = {r: min(names, key=lambda k: best[r, k]) for r in CALIBRATED_ROWS}
    chosen = {r: k if best[r, "linear"] > (1 + MARGIN) * best[r, k] else "linear" for r, k in chosen.items()}
    return tuple(chosen[max(c for c in CALIBRATED_ROWS if c <= max(r, 1))] for r in range(FEW_ROWS + 1))


def _small_batch_forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    training = torch.is_grad_enabled() and w.requires_grad  # autograd gets the op it knows
    if not 1 <= rows <= FEW_ROWS or training or x.device != w.device or x.dtype != w.dtype \
            or self.kernels[rows] == "linear":
        return torch.nn.functional.linear(x, w, self.bias)
    y = KERNELS[self.kernels[rows]](x.reshape(rows, x.shape[-1]), self)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def load_tokenizer(path: str, gguf_file: str | None = None):
    where, gguf = resolve_path(path)
    return AutoTokenizer.from_pretrained(where, gguf_file=gguf_file or gguf)


def check_same_vocabulary(target_tok, target_model, drafter_name: str, drafter_model, drafter_path: str, gguf_file=None):
    """Refuse a drafter whose token ids do not mean the same tokens as the target's."""
    tv, dv = target_model.config.vocab_size, drafter_model.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"drafter {drafter_name!r} has a vocabulary of {dv} tokens but the target has {tv}: "
            "a drafter must share the target's tokenizer"
        )
    try:
        dtok = load_tokenizer(drafter_path, gguf_file)
    except (OSError, ValueError):
        return  # no tokenizer shipped with the drafter: the sizes agree, trust its ids
    if dtok.get_vocab() != target_tok.get_vocab():
        raise ValueError(
            f"drafter {drafter_name!r} ships a tokenizer different from the target's "
            "(same size, other tokens): a drafter must share the target's tokenizer"
        )


def new_cache(model) -> DynamicCache:
    """A cache that can be rolled back: sliding-window (and convolution-state) layers keep their
    past until `rollback` crops them, instead of refusing to crop once their window is full. Its
    full-attention layers grow in place: in the model's `KVPool` (`PooledLayer`) where
    `workers.batched` can batch the model, else in their own buffers (`GrowingLayer`)."""
    from draftpick.workers.batched import batchable

    cache = DynamicCache(config=model.config)
    pool = KVPool.of(model) if batchable(model) else None
    slot = pool.acquire() if pool is not None else None
    cache.layers = [(PooledLayer(pool, slot, i) if pool is not None else GrowingLayer())
                    if type(layer) is DynamicLayer else layer for i, layer in enumerate(cache.layers)]
    cache.activate_past_recording()
    return cache


POOL_POSITIONS = 1024  # a request longer than this leaves the pool for buffers of its own
RECENT_STARTS = 64  # a cache starting at least as long as the median of this many last ones takes a high slot
_POOLS = weakref.WeakKeyDictionary()  # model -> its KVPool


class KVPool:
    """The keys and values of all of one model's requests, layer by layer, in one tensor per layer
    [slots, kv heads, positions, head dim]: request r's cache is its slot's first positions. The
    attention of many requests' few rows (decoding, verification) then reads one strided view of
    it in one product (`workers.batched`) instead of one small product per request. A cache takes
    a slot at its first forward and gives it back when it is collected; the pool grows (slots, or
    positions up to POOL_POSITIONS, copying what it holds) as needed. Zero-filled, so positions
    beyond a request's length hold finite values that its mask drops."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device):
        self.shape, self.dtype, self.device = (layers, kv_heads, head_dim), dtype, device
        self.slots, self.positions, self.free = 0, 0, []  # free: a heap of slot indices
        self.recent = collections.deque(maxlen=RECENT_STARTS)  # the positions the last caches started with
        self.lock = threading.Lock()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @classmethod
    def of(cls, model) -> "KVPool":
        """The model's pool (a copy of the model, or the model moved or cast, gets a new one)."""
        pool = _POOLS.get(model)
        if pool is None or (pool.dtype, pool.device) != (model.dtype, model.device):
            cfg = model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            pool = _POOLS[model] = cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, model.dtype,
                                       model.device)
        return pool

    def acquire(self) -> "Slot":
        """A place for a new cache; its slot is taken at its first forward (`Slot.index`)."""
        return Slot(self)

    def take(self, length: int | None = None) -> int:
        """A free slot, growing the pool if none is: on the thread that runs the model's forwards
        (a growth moves every slot's positions, which must not happen under a running forward).
        length: the positions the cache starts with. One at least as long as the median of the last
        RECENT_STARTS takes the highest free slot, the others the lowest: long and short caches
        gather at the two ends, and the batched product reads each end only as far as its longest
        cache (workers.batched.slot_ranges), where one product over every slot reads all of them
        as far as the longest."""
        with self.lock:
            if self.free:
                return self._pop(length)
        self._grow(max(4, 2 * self.slots), self.positions)
        with self.lock:
            return self._pop(length)

    def _pop(self, length: int | None) -> int:
        long = length is not None and bool(self.recent) and length >= statistics.median(self.recent)
        if length is not None:
            self.recent.append(length)
        if not long or len(self.free) == 1:
            return heapq.heappop(self.free)
        i = max(self.free)
        self.free.remove(i)
        heapq.heapify(self.free)
        return i

    def fits(self, length: int) -> bool:
        return length <= POOL_POSITIONS

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every slot (length <= POOL_POSITIONS)."""
        if length > self.positions:
            self._grow(self.slots, min(POOL_POSITIONS, max(length + 64, self.positions * 3 // 2)))

    @torch.inference_mode()  # its tensors are written under inference mode (forwards), so made there too
    def _grow(self, slots: int, positions: int) -> None:
        layers, heads, dim = self.shape
        old = (self.k, self.v)
        self.k, self.v = ([torch.zeros(slots, heads, positions, dim, dtype=self.dtype, device=self.device)
                           for _ in range(layers)] for _ in range(2))
        if self.slots and self.positions:
            for new_l, old_l in zip(self.k + self.v, old[0] + old[1]):
                new_l[: self.slots, :, : self.positions] = old_l
        with self.lock:
            for i in range(self.slots, slots):
                heapq.heappush(self.free, i)  # lowest slots first: the batched product reads the first ones
            self.slots, self.positions = slots, positions

    def release(self, index: int) -> None:
        """A collected cache's slot (on whichever thread collected it)."""
        with self.lock:
            heapq.heappush(self.free, index)


class Slot:
    """One cache's place in a KVPool, shared by its layers: taken at its first forward, given back
    when the last layer lets go of it."""

    def __init__(self, pool: KVPool):
        self.pool, self._index = pool, None

    def take(self, length: int | None = None) -> int:
        """Its index, taken now if it has none yet (length: the positions its cache starts with, see
        KVPool.take)."""
        if self._index is None:
            self._index = self.pool.take(length)
            weakref.finalize(self, self.pool.release, self._index)
        return self._index

    @property
    def index(self) -> int:
        return self.take()


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that writes new positions into spare room at the end of its
    buffer instead of concatenating (DynamicLayer copies the whole cache at every step: a quarter
    of a 16-request decode step on the CPU, docs/results.md). `keys` / `values` are views of the
    buffer's first positions, so `crop` (rejected drafts) only shortens the view and the next
    update writes over what it dropped. Same values, same attention: only the copies go."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = None
        have, new = self.get_seq_length(), key_states.shape[-2]
        bufs = self._buffers
        if bufs is None or have + new > bufs[0].shape[-2] or not _prefix_of(self.keys, bufs[0]) \
                or not _prefix_of(self.values, bufs[1]):
            room = have + new + max(128, (have + new) // 2)  # amortised: room for half as many again
            bufs = tuple(x.new_empty(*x.shape[:-2], room, x.shape[-1]) for x in (key_states, value_states))
            if have:
                bufs[0][..., :have, :] = self.keys
                bufs[1][..., :have, :] = self.values
            self._buffers = bufs
        bufs[0][..., have: have + new, :] = key_states
        bufs[1][..., have: have + new, :] = value_states
        self.keys, self.values = bufs[0][..., : have + new, :], bufs[1][..., : have + new, :]
        return self.keys, self.values


def _prefix_of(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `view` is the first positions of `buffer` (not a tensor put in its place by a caller)."""
    return (view.numel() == 0 or view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
            and view.shape[:-2] == buffer.shape[:-2])


class PooledLayer(GrowingLayer):
    """A full-attention cache layer kept in its model's KVPool: `keys` / `values` are views of its
    slot's first positions there, written in place (as GrowingLayer's buffer). A request that would
    grow past POOL_POSITIONS leaves the pool (`leave_pool`): its positions move to buffers of its
    own and it goes on as a GrowingLayer."""

    def __init__(self, pool: KVPool, slot: Slot, layer_idx: int):
        super().__init__()
        self.pool, self.slot, self.idx = pool, slot, layer_idx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = None
        have, new = self.get_seq_length(), key_states.shape[-2]
        if self.slot is not None and (key_states.shape[0] != 1 or not self.pool.fits(have + new)):
            self.leave_pool()  # (a batch of sequences in one cache, e.g. transformers' generate: buffers of its own)
        if self.slot is None:
            return super().update(key_states, value_states)
        self.pool.reserve(have + new)
        i = self.slot.take(have + new)
        with torch.inference_mode():
            self.pool.k[self.idx][i, :, have: have + new] = key_states[0]
            self.pool.v[self.idx][i, :, have: have + new] = value_states[0]
        self.refresh(have + new)
        return self.keys, self.values

    def refresh(self, length: int) -> None:
        """keys / values: the slot's first `length` positions (after a write, or the pool's growth)."""
        if not self.is_initialized:  # its first positions came through the batched forward
            self.is_initialized, self.device, self._buffers = True, self.pool.device, None
        i = self.slot.index
        self.keys = self.pool.k[self.idx][i: i + 1, :, :length]
        self.values = self.pool.v[self.idx][i: i + 1, :, :length]

    def leave_pool(self) -> None:
        if self.slot is not None:
            have = self.get_seq_length()
            if self.is_initialized:
                self.refresh(have)
                self.keys, self.values = self.keys.clone(), self.values.clone()  # GrowingLayer re-buffers them
            self.slot, self._buffers = None, None

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        if self.slot is None:
            new.keys, new.values = (None, None) if self.keys is None else (self.keys.clone(), self.values.clone())
            new._buffers = None
            return new
        if id(self.slot) not in memo:
            memo[id(self.slot)] = self.pool.acquire()
        new.slot = memo[id(self.slot)]
        if self.is_initialized:
            have = self.get_seq_length()
            src, dst = self.slot.index, new.slot.take(have)  # (taking one may grow the pool)
            with torch.inference_mode():
                for t in (self.pool.k[self.idx], self.pool.v[self.idx]):
                    t[dst, :, :have] = t[src, :, :have]
            new.refresh(have)
        return new


@torch.inference_mode()
def forward(model, cache: DynamicCache, tokens: list[int], last_only: bool = False, hidden: bool = False):
    """Run `tokens` after what `cache` holds; returns float32 logits [len(tokens) or 1, vocab].

    hidden: also return the last hidden states [len(tokens), d] (what the output layer reads;
    feature drafters draft from them), as (logits, hidden).
    """
    ids = torch.tensor([tokens], device=model.device)  # [1, n]
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1 if last_only else 0,
                output_hidden_states=hidden)
    logits = out.logits[0].float()  # [n, vocab]
    return (logits, out.hidden_states[-1][0]) if hidden else logits


def default_verify_pad(placement: Placement, small_batch: bool = True) -> int:
    """Pad verify forwards to a multiple of 4 tokens on the CPU, except in fp32 with
    `small_batch_linears`, which makes few-row products cheap without it (see verify_forward)."""
    return 4 if placement.device == "cpu" and not (small_batch and placement.dtype == torch.float32) else 1


def verify_forward(model, cache: DynamicCache, tokens: list[int], pad_multiple: int = 1, hidden: bool = False):
    """The target's verification forward: logits [len(tokens), vocab] for `tokens` after the cache.

    With pad_multiple > 1, a forward of more than one token is padded (by repeating the last
    token) to a multiple of it: with PyTorch's stock CPU `linear`, fp32 matmuls with 2, 3, 6 or 7
    rows can be slower than with 4 or 8, so padding made k = 1, 2, 5, 6 cheaper there; with
    `small_batch_linears` (the default for fp32 on the CPU) it does not pay.
    The padded positions come after the real ones, so causal attention keeps them out of the real
    logits; the caller crops them from the cache with the rejected drafts.
    """
    n = len(tokens)
    if pad_multiple > 1 and n > 1 and n % pad_multiple:
        tokens = tokens + [tokens[-1]] * (pad_multiple - n % pad_multiple)
    if hidden:
        logits, h = forward(model, cache, tokens, hidden=True)
        return logits[:n], h[:n]
    return forward(model, cache, tokens)[:n]


@torch.inference_mode()
def forward_trimmed(model, cache: DynamicCache, tokens: list[int], head: torch.Tensor, kept: torch.Tensor,
                    last_only: bool = False) -> torch.Tensor:
    """Like `forward`, but computes logits only for the `kept` token ids (a reduced output vocabulary).

    head: [len(kept), d] output rows of the kept ids. Returns float32 [n, vocab] with -inf elsewhere.
    """
    ids = torch.tensor([tokens], device=model.device)  # [1, n]
    hidden = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]  # [n, d]
    if last_only:
        hidden = hidden[-1:]
    return kept_logits(hidden, head, kept, model.config.vocab_size)


def kept_logits(hidden: torch.Tensor, head: torch.Tensor, kept: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """hidden [n, d] @ head [len(kept), d].T scattered into float32 [n, vocab_size], -inf off `kept`."""
    small = (hidden @ head.T).float()  # [n, len(kept)]
    full = torch.full((small.shape[0], vocab_size), float("-inf"), device=small.device)
    full[:, kept] = small
    return full


def rollback(cache: DynamicCache, keep: int) -> None:
    """Drop cached positions beyond the first `keep` (rejected drafts).

    Every layer is cropped, also by 0: a sliding-window layer that records its past then shrinks
    back to its window. A layer with a recurrent state (linear attention, Mamba) cannot be put
    back to an earlier position, so such a model cannot be verified against: a clear error."""
    have = cache.get_seq_length()
    if have == 0:
        return
    extra = have - keep
    if extra < 0:
        raise ValueError(f"cannot roll a cache of {have} positions forward to {keep}")
    for layer in getattr(cache, "layers", ()):
        if extra and getattr(layer, "is_croppable", True) is False:
            raise ValueError(f"the model's {type(layer).__name__} cache layers keep a recurrent state that cannot "
                             "be rolled back to an earlier token: speculative decoding needs a model whose "
                             "cache can be cropped (attention layers, full or sliding-window)")
    cache.crop(-extra)


def median_seconds(run, cache, keep: int, repeats: int) -> float:
    """Median wall seconds of run() over `repeats` calls after one warm-up (a new shape's first call
    is slower), rolling `cache` (or each of a list of caches: a batched forward's) back to `keep`
    positions after each."""
    import statistics
    import time

    caches = cache if isinstance(cache, list) else [cache]
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
        for c in caches:
            rollback(c, keep)
    return statistics.median(times[1:])


def set_threads(n: int | None) -> None:
    """Torch intra-op threads (Ray starts actors with OMP_NUM_THREADS=1 unless told otherwise)."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
