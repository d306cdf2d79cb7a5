"""Build a `SpeculativeEngine` from a validated configuration (loads the models)."""
from __future__ import annotations

from draftpick.workers.capture import RedisStreamCapture, TrafficCapture
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.drafters.feature import FeatureDrafter, head_dtype, is_feature_drafter
from draftpick.workers.drafters.model import ModelDrafter
from draftpick.workers.drafters.registry import LoadContext, build_drafter
from draftpick.workers.engine import SpeculativeEngine
from draftpick.workers.models import default_verify_pad, load_model, load_tokenizer, place


def build_engine(cfg: DraftpickConfig) -> SpeculativeEngine:
    """The engine of a configuration, with its traffic capture (if configured) attached as a sink."""
    placement = place(cfg.engine.device, cfg.engine.dtype)
    tokenizer = load_tokenizer(cfg.target.path, cfg.target.gguf_file)
    small_batch = cfg.engine.small_batch_linears
    target = load_model(cfg.target.path, placement, cfg.target.gguf_file, small_batch)
    ctx = LoadContext(target, tokenizer, placement, small_batch)
    drafters = {d.name: build_drafter(d, ctx) for d in cfg.drafters}
    pad = cfg.engine.verify_pad_multiple or default_verify_pad(placement, small_batch)
    played_only = {d.name for d in cfg.drafters if not getattr(d, "full_information", True)}
    engine = SpeculativeEngine(target, tokenizer, drafters, full_information=cfg.engine.full_information,
                               verify_pad_multiple=pad, played_only=played_only, counterfactual_k=cfg.engine.max_k,
                               prefix_blocks=cfg.engine.prefix_cache_blocks)
    capture = capture_sink(cfg)
    if capture is not None:
        engine.add_sink(capture)
    return engine


def capture_sink(cfg: DraftpickConfig):
    """The opt-in traffic capture of the configuration (a file or a Redis stream), or None."""
    if cfg.engine.capture_path:
        return TrafficCapture(cfg.engine.capture_path, cfg.engine.capture_max_bytes)
    if cfg.engine.capture_stream:
        return RedisStreamCapture(cfg.engine.capture_stream, cfg.engine.capture_max_entries)
    return None


def load_drafter(name: str, path: str, target, tokenizer, placement, gguf_file: str | None = None,
                 feature: bool | None = None, dtype: str = "auto", min_confidence: float = 0.0,
                 small_batch: bool = True):
    """A neural drafter from a directory: a feature head (EAGLE-like) or a causal LM sharing the
    target's tokenizer. feature=None: decided by the directory's contents. dtype: a feature
    head's arithmetic (auto, fp32, bf16). min_confidence: see workers.drafters.base.confident."""
    if feature is None:
        feature = is_feature_drafter(path)
    if feature:
        return FeatureDrafter.load(name, path, target, head_dtype(dtype, placement.device), min_confidence)
    return ModelDrafter.load(name, path, LoadContext(target, tokenizer, placement, small_batch), gguf_file, min_confidence)
