"""Build a `SpeculativeEngine` from a validated configuration (loads the models)."""
from __future__ import annotations

import json
from pathlib import Path

from workers.capture import TrafficCapture
from workers.config import DraftpickConfig, ModelDrafterConfig, NgramConfig, SuffixConfig
from workers.distill import VOCAB_FILE
from workers.drafters.model import ModelDrafter
from workers.drafters.ngram import NgramDrafter
from workers.drafters.suffix import SuffixDrafter
from workers.engine import SpeculativeEngine
from workers.models import check_same_vocabulary, load_model, load_tokenizer, place


def build_engine(cfg: DraftpickConfig) -> SpeculativeEngine:
    placement = place(cfg.engine.device, cfg.engine.dtype)
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file)
    target = load_model(cfg.target.path, placement, cfg.target.gguf_file)
    drafters = {}
    for d in cfg.drafters:
        if isinstance(d, NgramConfig):
            drafters[d.name] = NgramDrafter(d.name, d.min_ngram, d.max_ngram)
        elif isinstance(d, SuffixConfig):
            drafters[d.name] = SuffixDrafter(d.name, d.min_ngram, d.max_ngram, d.max_tokens_per_tenant)
        elif isinstance(d, ModelDrafterConfig):
            model = load_model(d.path, placement, d.gguf_file)
            check_same_vocabulary(tokenizer, target, d.name, model, d.path, d.gguf_file)
            drafters[d.name] = ModelDrafter(d.name, model, kept_vocabulary(d.path))
    capture = TrafficCapture(cfg.engine.capture_path, cfg.engine.capture_max_bytes) if cfg.engine.capture_path else None
    pad = cfg.engine.verify_pad_multiple or (4 if placement.device == "cpu" else 1)
    return SpeculativeEngine(target, tokenizer, drafters, full_information=cfg.engine.full_information,
                             capture=capture, verify_pad_multiple=pad)


def kept_vocabulary(path: str) -> list[int] | None:
    """The reduced output vocabulary a distilled drafter was trained on, if it has one."""
    f = Path(path) / VOCAB_FILE
    return json.loads(f.read_text()) if f.is_file() else None
