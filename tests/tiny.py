"""Tiny real models and a tiny real tokenizer, built in-process for fast tests."""
from __future__ import annotations

import copy
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = string.ascii_lowercase + " .,:\n()=+_0123456789"
EOS = "<eos>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, id 0 = <eos>."""
    vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    return fast


VOCAB = len(CHARS) + 1


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = VOCAB, scale: float = 0.2) -> LlamaForCausalLM:
    """A random Llama small enough to run hundreds of generations per second on a CPU.

    `scale` sets the init std: larger values give peaked, repetitive distributions (like a real
    small LM's greedy output), so n-gram drafters find matches.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=0, bos_token_id=None, pad_token_id=None, initializer_range=scale, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_sliding_model(seed: int = 0, window: int = 8, hidden: int = 64):
    """A random Mistral whose attention sees only the last `window` tokens (sliding-window cache layers)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, sliding_window=window,
        eos_token_id=0, bos_token_id=None, pad_token_id=None, initializer_range=0.2, tie_word_embeddings=False,
    )
    return MistralForCausalLM(cfg).eval()


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    """A drafter that agrees with `model` often but not always."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return m


def chi2_pvalue(counts, probs) -> float:
    """Chi-square goodness of fit of observed counts to probabilities; cells expected < 5 are pooled."""
    import numpy as np
    from scipy.stats import chisquare

    counts = np.asarray(counts, dtype=float)
    probs = np.asarray(probs, dtype=float)
    probs = probs / probs.sum()
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    if len(counts) < 2:
        return 1.0
    return float(chisquare(counts, expected).pvalue)


def save_models(root, target, tokenizer, close_noise: float | None = 0.05):
    """Write the target (with its tokenizer) and, optionally, a close drafter under root."""
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    if close_noise is not None:
        noisy_copy(target, close_noise).save_pretrained(root / "close")
    return root


FEATURE_PROMPTS = ["def add(a, b):\n", "the cat sat", "x = 1\n", "hello there", "ab", "q", "import os\n"]


def feature_drafter(target, tokenizer, out, prompts=FEATURE_PROMPTS, steps: int = 600, seed: int = 0):
    """Distil a feature (EAGLE-like) head for `target` on its own greedy text; returns `out`.

    The text is what the target writes after a few prompts, so the head learns what the engine
    will ask of it; a couple of seconds on a tiny model."""
    from draftpick.training.distill import DistillSettings, Distiller

    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        gen = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=120, min_new_tokens=120)[0]
        texts.append(tokenizer.decode(gen))
    settings = DistillSettings(out=str(out), init="feature", steps=steps, seq_len=48, batch=8, lr=1e-2,
                               vocab=VOCAB, seed=seed, checkpoint_every=10_000)
    Distiller(target, tokenizer, texts * 4, settings, progress=False).run()
    return out


def service_config(root, **sections):
    """The configuration the service tests serve: the tiny target saved under `root` (save_models),
    an n-gram and a model drafter, ucb1 over k in {1, 3}; `sections` override whole sections."""
    from draftpick.workers.config import DraftpickConfig

    return DraftpickConfig.model_validate({
        "target": {"name": "tiny", "path": str(root / "target")},
        "drafters": [{"type": "ngram"}, {"type": "model", "name": "close", "path": str(root / "close")}],
        "engine": {"device": "cpu"}, "policy": {"name": "ucb1", "ks": [1, 3]}, **sections})
