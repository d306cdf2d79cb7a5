"""Model drafters: a small causal LM sharing the target's tokenizer, with its own KV cache.

The session keeps `fed`, the tokens in the drafter's cache. Before each use
the cache is rolled back to the longest prefix of `fed` that is still in the
verified sequence (rejected drafts are dropped, nothing is re-prefilled), and
at most up to the last verified token, whose logits give the next draft.
"""
from __future__ import annotations

import torch

import json
from pathlib import Path

from draftpick.workers.drafters.base import confident, gate_length, gated, matching_prefix
from draftpick.workers.models import (check_same_vocabulary, forward, forward_trimmed, load_model, median_seconds,
                                      new_cache, rollback)
from draftpick.workers.sampling import TokenSampler
from draftpick.workers.verify import acceptance_probability

VOCAB_FILE = "draftpick_vocab.json"  # a distilled drafter's reduced output vocabulary (token ids), if it has one


class ModelDrafter:
    """kept: optional token ids the drafter may propose (a distilled drafter's reduced output
    vocabulary, see training.distill); only their logits are computed."""

    is_model = True
    uses_target_features = False

    def __init__(self, name: str, model, kept: list[int] | None = None, min_confidence: float = 0.0):
        self.name, self.model = name, model
        self.min_confidence = min_confidence  # see workers.drafters.base.confident
        self.kept = torch.tensor(kept, device=model.device) if kept else None
        self.head = model.get_output_embeddings().weight[self.kept].detach().contiguous() if kept else None

    @classmethod
    def load(cls, name: str, path: str, ctx, gguf_file: str | None = None, min_confidence: float = 0.0) -> "ModelDrafter":
        """A causal LM from `path` that must share the target's tokenizer (ctx: workers.drafters.registry.LoadContext)."""
        model = load_model(path, ctx.placement, gguf_file, ctx.small_batch)
        check_same_vocabulary(ctx.tokenizer, ctx.target, name, model, path, gguf_file)
        return cls(name, model, kept_vocabulary(path), min_confidence)

    @classmethod
    def from_config(cls, cfg, ctx) -> "ModelDrafter":
        return cls.load(cfg.name, cfg.path, ctx, cfg.gguf_file, cfg.min_confidence)

    def session(self, tenant: str, prompt_len: int, features=None):
        return ModelSession(self)

    @torch.inference_mode()
    def trace(self, prompt_ids, out, k_max, hidden=None, tenant=""):
        """Teacher-forced in one forward, with the top-1 confidence at each position (so the
        min_confidence gate is exact up to the first rejected draft; past it, it reads the true
        text's confidences)."""
        seq = prompt_ids + out
        logits = self.logits(new_cache(self.model), seq[:-1])  # [L - 1, vocab]
        probs = logits[len(prompt_ids) - 1 :].softmax(-1)  # rows predict out[0..n-1]
        conf, pred = probs.max(-1)
        hits = [int(p) for p in pred.tolist()]
        confidence = conf.tolist()
        proposed, matched = [], []
        for g in range(1, len(out)):
            ahead = confidence[g : g + k_max]
            k = gate_length(ahead, self.min_confidence)
            k = k_max if k == len(ahead) else k  # past the output's end nothing stops the draft
            proposed.append(k)
            matched.append(matching_prefix(hits[g : g + k], out[g:]))
        cache = new_cache(self.model)  # cost of one drafted token: a one-token forward after the context
        forward(self.model, cache, seq[:-1], last_only=True)
        seconds = median_seconds(lambda: self.logits(cache, [seq[-1]], last_only=True), cache, len(seq) - 1, 3)
        return {"proposed": proposed, "matched": matched, "confidence": confidence}, seconds


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

    def propose(self, ids, k, sampler: TokenSampler, threshold: float | None = None):
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
            q = sampler.probs(logits[None], len(ids) + i)[0]  # [vocab]
            x = sampler.draw(q)
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

    def sync(self, ids, start, p, sampler):
        self._align(ids)
        if p is None:
            return None  # lazy: the next propose catches up
        if len(self.fed) > start - 1:  # keep only what precedes the round's first verified token
            rollback(self.cache, start - 1)
            del self.fed[start - 1 :]
        # logits that predict ids[start:] come from feeding ids[start - 1 : -1]
        new = ids[len(self.fed) : len(ids) - 1]
        logits = self._feed(new, last_only=False)[-(len(ids) - start) :]  # [m, vocab]
        q = sampler.probs(logits, start)
        acc = acceptance_probability(p, q).tolist()
        return gated(acc, logits.float().softmax(-1).amax(-1).tolist(), self.d.min_confidence)

    def close(self, ids):
        self.cache = None


def kept_vocabulary(path: str) -> list[int] | None:
    """The reduced output vocabulary a distilled drafter was trained on, if it has one."""
    f = Path(path) / VOCAB_FILE
    return json.loads(f.read_text()) if f.is_file() else None
