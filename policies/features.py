"""Cheap prompt features for contextual policies (computed once per request at the ingress)."""
from __future__ import annotations

import math

CODE_CHARS = set("{}()[];=_:#<>")
NAMES = ("bias", "log_length", "repetition", "code_chars", "newlines", "temperature", "load")


def prompt_features(text: str, ids: list[int], temperature: float = 0.0, load: int = 1) -> tuple[float, ...]:
    """A small vector in roughly [0, 1]: bias, log length, repeated bigrams (copy-friendliness),
    share of code punctuation, share of newlines, temperature, load."""
    n = max(len(ids), 1)
    bigrams = list(zip(ids, ids[1:]))
    repetition = 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    chars = max(len(text), 1)
    code = sum(c in CODE_CHARS for c in text) / chars
    newlines = text.count("\n") / chars
    return (1.0, min(math.log1p(n) / 8, 1.0), repetition, min(code * 5, 1.0), min(newlines * 10, 1.0),
            min(temperature, 2.0) / 2, min(load, 32) / 32)
