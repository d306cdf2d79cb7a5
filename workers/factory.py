"""Build a `SpeculativeEngine` from a validated configuration (loads the models)."""
from __future__ import annotations

import json
from pathlib import Path

from workers.capture import RedisStreamCapture, TrafficCapture
from workers.config import DraftpickConfig, FeatureDrafterConfig, ModelDrafterConfig, NgramConfig, SuffixConfig
from workers.distill import VOCAB_FILE
from workers.drafters.feature import FeatureDrafter, head_dtype, is_feature_drafter
from workers.drafters.model import ModelDrafter
from workers.drafters.ngram import NgramDrafter
from workers.drafters.suffix import SuffixDrafter
from workers.engine import SpeculativeEngine
from workers.models import check_same_vocabulary, default_verify_pad, load_model, load_tokenizer, place


def build_engine(cfg: DraftpickConfig) -> SpeculativeEngine:
    placement = place(cfg.engine.device, cfg.engine.dtype)
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file)
    small_batch = cfg.engine.small_batch_linears
    target = load_model(cfg.target.path, placement, cfg.target.gguf_file, small_batch)
    drafters = {}
    for d in cfg.drafters:
        if isinstance(d, NgramConfig):
            drafters[d.name] = NgramDrafter(d.name, d.min_ngram, d.max_ngram)
        elif isinstance(d, SuffixConfig):
            drafters[d.name] = SuffixDrafter(d.name, d.min_ngram, d.max_ngram, d.max_tokens_per_tenant)
        elif isinstance(d, (ModelDrafterConfig, FeatureDrafterConfig)):
            drafters[d.name] = load_drafter(d.name, d.path, target, tokenizer, placement,
                                            getattr(d, "gguf_file", None), feature=isinstance(d, FeatureDrafterConfig),
                                            dtype=getattr(d, "dtype", "auto"), min_confidence=d.min_confidence,
                                            small_batch=small_batch)
    capture = None
    if cfg.engine.capture_path:
        capture = TrafficCapture(cfg.engine.capture_path, cfg.engine.capture_max_bytes)
    elif cfg.engine.capture_stream:
        capture = RedisStreamCapture(cfg.engine.capture_stream, cfg.engine.capture_max_entries)
    pad = cfg.engine.verify_pad_multiple or default_verify_pad(placement, small_batch)
    played_only = {d.name for d in cfg.drafters if not getattr(d, "full_information", True)}
    return SpeculativeEngine(target, tokenizer, drafters, full_information=cfg.engine.full_information,
                             capture=capture, verify_pad_multiple=pad, played_only=played_only)


def load_drafter(name: str, path: str, target, tokenizer, placement, gguf_file: str | None = None,
                 feature: bool | None = None, dtype: str = "auto", min_confidence: float = 0.0,
                 small_batch: bool = True):
    """A neural drafter from a directory: a feature head (EAGLE-like) or a causal LM sharing the
    target's tokenizer. feature=None: decided by the directory's contents. dtype: a feature
    head's arithmetic (auto, fp32, bf16). min_confidence: see workers.drafters.base.confident."""
    if feature is None:
        feature = is_feature_drafter(path)
    if feature:
        try:
            return FeatureDrafter.load(name, path, target, head_dtype(dtype, placement.device), min_confidence)
        except FileNotFoundError as e:
            raise ValueError(f"drafter {name!r}: cannot load feature drafter {path!r}: {e}") from None
    model = load_model(path, placement, gguf_file, small_batch)
    check_same_vocabulary(tokenizer, target, name, model, path, gguf_file)
    return ModelDrafter(name, model, kept_vocabulary(path), min_confidence)


def kept_vocabulary(path: str) -> list[int] | None:
    """The reduced output vocabulary a distilled drafter was trained on, if it has one."""
    f = Path(path) / VOCAB_FILE
    return json.loads(f.read_text()) if f.is_file() else None
