"""Model drafters: a small causal LM sharing the target's tokenizer, with its own KV cache.

The session keeps `fed`, the tokens in the drafter's cache. Before each use
the cache is rolled back to the longest prefix of `fed` that is still in the
verified sequence (rejected drafts are dropped, nothing is re-prefilled), and
at most up to the last verified token, whose logits give the next draft.
"""
from __future__ import annotations

import torch

from workers.drafters.base import confident, gated
from workers.models import forward, forward_trimmed, new_cache, rollback
from workers.sampling import SamplingParams, probs_from_logits, sample
from workers.verify import acceptance_probability


class ModelDrafter:
    """kept: optional token ids the drafter may propose (a distilled drafter's reduced output
    vocabulary, see workers.distill); only their logits are computed."""

    is_model = True

    def __init__(self, name: str, model, kept: list[int] | None = None, min_confidence: float = 0.0):
        self.name, self.model = name, model
        self.min_confidence = min_confidence  # see workers.drafters.base.confident
        self.kept = torch.tensor(kept, device=model.device) if kept else None
        self.head = model.get_output_embeddings().weight[self.kept].detach().contiguous() if kept else None

    def session(self, tenant: str, prompt_len: int):
        return ModelSession(self)

    def logits(self, cache, tokens: list[int], last_only: bool = False) -> torch.Tensor:
        """float32 [n (or 1), vocab] after `cache`; -inf outside the kept vocabulary, if any."""
        if self.kept is not None:
            return forward_trimmed(self.model, cache, tokens, self.head, self.kept, last_only=last_only)
        return forward(self.model, cache, tokens, last_only=last_only)


class ModelSession:
    def __init__(self, drafter: ModelDrafter):
        self.d = drafter
        self.model = drafter.model
        self.cache = new_cache(drafter.model)
        self.fed: list[int] = []

    def _align(self, ids: list[int]) -> None:
        """Roll back to the common prefix of fed and ids, leaving at least one token of ids to feed."""
        n = 0
        limit = min(len(self.fed), len(ids) - 1)
        while n < limit and self.fed[n] == ids[n]:
            n += 1
        rollback(self.cache, n)
        del self.fed[n:]

    def _feed(self, tokens: list[int], last_only: bool) -> torch.Tensor:
        logits = self.d.logits(self.cache, tokens, last_only=last_only)
        self.fed.extend(tokens)
        return logits

    def propose(self, ids, k, params: SamplingParams, generator, threshold: float | None = None):
        if k <= 0:
            return torch.empty(0, dtype=torch.long), None
        self._align(ids)
        logits = self._feed(ids[len(self.fed) :], last_only=True)[-1]  # [vocab]
        tokens, qs = [], []
        for i in range(k):
            # the drafter's own distribution, before any greedy one-hot warp (gate and confidence stop)
            raw = logits.float().softmax(-1) if self.d.min_confidence > 0 or threshold is not None else None
            if self.d.min_confidence > 0 and not confident(raw, self.d.min_confidence):
                break
            q = probs_from_logits(logits, params)  # [vocab]
            x = int(q.argmax()) if params.greedy else int(sample(q, generator))
            tokens.append(x)
            qs.append(q)
            # confidence stop (SpecDec++ / transformers' assistant_confidence_threshold): the drafter's
            # own probability of its token
            if threshold is not None and float(raw[x]) < threshold:
                break
            if i + 1 < k:
                logits = self._feed([x], last_only=True)[-1]
        if not tokens:
            return torch.empty(0, dtype=torch.long), None
        return torch.tensor(tokens, dtype=torch.long), torch.stack(qs)  # [n], [n, vocab]

    def sync(self, ids, start, p, params):
        self._align(ids)
        if p is None:
            return None  # lazy: the next propose catches up
        if len(self.fed) > start - 1:  # keep only what precedes the round's first verified token
            rollback(self.cache, start - 1)
            del self.fed[start - 1 :]
        # logits that predict ids[start:] come from feeding ids[start - 1 : -1]
        new = ids[len(self.fed) : len(ids) - 1]
        logits = self._feed(new, last_only=False)[-(len(ids) - start) :]  # [m, vocab]
        q = probs_from_logits(logits, params)
        acc = acceptance_probability(p, q).tolist()
        return gated(acc, logits.float().softmax(-1).amax(-1).tolist(), self.d.min_confidence)

    def close(self, ids):
        self.cache = None
