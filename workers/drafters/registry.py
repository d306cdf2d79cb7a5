"""Drafter types by the configuration's `type`: each class builds itself with `from_config(cfg, ctx)`.

A new drafter type is one module with a class following workers.drafters.base.Drafter, a
pydantic section in workers.config (its `type` literal) and one line in TYPES below.
"""
from __future__ import annotations

from dataclasses import dataclass

from draftpick.workers.drafters.feature import FeatureDrafter
from draftpick.workers.drafters.model import ModelDrafter
from draftpick.workers.drafters.ngram import NgramDrafter
from draftpick.workers.drafters.suffix import SuffixDrafter

TYPES: dict[str, type] = {"ngram": NgramDrafter, "suffix": SuffixDrafter, "model": ModelDrafter,
                          "feature": FeatureDrafter}


@dataclass(frozen=True)
class LoadContext:
    """What building a drafter may need: the loaded target, its tokenizer, where models run."""

    target: object
    tokenizer: object
    placement: object  # workers.models.Placement
    small_batch: bool = True  # workers.models.small_batch_linears for CPU fp32 models


def build_drafter(cfg, ctx: LoadContext):
    """A drafter from its validated configuration section (workers.config.DrafterConfig)."""
    try:
        cls = TYPES[cfg.type]
    except KeyError:
        raise ValueError(f"drafter {cfg.name!r}: unknown type {cfg.type!r} (known: {', '.join(TYPES)})") from None
    return cls.from_config(cfg, ctx)
