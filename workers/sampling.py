"""Sampling parameters, the logits -> probabilities warp, and how a request draws its tokens.

Two ways to draw, both exactly the target's distribution:
- a request without a seed draws from its own `torch.Generator` (the standard speculative
  sampling rule of workers.verify: accept a draft with probability min(1, p / q));
- a request with a seed draws the token at sequence position t by Gumbel-max over the warped
  distribution with noise keyed by (seed, t) only: token_t = argmax_x p_t(x) / E_t(x), E_t(x)
  i.i.d. Exp(1) (the same as argmax log p + Gumbel). Drafters propose with the same noise, and a
  draft is accepted iff it equals that token. The output is then a function of (prompt,
  parameters, seed) alone: whichever drafter, k or load served it, however often it is asked.
  `TokenSampler.probs` expresses that as one-hot distributions at the coupled tokens, so the
  verify rule and the full-information acceptance need no special case (as for greedy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = 1e-5  # below this (and above 0) logits / temperature overflow: use 0 (greedy)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy (argmax)."""

    max_tokens: int = 64  # generated tokens at most (the first token from prefill included)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # makes the output a function of (prompt, parameters, seed), see above
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (excluded from text)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("top_k", self.top_k, low=0)
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def first_max(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1): the index of the first maximum (NaN counting as one), as `max`'s indices give it,
    about 2.5 times faster on a vocabulary row on the CPU (a few such calls run every round)."""
    return x.max(-1).indices


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits into the distribution tokens are drawn from: temperature, then top-k, then
    top-p, as transformers' logits processors do (same order, same tie-breaking).

    logits: [..., vocab]. Returns float32 probabilities of the same shape. Under greedy decoding
    the result is one-hot at the argmax, so that the verify rule needs no special case for it.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(first_max(logits), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # transformers' TopPLogitsWarper: sort ascending, drop the low tail whose mass is at most
        # 1 - top_p, always keep the most likely token; the same sort breaks exact ties the same way
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - params.top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row. probs: [..., vocab] -> [...] (int64), on the generator's device.

    A request's generator lives on the CPU (seeded streams do not depend on the device), so
    probabilities computed on a GPU are drawn from there."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])


def _mix(seed: int, position: int) -> int:
    """A 63-bit generator seed for (request seed, position) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & MAX_SEED
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    return (z ^ (z >> 31)) >> 1


class TokenSampler:
    """How one request turns logits into tokens: the warp of its SamplingParams and its randomness.

    probs(logits, start): rows of logits predict the tokens at sequence positions start, start + 1, ...
    (the position of a token in prompt + output). Greedy and seeded requests get one-hot rows at the
    token the target (or a drafter, with the same noise) picks there; unseeded sampling gets the
    warped distribution, drawn from with `draw` and the request's generator.
    """

    def __init__(self, params: SamplingParams, rng_seed: int | None = None):
        """rng_seed: the random stream of an unseeded request (the standard rule's draws; None:
        fresh entropy). It never changes a seeded request, whose output its seed alone decides."""
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(_mix(params.seed, -1))  # unused by the seeded rule; kept deterministic
        elif rng_seed is not None:
            self.generator.manual_seed(rng_seed)
        else:
            self.generator.seed()
        self._noise: dict[int, torch.Tensor] = {}

    @property
    def coupled(self) -> bool:
        """Seeded sampling: tokens come from position-keyed noise (see the module docstring)."""
        return self.params.seed is not None and not self.params.greedy

    def probs(self, logits: torch.Tensor, start: int) -> torch.Tensor:
        """logits [n, vocab] -> [n, vocab] float32 on the CPU."""
        p = probs_from_logits(logits, self.params).cpu()
        if not self.coupled:
            return p
        noise = torch.stack([self.exponential(start + i, p.shape[-1]) for i in range(p.shape[0])])  # [n, vocab]
        return torch.nn.functional.one_hot(first_max(p / noise), p.shape[-1]).float()

    def draw(self, p: torch.Tensor) -> int:
        """One token from one row of `probs` (its argmax when the row is one-hot)."""
        return int(first_max(p)) if self.params.greedy or self.coupled else int(sample(p, self.generator))

    def exponential(self, position: int, vocab: int) -> torch.Tensor:
        """Exp(1) noise [vocab] of this request's seed at a sequence position (cached while in use)."""
        e = self._noise.get(position)
        if e is None or e.shape[0] != vocab:
            g = torch.Generator().manual_seed(_mix(self.params.seed, position))
            e = torch.empty(vocab).exponential_(generator=g).clamp_min_(1e-30)  # p / e: no 0 / 0
            self._noise[position] = e
        return e

    def forget(self, below: int) -> None:
        """Drop cached noise of positions below `below` (already verified)."""
        for pos in [p for p in self._noise if p < below]:
            del self._noise[pos]
