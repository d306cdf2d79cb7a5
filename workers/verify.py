"""Lossless verification of drafted tokens (speculative sampling).

Convention, used everywhere in draftpick:
    p: the TARGET model's probabilities,  q: the DRAFTER's probabilities.

Rule of Leviathan et al. 2023 (https://arxiv.org/abs/2211.17192) and
Chen et al. 2023 (https://arxiv.org/abs/2302.01318). For draft position i with
drafted token x_i:
  - accepted token: x_i is kept with probability min(1, p_i(x_i) / q_i(x_i));
  - recovered token: at the first rejection, a token is drawn from
    norm(max(0, p_i - q_i)) and the round ends;
  - bonus token: when all k drafts are accepted, one more token is drawn from
    p_k, the target's distribution after the last draft.
Every round therefore emits accepted + 1 tokens, and the emitted sequence
follows p exactly. A deterministic drafter (n-gram, suffix) has q one-hot at
its draft (pass draft_probs=None). Greedy decoding is the case where p and q
are one-hot at their argmax: a draft is kept iff it equals the target's argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from draftpick.workers.sampling import sample


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int  # leading drafts kept, 0..k
    tokens: list[int]  # emitted: the accepted drafts + one recovered or bonus token


def verify(
    target_probs: torch.Tensor,  # [k + 1, vocab] p at each draft position and one after
    draft_tokens: torch.Tensor,  # [k] int64 drafted tokens
    draft_probs: torch.Tensor | None,  # [k, vocab] q, or None for a deterministic drafter
    generator: torch.Generator | None = None,
) -> VerifyResult:
    k = draft_tokens.shape[0]
    assert target_probs.shape[0] == k + 1, (target_probs.shape, k)
    if k:
        idx = torch.arange(k)
        p_x = target_probs[idx, draft_tokens]  # [k]
        q_x = torch.ones(k) if draft_probs is None else draft_probs[idx, draft_tokens]  # [k]
        ratio = torch.clamp(p_x / q_x.clamp_min(1e-20), max=1.0)  # [k]
        u = torch.rand(k, generator=generator)  # [k]
        # u < ratio; with ratio == 1 this always holds, which makes greedy exact
        rejected = (u >= ratio).nonzero()
        n = int(rejected[0]) if len(rejected) else k
    else:
        n = 0
    accepted = draft_tokens[:n].tolist()
    if n < k:  # recovered token from the residual distribution
        q = _one_hot(draft_tokens[n], target_probs.shape[1]) if draft_probs is None else draft_probs[n]
        residual = torch.clamp(target_probs[n] - q, min=0.0)  # [vocab]
        mass = residual.sum()
        # mass == 0 only if p == q, where rejection has probability 0; fall back to p
        dist = residual / mass if mass > 0 else target_probs[n]
        return VerifyResult(n, accepted + [int(_draw(dist, generator))])
    return VerifyResult(n, accepted + [int(_draw(target_probs[k], generator))])  # bonus token


def _one_hot(token: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(token, vocab).float()


def _draw(dist: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # a one-hot (greedy) distribution needs no random draw: keep the generator's stream untouched
    best, top = dist.max(-1)  # the first maximum, as argmax (see sampling.first_max)
    return top if best >= 1.0 else sample(dist, generator)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability that a draft from q is accepted against p: sum_x min(p, q) = 1 - TV(p, q).

    p, q: [..., vocab] -> [...]. Under greedy (one-hot p and q) this is 1 iff the argmaxes agree.
    """
    return torch.minimum(p, q.to(p.device)).sum(-1)
