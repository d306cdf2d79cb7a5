"""The feature drafter at serving time: drafts from the request's target hidden states (`TargetFeatures`)."""
from __future__ import annotations

from pathlib import Path

import torch

from draftpick.workers.drafters.base import draft_chooser, draft_together, gate_length, gated, matching_prefix, proposal
from draftpick.workers.drafters.feature.head import FeatureHead
from draftpick.workers.drafters.feature.lean import LeanCache, LeanHead, supports_lean
from draftpick.workers.drafters.feature.storage import load_head
from draftpick.workers.models import DTYPES, kept_logits, median_seconds, new_cache, rollback
from draftpick.workers.verify import acceptance_probability


class TargetFeatures:
    """The target's last hidden states of a request's verified tokens: rows[j] is f_j for ids[j],
    for every verified token but the pending last one (written by the engine). Appends go into a
    buffer that doubles when full, so a long request does not copy its history every round."""

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> torch.Tensor | None:
        return None if self._buf is None else self._buf[: self._n]

    @rows.setter
    def rows(self, value: torch.Tensor) -> None:
        self._buf, self._n = value.detach().float(), value.shape[0]

    def append(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().float()
        need = self._n + hidden.shape[0]
        if self._buf is None or need > self._buf.shape[0]:
            grown = hidden.new_empty((max(need, 2 * self._n, 64), hidden.shape[1]))
            if self._n:
                grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = hidden
        self._n = need


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (else torch emulates it, several times slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def head_dtype(dtype: str, device: str) -> torch.dtype:
    """A feature head's arithmetic: fp32, bf16, or auto (bf16 where it is native: CUDA or such a CPU)."""
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" or native_bf16_cpu() else "fp32"
    return DTYPES[dtype]


class FeatureDrafter:
    is_model = True
    uses_target_features = True  # the engine passes each session the request's TargetFeatures

    def __init__(self, name: str, head: FeatureHead, target, kept: list[int], dtype: torch.dtype = torch.float32,
                 min_confidence: float = 0.0):
        # dtype: the head's arithmetic and output rows. bf16 halves the bytes a draft reads (on a CPU,
        # drafting is bound by them); logits and draft probabilities stay float32
        self.name, self.dtype, self.head = name, dtype, head.to(target.device, dtype).eval()
        self.min_confidence = min_confidence  # see workers.drafters.base.confident
        # drafting runs the layer without transformers' per-call machinery where it can (workers.drafters.lean)
        self.lean = LeanHead(self.head) if supports_lean(self.head) else None
        self.embed = target.get_input_embeddings()
        self.kept = torch.tensor(kept, device=target.device)
        self.out_rows = target.get_output_embeddings().weight[self.kept].detach().to(dtype).contiguous()
        self.vocab_size = target.config.vocab_size

    @classmethod
    def load(cls, name: str, path: str, target, dtype: torch.dtype = torch.float32,
             min_confidence: float = 0.0) -> "FeatureDrafter":
        try:
            head, kept = load_head(path, target)
        except FileNotFoundError as e:
            raise ValueError(f"drafter {name!r}: cannot load feature drafter {path!r}: {e}") from None
        return cls(name, head, target, kept, dtype, min_confidence)

    @classmethod
    def from_config(cls, cfg, ctx) -> "FeatureDrafter":
        return cls.load(cfg.name, cfg.path, ctx.target, head_dtype(cfg.dtype, ctx.placement.device), cfg.min_confidence)

    def session(self, tenant: str, prompt_len: int, features: TargetFeatures | None = None):
        if features is None:
            raise ValueError(f"feature drafter {self.name!r} needs the target's hidden states (engine passes them)")
        return FeatureSession(self, features)

    @torch.inference_mode()
    def trace(self, prompt_ids, out, k_max, hidden=None, tenant=""):
        """A feature drafter drafts from predicted features beyond the verified token, so teacher
        forcing would overstate it: each position's greedy draft of k_max tokens is run as the
        engine runs it. draft_confidence[g - 1][j]: its probability of its j-th drafted token."""
        features = TargetFeatures()
        session = self.session(tenant, len(prompt_ids), features)
        proposed, matched, confidence = [], [], []
        for g in range(1, len(out)):
            verified = prompt_ids + out[:g]
            features.rows = hidden[: len(verified) - 1]
            confs: list[float] = []

            def choose(i, logits):
                probs = logits.softmax(-1)
                confs.append(float(probs.max()))
                return int(probs.argmax()), True

            draft, _ = session.draft(verified, len(verified) - 1, k_max, choose)
            draft = draft[: gate_length(confs, self.min_confidence)]  # the gate ends a draft early
            proposed.append(len(draft))
            matched.append(matching_prefix(draft, out[g:]))
            confidence.append(confs)
        cache = session.cache  # cost of one drafted token: one head step on a predicted feature, plus its logits
        keep, h = cache.get_seq_length(), hidden[-1:]
        seconds = median_seconds(lambda: self.logits(self.step(cache, h, [out[-1]])), cache, keep, 3)
        return {"proposed": proposed, "matched": matched, "draft_confidence": confidence}, seconds

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted features [n, d] -> float32 logits [n, vocab], -inf outside the kept vocabulary."""
        return kept_logits(h.to(self.dtype), self.out_rows, self.kept, self.vocab_size)

    @torch.inference_mode()
    def propose_batch(self, asks: list[tuple["FeatureSession", list[int], int, object, float | None]]) -> list:
        """FeatureSession.propose for several requests at once, asks: (session, ids, k, sampler,
        threshold) each. The requests' catch-ups on their verified tokens run in one call of the
        head's layer (LeanHead.step_rows), then every draft step runs the layer and the output rows
        once for all the requests still drafting: the weights are read once a step instead of once
        a request. Each token is chosen by the request's own sampler, gate and threshold, as alone
        (workers.drafters.base.draft_together); a head without the lean path drafts them one by one."""
        if self.lean is None:
            return [s.propose(ids, k, sampler, threshold) for s, ids, k, sampler, threshold in asks]
        h: dict[int, torch.Tensor] = {}

        def first(active):
            for i in active:
                asks[i][0]._check(len(asks[i][1]) - 1)
            h.update(zip(active, self.catch_up([asks[i][0] for i in active], [asks[i][1] for i in active],
                                               [len(asks[i][1]) - 1 for i in active])))
            return self.logits(torch.cat([h[i] for i in active]))

        def advance(going, tokens):
            feats = torch.cat([h[i] for i in going]).to(self.dtype)
            emb = self.embed(torch.tensor(tokens, device=feats.device)).to(self.dtype)
            out = self.lean.step_rows(feats, emb, [asks[i][0].cache for i in going])
            h.update((i, out[row: row + 1]) for row, i in enumerate(going))
            return self.logits(out)

        return draft_together(asks, self.min_confidence, first, advance)

    @torch.inference_mode()
    def catch_up(self, sessions: list["FeatureSession"], ids: list[list[int]], upto: list[int]) -> list[torch.Tensor]:
        """Each session's draft entries dropped and its true pairs fed up to entry upto - 1 (needs
        upto <= len(features)), the sessions' new rows in one call of the lean layer (one by one
        without it); returns each one's predicted feature [1, d] that drafts ids[upto + 1]."""
        feed = []  # (session, its true features, its tokens) to feed
        for s, toks, u in zip(sessions, ids, upto):
            rollback(s.cache, s.fed)  # drop the previous draft's speculative entries
            if u > s.fed:
                feed.append((s, s.features.rows[s.fed: u], toks[s.fed + 1: u + 1]))
        if feed and self.lean is not None:
            emb = self.embed(torch.tensor([t for _, _, toks in feed for t in toks], device=self.kept.device))
            out = self.lean.step_rows(torch.cat([r for _, r, _ in feed]).to(self.dtype), emb.to(self.dtype),
                                      [s.cache for s, _, _ in feed], [len(r) for _, r, _ in feed])
            ends = torch.tensor([len(r) for _, r, _ in feed]).cumsum(0) - 1
            for (s, _, _), end in zip(feed, ends.tolist()):
                s.h_last = out[end: end + 1]
        else:
            for s, rows, toks in feed:
                s.h_last = self.step(s.cache, rows, toks)[-1:]
        for s, _, toks in feed:
            s.fed += len(toks)
        return [s.h_last for s in sessions]

    def new_cache(self):
        return LeanCache() if self.lean is not None else new_cache(self.head.body)

    @torch.inference_mode()
    def step(self, cache, feats: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Feed pairs (feats[i], tokens[i]) after `cache`; returns the predicted features [n, d]."""
        emb = self.embed(torch.tensor(tokens, device=feats.device)).to(self.dtype)  # [n, d]
        if self.lean is not None:
            return self.lean(feats.to(self.dtype), emb, cache)
        return self.head(feats[None].to(self.dtype), emb[None], cache)[0]


class FeatureSession:
    """Cache entry j holds the pair (f_j, x_{j+1}); `fed` entries hold true features."""

    def __init__(self, drafter: FeatureDrafter, features: TargetFeatures):
        self.d, self.features = drafter, features
        self.cache = drafter.new_cache()
        self.fed = 0
        self.h_last: torch.Tensor | None = None  # output of entry fed - 1: predicts f_fed

    def _catch_up(self, ids: list[int], upto: int) -> torch.Tensor:
        """Feed the true pairs up to entry upto - 1 (needs upto <= len(features)); returns the
        predicted feature [1, d] that drafts ids[upto + 1]."""
        return self.d.catch_up([self], [ids], [upto])[0]

    def draft(self, ids: list[int], upto: int, n: int, choose) -> tuple[list[int], list[torch.Tensor]]:
        """Draft up to n tokens after ids[: upto + 1]. choose(i, logits) -> (token, go_on): the
        i-th token given the drafter's logits (None: draft nothing there), and whether to draft
        another after it."""
        h = self._catch_up(ids, upto)
        tokens, logits_list = [], []
        for i in range(n):
            logits = self.d.logits(h)[0]
            x, go_on = choose(i, logits)
            if x is None:
                break
            tokens.append(x)
            logits_list.append(logits)
            if not go_on or i + 1 == n:
                break
            h = self.d.step(self.cache, h, [x])
        return tokens, logits_list

    def propose(self, ids, k, sampler, threshold=None):
        if k <= 0:
            return torch.empty(0, dtype=torch.long), None
        qs: list[torch.Tensor] = []
        self._check(len(ids) - 1)
        tokens, _ = self.draft(ids, len(ids) - 1, k, draft_chooser(ids, sampler, threshold, self.d.min_confidence, qs))
        return proposal(tokens, qs)

    def sync(self, ids, start, p, sampler):
        if p is None:
            return None  # lazy: the next propose catches up
        # what this drafter would have proposed from ids[:start], given each earlier draft was accepted
        self._check(start - 1)
        emitted = ids[start:]
        _, logits = self.draft(ids, start - 1, len(emitted), lambda i, lg: (emitted[i], True))
        logits = torch.stack(logits)
        acc = acceptance_probability(p, sampler.probs(logits, start)).tolist()
        return gated(acc, logits.softmax(-1).amax(-1).tolist(), self.d.min_confidence)

    def _check(self, upto: int) -> None:
        if len(self.features) < upto:
            raise RuntimeError(f"target features cover {len(self.features)} tokens, the draft needs {upto}")

    def close(self, ids):
        self.cache = None
