"""One distillation run end to end (`draftpick distill`): read the training items, optionally let
the target answer them, train the student (`training.distill.Distiller`), validate it on held-out
prompts with the engine."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

MAX_PROMPT_TOKENS = 512  # --generate skips longer training prompts


@dataclass(frozen=True)
class DistillJob:
    target_path: str  # model path as configured (hub id, directory, .gguf, builtin:NAME)
    prompts: str  # training sets (comma-separated) or a JSONL file / Redis stream, see training.datasets
    max_items: int = 2000  # items read from each source
    held_out: int = 8  # items kept out of training for the validation figure
    generate: int = 0  # > 0: the target first answers each training prompt with up to this many tokens
    generate_batch: int = 16
    generate_minutes: float | None = None
    validate_tokens: int = 64  # tokens generated per held-out prompt (0: skip validation)

    def __post_init__(self):
        if self.generate < 0 or self.generate_batch < 1:
            raise ValueError("--generate must be >= 0 and --generate-batch >= 1")
        if self.generate_minutes is not None and self.generate_minutes <= 0:
            raise ValueError("--generate-minutes must be > 0")


def log(msg: str) -> None:
    print(f"distill: {msg}", file=sys.stderr)


def run_distill(job: DistillJob, settings) -> dict:
    """Train the student described by `settings` (training.distill.DistillSettings); returns the
    run's summary, with a "validation" figure unless job.validate_tokens is 0."""
    import torch

    from draftpick.training.datasets import training_items
    from draftpick.training.distill import Distiller
    from draftpick.workers.models import load_model, load_tokenizer, place

    placement = place(settings.device, "fp32")  # training runs in fp32; the teacher may autocast to bf16
    if placement.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the student's fp32 matrix products
    tokenizer = load_tokenizer(job.target_path)
    items = training_items(job.prompts, job.max_items, tokenizer)
    if len(items) <= job.held_out:
        raise ValueError(f"--prompts {job.prompts!r} gave {len(items)} items: need more than --held-out {job.held_out}")
    train, held = items[: len(items) - job.held_out], items[len(items) - job.held_out :]
    target = load_model(job.target_path, placement)
    log(f"{len(train)} training items, {len(held)} held out; target {job.target_path}")
    texts = [it.get("split") or it["text"] for it in train]  # captured traffic: (prompt ids, answer ids)
    if job.generate:
        texts = _answers(job, settings, target, tokenizer, train)
    summary = Distiller(target, tokenizer, texts, settings).run()
    if job.validate_tokens:
        summary["validation"] = _validate(job, settings, target, tokenizer, held)
    return summary


def _answers(job: DistillJob, settings, target, tokenizer, train: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's answer ids) of each short enough training prompt (resumable file)."""
    from draftpick.training.distill import SEQUENCES_FILE, generate_sequences
    from draftpick.workers.inputs import encode_input

    prompts = [ids for ids in (encode_input(tokenizer, it["input"]) for it in train) if len(ids) <= MAX_PROMPT_TOKENS]
    if not prompts:
        raise ValueError(f"--generate: every training prompt is longer than {MAX_PROMPT_TOKENS} tokens")
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    log(f"the target answers {len(prompts)} prompts (up to {job.generate} tokens each)")
    seqs = generate_sequences(target, tokenizer, prompts, Path(settings.out) / SEQUENCES_FILE, job.generate,
                              job.generate_batch, settings.teacher_dtype, minutes=job.generate_minutes)
    return [(seq[: len(p)], seq[len(p) :]) for seq, p in zip(seqs, sorted(prompts, key=len))]


def _validate(job: DistillJob, settings, target, tokenizer, held: list[dict]) -> dict:
    """Mean acceptance length at k = 4 and speed on the held-out prompts, on the CPU engine (where
    the shipped heads serve)."""
    from draftpick.training.distill import validate
    from draftpick.workers.engine import SpeculativeEngine
    from draftpick.workers.factory import load_drafter
    from draftpick.workers.inputs import encode_input
    from draftpick.workers.models import default_verify_pad, place, small_batch_linears

    placement = place("cpu", "fp32")
    if target.device.type != "cpu":
        target = target.to("cpu")  # the same fp32 weights, no second load from disk
        small_batch_linears(target)  # as load_model does on the CPU
    drafter = load_drafter("distilled", settings.out, target, tokenizer, placement)
    engine = SpeculativeEngine(target, tokenizer, {"distilled": drafter}, verify_pad_multiple=default_verify_pad(placement))
    prompts = [encode_input(tokenizer, it["input"])[-512:] for it in held]
    return validate(engine, "distilled", prompts, job.validate_tokens)
