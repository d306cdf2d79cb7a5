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

from draftpick.workers.batched import batchable, batched_forward
from draftpick.workers.drafters.base import draft_chooser, draft_together, gate_length, gated, matching_prefix, proposal
from draftpick.workers.models import (check_same_vocabulary, forward, forward_trimmed, kept_logits, load_model,
                                      median_seconds, new_cache, rollback)
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


    @torch.inference_mode()
    def propose_batch(self, asks: list[tuple["ModelSession", list[int], int, TokenSampler, float | None]]) -> list:
        """ModelSession.propose for several requests at once, asks: (session, ids, k, sampler,
        threshold) each: their catch-ups, then each draft step, in one forward of the drafter for all
        of them (workers.batched: the weights read once a step, attention per request against its
        own cache); each token chosen by the request's own sampler, gate and threshold, as alone.
        A drafter that `batchable` refuses drafts them one by one."""
        if not batchable(self.model):
            return [s.propose(ids, k, sampler, threshold) for s, ids, k, sampler, threshold in asks]
        head = None if self.kept is None else (
            lambda h: kept_logits(h, self.head, self.kept, self.model.config.vocab_size))

        def feed(sessions, tokens):
            outs = batched_forward(self.model, [s.cache for s in sessions], tokens, [True] * len(tokens), head=head)
            for s, t in zip(sessions, tokens):
                s.fed.extend(t)
            return torch.cat([lg for lg, _ in outs])  # [len(sessions), vocab]

        def first(active):
            for i in active:
                asks[i][0]._align(asks[i][1])
            return feed([asks[i][0] for i in active], [asks[i][1][len(asks[i][0].fed):] for i in active])

        def advance(going, tokens):
            return feed([asks[i][0] for i in going], [[t] for t in tokens])

        return draft_together(asks, self.min_confidence, first, advance)

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
        # the gate, the request's sampler and the confidence stop (SpecDec++ / transformers'
        # assistant_confidence_threshold: the drafter's own probability of its token)
        choose = draft_chooser(ids, sampler, threshold, self.d.min_confidence, qs)
        for i in range(k):
            x, go_on = choose(i, logits)
            if x is None:
                break
            tokens.append(x)
            if not go_on or i + 1 == k:
                break
            logits = self._feed([x], last_only=True)[-1]
        return proposal(tokens, qs)  # [n], [n, vocab]

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
