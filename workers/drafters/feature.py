"""Feature drafters (EAGLE-like): a one-layer head that drafts from the target's own hidden states.

The target's last hidden state f_j (the vector its output layer turns into the
logits for token j + 1) carries most of what the next tokens will be. The head
reads pairs (f_j, embedding of x_{j+1}), runs one decoder layer with its own KV
cache, and predicts f_{j+1}; the target's output rows for a reduced vocabulary
turn that into a draft of x_{j+2}. Further drafts feed the head's own predicted
feature with the drafted token (Li et al., EAGLE, 2024).

Only the head is trained and stored (`workers.distill`, `--init feature`): the
token embeddings and output rows are the target's, so a feature drafter loads
against the target it was distilled from and shares its tokenizer by construction.

Per request, the engine keeps the target's hidden states of the verified tokens
(`TargetFeatures`, one row per verified token but the pending last one); the
session feeds each true pair once into the head's cache and rolls back the
speculative entries of a draft, so rejected drafts cost nothing to undo.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from workers.drafters.base import confident, gated
from workers.drafters.lean import LeanCache, LeanHead, supports_lean
from workers.models import DTYPES, kept_logits, new_cache, rollback
from workers.sampling import probs_from_logits, sample
from workers.verify import acceptance_probability

HEAD_FILE = "draftpick_feature.json"  # marks a feature drafter directory: kept ids + target fingerprint
WEIGHTS_FILE = "head.safetensors"
FORMAT = 2  # 1: bf16 weights; 2: adds "weights": "int8" (matrices as int8 rows + a scale per row), "int4"
# (4-bit codes in groups of GROUP along each row, a scale and an offset per group) or "bf16"
SCALE = ".int8_scale"  # suffix of an int8 matrix's per-row scales in the weights file
SCALE4, LOW4 = ".int4_scale", ".int4_low"  # suffixes of an int4 matrix's per-group scales and minima
GROUP = 64
WEIGHTS = ("int8", "int4", "bf16")


def target_fingerprint(target) -> dict:
    """What a head must agree with: the target's shape and vocabulary size."""
    c = target.config
    return {"hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "num_hidden_layers": c.num_hidden_layers,
            "model_type": c.model_type}


def body_config(target_config):
    """The target's config cut to one decoder layer and no vocabulary of its own."""
    cfg = target_config.__class__.from_dict(target_config.to_dict())
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[-1:]
    cfg.vocab_size = 8  # the body never embeds tokens itself (inputs_embeds only)
    cfg.pad_token_id = None
    cfg.tie_word_embeddings = False
    cfg.quantization_config = None
    return cfg


