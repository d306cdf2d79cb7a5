"""The drafter interface: propose k tokens, then stay in sync with what was verified.

A `Drafter` is shared by all requests of a worker; `session(tenant, prompt_len,
features)` gives the per-request state (a model drafter's KV cache, for instance).
Two methods do the work, as in transformers' candidate generators:

  1. `propose(ids, k, sampler)` -> draft tokens [<= k] and their probabilities q [<= k, vocab]
                                   (None for a deterministic drafter: q is one-hot);
  2. `sync(ids, start, p, sampler)` -> after verification, catch up with the verified ids and,
                                   when `p` (the target's distributions at the round's
                                   verified positions) is given, return this drafter's
                                   per-position acceptance on them (full-information feedback).

`sampler` (workers.sampling.TokenSampler) is the request's: its `probs(logits, start)` warps a
drafter's logits for sequence positions start, start + 1, ... and `draw` picks a token, so a
seeded request's drafts use the same position-keyed noise as the target.

`trace(prompt_ids, out, k_max, hidden)` is the hook `draftpick record` uses: what this drafter
would propose at every position of a fixed output (see workers.record).

Drafter types are built from configuration by `workers.drafters.registry` (keyed by `type`).
"""
from __future__ import annotations

import time
from typing import Protocol

import torch

from draftpick.workers.sampling import TokenSampler


