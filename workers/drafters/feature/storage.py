"""How a feature head is stored: a directory with `draftpick_feature.json` (format, kept token ids,
the target's fingerprint) and `head.safetensors` (matrices as int8 rows, int4 groups or bf16)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from draftpick.workers.drafters.feature.head import FeatureHead, target_fingerprint

HEAD_FILE = "draftpick_feature.json"  # marks a feature drafter directory: kept ids + target fingerprint
WEIGHTS_FILE = "head.safetensors"
FORMAT = 2  # 1: bf16 weights; 2: adds "weights": "int8" (matrices as int8 rows + a scale per row), "int4"
# (4-bit codes in groups of GROUP along each row, a scale and an offset per group) or "bf16"
SCALE = ".int8_scale"  # suffix of an int8 matrix's per-row scales in the weights file
SCALE4, LOW4 = ".int4_scale", ".int4_low"  # suffixes of an int4 matrix's per-group scales and minima
GROUP = 64
WEIGHTS = ("int8", "int4", "bf16")


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