class FeatureHead(nn.Module):
    """fc(concat(token embedding, feature)) -> one decoder layer (+ norm) -> predicted next feature."""

    def __init__(self, target_config):
        super().__init__()
        from transformers import AutoModel

        d = target_config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.body = AutoModel.from_config(body_config(target_config), dtype=torch.float32)
        self.body.embed_tokens.weight.requires_grad_(False)

    @classmethod
    def from_target(cls, target) -> "FeatureHead":
        """A fresh head whose decoder layer and norm start as copies of the target's last layer and norm."""
        head = cls(target.config)
        src = target.model.layers[-1].state_dict()
        head.body.layers[0].load_state_dict({k: v.float() for k, v in src.items()})
        head.body.norm.load_state_dict({k: v.float() for k, v in target.model.norm.state_dict().items()})
        with torch.no_grad():  # start near "the next feature is this feature": identity on the feature half
            d = target.config.hidden_size
            head.fc.weight.zero_()
            head.fc.weight[:, d:].copy_(torch.eye(d))
            head.fc.bias.zero_()
        return head

    def forward(self, feats: torch.Tensor, tok_emb: torch.Tensor, cache=None) -> torch.Tensor:
        """feats, tok_emb: [B, T, d] -> predicted features [B, T, d]."""
        x = self.fc(torch.cat([tok_emb, feats], -1))
        out = self.body(inputs_embeds=x, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def trained_state(self) -> dict:
        """What is stored: everything but the body's unused token embedding."""
        return {k: v for k, v in self.state_dict().items() if k != "body.embed_tokens.weight"}


def is_feature_drafter(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def save_head(out: Path, head: FeatureHead, kept: list[int], target, weights: str = "int8") -> None:
    """Store the head. int8 (the default) keeps each matrix as int8 rows with one fp32 scale per row,
    half the size of bf16 (a drafter's weights need not be exact: verification keeps output lossless);
    int4 keeps 4-bit codes in groups of 64 along each row with an fp16 scale and minimum per group
    (0.56 bytes a weight); vectors (norms, biases) stay bf16."""
    from safetensors.torch import save_file

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in head.trained_state().items():
        v = v.detach().to("cpu", torch.float32)
        if weights == "int8" and v.dim() == 2:
            scale = v.abs().amax(1).clamp_min(1e-12) / 127
            tensors[k] = torch.round(v / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            tensors[k + SCALE] = scale.contiguous()
        elif weights == "int4" and v.dim() == 2 and v.shape[1] % GROUP == 0:
            tensors[k], tensors[k + SCALE4], tensors[k + LOW4] = _int4(v)
        else:
            tensors[k] = v.to(torch.bfloat16).contiguous()
    save_file(tensors, out / WEIGHTS_FILE)
    meta = {"format": FORMAT, "kind": "feature", "weights": weights, "target": target_fingerprint(target), "kept": kept}
    (out / HEAD_FILE).write_text(json.dumps(meta))


def _int4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, cols] fp32 -> (codes packed two to a byte [rows, cols / 2] uint8, scale and minimum
    [rows, cols / GROUP] fp16): each group of GROUP weights spans its own [min, max] in 16 steps."""
    g = v.reshape(v.shape[0], -1, GROUP)
    low = g.amin(-1).half()
    scale = ((g.amax(-1) - low.float()) / 15).clamp_min(1e-8).half()
    codes = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    codes = codes.reshape(v.shape[0], -1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scale.contiguous(), low.contiguous()


def _from_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1, GROUP).float()
    return (codes * scale.float()[..., None] + low.float()[..., None]).reshape(packed.shape[0], -1)


def _dequantised(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in stored.items():
        if k.endswith((SCALE, SCALE4, LOW4)):
            continue
        if k + SCALE4 in stored:
            out[k] = _from_int4(v, stored[k + SCALE4], stored[k + LOW4])
            continue
        scale = stored.get(k + SCALE)
        out[k] = v.float() if scale is None else v.float() * scale.float()[:, None]
    return out


def load_head(path: str | Path, target) -> tuple[FeatureHead, list[int]]:
    """Load a stored head for `target`; a clear error when it was made for another target."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / HEAD_FILE
    if not meta_file.is_file():
        raise ValueError(f"{str(path)!r} is not a feature drafter directory (no {HEAD_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in (1, FORMAT):
        raise ValueError(f"feature drafter {str(path)!r}: format {meta.get('format')!r}, this version reads 1 and {FORMAT}")
    want = target_fingerprint(target)
    if meta.get("target") != want:
        raise ValueError(f"feature drafter {str(path)!r} was made for a target with {meta.get('target')}, "
                         f"but the target has {want}: a feature drafter must share the target's tokenizer and shape")
    kept = meta["kept"]
    if not kept or max(kept) >= target.config.vocab_size or min(kept) < 0:
        raise ValueError(f"feature drafter {str(path)!r}: kept token ids outside the target's vocabulary")
    head = FeatureHead(target.config)
    state = _dequantised(load_file(str(path / WEIGHTS_FILE)))
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "body.embed_tokens.weight"]
    if missing or unexpected:
        raise ValueError(f"feature drafter {str(path)!r}: weights do not fit (missing {missing}, unexpected {unexpected})")
    return head, kept


class TargetFeatures:
    """The target's last hidden states of a request's verified tokens: rows[j] is f_j for ids[j],
    for every verified token but the pending last one (written by the engine). Appends go into a
    buffer that doubles when full, so a long request does not copy its history every round."""

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> torch.Tensor | None:
        return None if self._buf is None else self._buf[: self._n]

    @rows.setter
    def rows(self, value: torch.Tensor) -> None:
        self._buf, self._n = value.detach().float(), value.shape[0]

    def append(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().float()
        need = self._n + hidden.shape[0]
        if self._buf is None or need > self._buf.shape[0]:
            grown = hidden.new_empty((max(need, 2 * self._n, 64), hidden.shape[1]))
            if self._n:
                grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = hidden
        self._n = need


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (else torch emulates it, several times slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def head_dtype(dtype: str, device: str) -> torch.dtype:
    """A feature head's arithmetic: fp32, bf16, or auto (bf16 where it is native: CUDA or such a CPU)."""
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" or native_bf16_cpu() else "fp32"
    return DTYPES[dtype]


class FeatureDrafter:
    is_model = True
    uses_target_features = True  # the engine passes each session the request's TargetFeatures

    def __init__(self, name: str, head: FeatureHead, target, kept: list[int], dtype: torch.dtype = torch.float32,
                 min_confidence: float = 0.0):
        # dtype: the head's arithmetic and output rows. bf16 halves the bytes a draft reads (on a CPU,
        # drafting is bound by them); logits and draft probabilities stay float32
        self.name, self.dtype, self.head = name, dtype, head.to(target.device, dtype).eval()
        self.min_confidence = min_confidence  # see workers.drafters.base.confident
        # drafting runs the layer without transformers' per-call machinery where it can (workers.drafters.lean)
        self.lean = LeanHead(self.head) if supports_lean(self.head) else None
        self.embed = target.get_input_embeddings()
        self.kept = torch.tensor(kept, device=target.device)
        self.out_rows = target.get_output_embeddings().weight[self.kept].detach().to(dtype).contiguous()
        self.vocab_size = target.config.vocab_size

    @classmethod
    def load(cls, name: str, path: str, target, dtype: torch.dtype = torch.float32,
             min_confidence: float = 0.0) -> "FeatureDrafter":
        head, kept = load_head(path, target)
        return cls(name, head, target, kept, dtype, min_confidence)

    def session(self, tenant: str, prompt_len: int, features: TargetFeatures | None = None):
        if features is None:
            raise ValueError(f"feature drafter {self.name!r} needs the target's hidden states (engine passes them)")
        return FeatureSession(self, features)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features [n, d] -> float32 logits [n, vocab], -inf outside the kept vocabulary."""
        return kept_logits(h.to(self.dtype), self.out_rows, self.kept, self.vocab_size)

    def new_cache(self):
        return LeanCache() if self.lean is not None else new_cache(self.head.body)

    @torch.inference_mode()
    def step(self, cache, feats: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Feed pairs (feats[i], tokens[i]) after `cache`; returns the predicted features [n, d]."""
        emb = self.embed(torch.tensor(tokens, device=feats.device)).to(self.dtype)  # [n, d]
        if self.lean is not None:
            return self.lean(feats.to(self.dtype), emb, cache)
        return self.head(feats[None].to(self.dtype), emb[None], cache)[0]


class FeatureSession:
    """Cache entry j holds the pair (f_j, x_{j+1}); `fed` entries hold true features."""

    def __init__(self, drafter: FeatureDrafter, features: TargetFeatures):
        self.d, self.features = drafter, features
        self.cache = drafter.new_cache()
        self.fed = 0
        self.h_last: torch.Tensor | None = None  # output of entry fed - 1: predicts f_fed

    def _catch_up(self, ids: list[int], upto: int) -> torch.Tensor:
        """Feed the true pairs up to entry upto - 1 (needs upto <= len(features)); returns the
        predicted feature [1, d] that drafts ids[upto + 1]."""
        rollback(self.cache, self.fed)  # drop the previous draft's speculative entries
        if upto > self.fed:
            rows = self.features.rows[self.fed : upto]
            self.h_last = self.d.step(self.cache, rows, ids[self.fed + 1 : upto + 1])[-1:]
            self.fed = upto
        return self.h_last

    def draft(self, ids: list[int], upto: int, n: int, choose) -> tuple[list[int], list[torch.Tensor]]:
        """Draft up to n tokens after ids[: upto + 1]. choose(i, logits) -> (token, go_on): the
        i-th token given the drafter's logits (None: draft nothing there), and whether to draft
        another after it."""
        h = self._catch_up(ids, upto)
        tokens, logits_list = [], []
        for i in range(n):
            logits = self.d.logits(h)[0]
            x, go_on = choose(i, logits)
            if x is None:
                break
            tokens.append(x)
            logits_list.append(logits)
            if not go_on or i + 1 == n:
                break
            h = self.d.step(self.cache, h, [x])
        return tokens, logits_list

    def propose(self, ids, k, params, generator, threshold=None):
        if k <= 0:
            return torch.empty(0, dtype=torch.long), None

        gate = self.d.min_confidence

        def choose(i, logits):
            raw = logits.softmax(-1) if gate > 0 or threshold is not None else None
            if gate > 0 and not confident(raw, gate):
                return None, False
            q = probs_from_logits(logits, params)
            x = int(q.argmax()) if params.greedy else int(sample(q, generator))
            # confidence stop, as in ModelSession: the drafter's own probability of its token
            return x, threshold is None or float(raw[x]) >= threshold

        self._check(len(ids) - 1)
        tokens, logits = self.draft(ids, len(ids) - 1, k, choose)
        if not tokens:
            return torch.empty(0, dtype=torch.long), None
        return torch.tensor(tokens, dtype=torch.long), probs_from_logits(torch.stack(logits), params)

    def sync(self, ids, start, p, params):
        if p is None:
            return None  # lazy: the next propose catches up
        # what this drafter would have proposed from ids[:start], given each earlier draft was accepted
        self._check(start - 1)
        emitted = ids[start:]
        _, logits = self.draft(ids, start - 1, len(emitted), lambda i, lg: (emitted[i], True))
        logits = torch.stack(logits)
        acc = acceptance_probability(p, probs_from_logits(logits, params)).tolist()
        return gated(acc, logits.softmax(-1).amax(-1).tolist(), self.d.min_confidence)

    def _check(self, upto: int) -> None:
        if len(self.features) < upto:
            raise RuntimeError(f"target features cover {len(self.features)} tokens, the draft needs {upto}")

    def close(self, ids):
        self.cache = None