class DraftSession(Protocol):
    def propose(
        self, ids: list[int], k: int, sampler: TokenSampler, threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids: the verified sequence (prompt + output). Returns ([n] int64, [n, vocab] or None), n <= k.
        threshold: stop after a drafted token whose probability under the drafter is below it
        (model drafters only; deterministic drafters have no confidence and ignore it)."""
        ...

    def sync(self, ids: list[int], start: int, p: torch.Tensor | None, sampler: TokenSampler) -> list[float] | None:
        """ids[start:] were verified this round; p: [len(ids) - start, vocab] target probs there (or None)."""
        ...

    def close(self, ids: list[int]) -> None:
        """The request ended with `ids`; release per-request state."""
        ...


class Drafter(Protocol):
    name: str
    is_model: bool  # True when drafting runs a neural network (its sync costs a forward)
    uses_target_features: bool  # True when sessions read the target's hidden states (feature drafters)

    def session(self, tenant: str, prompt_len: int, features=None) -> DraftSession:
        """features: the request's workers.drafters.feature.TargetFeatures, or None when no
        drafter of the engine uses them."""
        ...

    def trace(self, prompt_ids: list[int], out: list[int], k_max: int, hidden: torch.Tensor | None,
              tenant: str = "") -> tuple[dict, float]:
        """For g = 1..len(out) - 1: how many tokens this drafter proposes (greedy) after
        prompt_ids + out[:g], at most k_max, and how many of them match out[g:] (the trace format's
        per-drafter object, workers.trace); plus its seconds per drafted token. hidden: the
        target's hidden states of prompt_ids + out[:-1]. Ends as a served request of `tenant` would."""
        ...


def confident(probs: torch.Tensor, min_confidence: float) -> bool:
    """A model drafter's gate (its `min_confidence` option): draft at a position only if the
    drafter's top-1 probability there (probs: its unwarped distribution) reaches min_confidence;
    the draft ends before the first position that does not, so a round may draft nothing and
    run as plain decoding. The gate reads the distribution, never the drawn token, so each kept
    draft is still distributed as q and sampled output stays exact (a gate on the drawn token's
    own probability would skew the kept drafts toward likely tokens)."""
    return min_confidence <= 0 or float(probs.max()) >= min_confidence


def gate_length(top: list[float], min_confidence: float) -> int:
    """How many leading positions the gate lets a drafter draft, given its top-1 probability at
    each (`confident` on probabilities already reduced to their maximum)."""
    n = 0
    while n < len(top) and (min_confidence <= 0 or top[n] >= min_confidence):
        n += 1
    return n


def gated(acceptance: list[float], top: list[float], min_confidence: float) -> list[float]:
    """Full-information acceptance as the gate would have drafted: positions from the first one
    whose top-1 probability (top) is below min_confidence were not drafted; one 0 marks the end."""
    n = gate_length(top[: len(acceptance)], min_confidence)
    return acceptance if n == len(acceptance) else acceptance[:n] + [0.0]


class LookupDrafter:
    """Shared logic of deterministic (model-free) drafters, whose sessions are LookupSessions."""

    is_model = False
    uses_target_features = False

    def trace(self, prompt_ids, out, k_max, hidden=None, tenant=""):
        session = self.session(tenant, len(prompt_ids))
        proposed, matched = [], []
        t0 = time.perf_counter()
        for g in range(1, len(out)):
            draft = session.lookup(prompt_ids + out[:g], k_max)
            proposed.append(len(draft))
            matched.append(matching_prefix(draft, out[g:]))
        spent = time.perf_counter() - t0
        session.close(prompt_ids + out)  # e.g. the suffix index learns the output, as when a request ends
        return {"proposed": proposed, "matched": matched}, spent / max(len(out) - 1, 1) / max(k_max, 1)


def matching_prefix(draft: list[int], truth: list[int]) -> int:
    """How many leading tokens of draft equal truth's."""
    m = 0
    while m < len(draft) and m < len(truth) and draft[m] == truth[m]:
        m += 1
    return m


class LookupSession:
    """Shared logic of deterministic (model-free) drafters: acceptance is measured by re-proposing."""

    def lookup(self, ids: list[int], k: int) -> list[int]:
        raise NotImplementedError

    def propose(self, ids, k, sampler, threshold=None):
        return torch.tensor(self.lookup(ids, k), dtype=torch.long), None

    def sync(self, ids, start, p, sampler):
        if p is None:
            return None
        emitted = ids[start:]
        draft = self.lookup(ids[:start], len(emitted))
        out: list[float] = []
        # a deterministic draft is accepted with probability p(draft); under greedy that is 0 or 1.
        # After the first draft that differs from the verified token, later drafts were made on a
        # wrong prefix, so the list stops there.
        for j, tok in enumerate(draft):
            out.append(float(p[j, tok]))
            if tok != emitted[j]:
                return out
        if len(draft) < len(emitted):
            out.append(0.0)  # the proposal ended: nothing more would have been accepted
        return out

    def close(self, ids):
        pass


def draft_chooser(ids: list[int], sampler: TokenSampler, threshold: float | None, gate: float, qs: list):
    """How a model or feature drafter's propose(ids, ..) picks its i-th drafted token from its
    logits [vocab]: nothing where its top-1 probability is below `gate` (its min_confidence), else
    a draw from the request's sampler at sequence position len(ids) + i (its q appended to qs), and
    whether to draft another after it (the confidence stop: the drafter's own probability of the
    token at least `threshold`). choose(i, logits) -> (token or None, go on)."""

    def choose(i, logits):
        raw = logits.float().softmax(-1) if gate > 0 or threshold is not None else None
        if gate > 0 and not confident(raw, gate):
            return None, False
        q = sampler.probs(logits[None], len(ids) + i)[0]
        qs.append(q)
        x = sampler.draw(q)
        return x, threshold is None or float(raw[x]) >= threshold

    return choose


def proposal(tokens: list[int], qs: list[torch.Tensor]):
    """propose()'s answer: (tokens [d], q [d, vocab]), or (empty, None) for no draft."""
    if not tokens:
        return torch.empty(0, dtype=torch.long), None
    return torch.tensor(tokens, dtype=torch.long), torch.stack(qs)


def draft_together(asks: list, gate: float, first, advance) -> list:
    """The draft loop of a drafter's propose_batch: several requests' drafts, a draft step for all
    of them at a time. asks: (session, ids, k, sampler, threshold) per request; first(active) ->
    logits [len(active), vocab] of the requests with k > 0 (indices into asks), after their
    catch-up; advance(going, tokens) -> logits [len(going), vocab] after feeding each request in
    `going` its last drafted token. Each token is picked as the request's own propose() would
    (draft_chooser). Returns propose()'s answer per request."""
    qs: list[list[torch.Tensor]] = [[] for _ in asks]
    tokens: list[list[int]] = [[] for _ in asks]
    choose = [draft_chooser(ids, sampler, threshold, gate, qs[i])
              for i, (_, ids, _, sampler, threshold) in enumerate(asks)]
    active = [i for i, ask in enumerate(asks) if ask[2] > 0]
    logits = first(active) if active else None
    step = 0
    while active:
        going = []
        for row, i in enumerate(active):
            x, go_on = choose[i](step, logits[row])
            if x is None:
                continue
            tokens[i].append(x)
            if go_on and step + 1 < asks[i][2]:
                going.append(i)
        if going:
            logits = advance(going, [tokens[i][-1] for i in going])
        active, step = going, step + 1
    return [proposal(t, q) for t, q in zip(tokens, qs)]
