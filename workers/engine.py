"""The speculative decoding engine: draft -> verify -> accept, on one target and many drafters.

Testable without Ray: `SpeculativeEngine.generate()` runs a request to the
end; `SpeculativeEngine.start()` returns a `Generation` that advances one
round per `step()`, which the Ray worker uses to interleave concurrent
requests and stream their tokens.

KV caches: the target's cache always holds every verified token but the last
one (the "pending" token, whose logits the next round needs). A round feeds
[pending] + drafts, so one forward scores all k drafts and yields the bonus
distribution; positions of rejected drafts are cropped afterwards, never
re-prefilled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from policies.types import Arm, Choice, RoundRecord
from workers.drafters.base import Drafter
from workers.drafters.feature import TargetFeatures
from workers.drafters.none import NoneDrafter
from workers.models import forward, new_cache, rollback, verify_forward
from workers.sampling import SamplingParams, probs_from_logits, sample
from workers.verify import acceptance_probability, verify

# (generation in progress) -> the next round's choice: arm, propensity, optional confidence threshold
RoundChooser = Callable[["Generation"], Choice]


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, up to and including the one that ended generation
    text: str  # decoded output, cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_tokens)
    records: list[RoundRecord]
    generate_s: float  # wall seconds from prefill to the last token (models already loaded)
    prefill_s: float

    def metrics(self) -> dict:
        return spec_decode_metrics(self.records)

    def to_json(self, request_id=None) -> dict:
        """The documented per-request output of `draftpick generate --json` and the worker."""
        metrics = self.metrics()
        timing = {k: metrics.pop(k) for k in ("draft_s", "verify_s", "sync_s")}
        return {
            "id": request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "timing": {"generate_s": self.generate_s, "prefill_s": self.prefill_s, **timing},
            "metrics": {"speculative_decoding": metrics},
        }


def spec_decode_metrics(records: list[RoundRecord]) -> dict:
    """Per-request speculative decoding metrics, with vLLM's names.

    num_spec_steps counts every decoding round (each target forward after the
    prefill), including k = 0 rounds and rounds where the drafter proposed
    nothing. mean_acceptance_length = 1 + accepted / num_spec_steps, so it
    counts the bonus (or recovered) token, and is 1.0 for plain decoding.
    """
    steps = len(records)
    drafted = sum(r.num_drafted for r in records)
    accepted = sum(r.accepted for r in records)
    max_k = max((r.num_drafted for r in records), default=0)
    hist = [0] * (max_k + 1)
    per_pos = [0] * max_k
    for r in records:
        hist[r.accepted] += 1
        for i in range(r.accepted):
            per_pos[i] += 1
    return {
        "num_spec_steps": steps,
        "num_drafts": sum(1 for r in records if r.num_drafted),
        "num_draft_tokens": drafted,
        "num_accepted_draft_tokens": accepted,
        "mean_acceptance_length": (1 + accepted / steps) if steps else None,
        "draft_acceptance_rate": (accepted / drafted) if drafted else None,
        "acceptance_histogram": hist,
        "num_accepted_tokens_per_pos": per_pos,
        "draft_s": sum(r.draft_s for r in records),
        "verify_s": sum(r.verify_s for r in records),
        "sync_s": sum(r.sync_s for r in records),
    }


class SpeculativeEngine:
    def __init__(self, target, tokenizer, drafters: dict[str, Drafter] | None = None, full_information: bool = True,
                 capture=None, verify_pad_multiple: int = 1, played_only: set[str] = frozenset()):
        self.target, self.tokenizer = target, tokenizer
        self.verify_pad_multiple = verify_pad_multiple  # see workers.models.verify_forward
        self.capture = capture  # workers.capture.TrafficCapture, opt-in
        self.drafters: dict[str, Drafter] = {"none": NoneDrafter(), **(drafters or {})}
        self.full_information = full_information
        self.played_only = set(played_only)  # drafters measured only in the rounds they are played
        self.eos_ids = _eos_ids(target, tokenizer)

    def measures(self, drafter: str) -> bool:
        """Whether a drafter's acceptance is measured in the rounds another drafter plays."""
        return self.full_information and drafter not in self.played_only

    def start(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        arm: Arm = Arm("none", 0),
        tenant: str = "",
        context: str = "",
        chooser: RoundChooser | None = None,
        load: Callable[[], int] = lambda: 1,
        features: tuple[float, ...] = (),
    ) -> "Generation":
        if arm.drafter not in self.drafters:
            raise ValueError(f"unknown drafter {arm.drafter!r}; known: {', '.join(self.drafters)}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        return Generation(self, list(prompt_ids), params, arm, tenant, context, chooser, load, tuple(features))

    def generate(self, prompt_ids: list[int], params: SamplingParams, arm: Arm = Arm("none", 0), **kw) -> GenerationResult:
        return self.start(prompt_ids, params, arm, **kw).run()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass
class Generation:
    """One request in flight. `step()` runs the prefill first, then one round per call."""

    engine: SpeculativeEngine
    prompt_ids: list[int]
    params: SamplingParams
    arm: Arm
    tenant: str
    context: str
    chooser: RoundChooser | None
    load: Callable[[], int]
    features: tuple[float, ...] = ()  # the prompt features the policy saw, copied into each record
    out: list[int] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    done: bool = False
    finish_reason: str = ""
    stop_at: int | None = None  # index in the text where a stop string begins

    def __post_init__(self):
        seed = self.params.seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.cache = new_cache(self.engine.target)
        # the target's hidden states of the verified tokens, kept only when a feature drafter needs them
        uses = [getattr(d, "uses_target_features", False) for d in self.engine.drafters.values()]
        self.target_features = TargetFeatures() if any(uses) else None
        self.sessions = {
            n: d.session(self.tenant, len(self.prompt_ids), self.target_features) if use
            else d.session(self.tenant, len(self.prompt_ids))
            for (n, d), use in zip(self.engine.drafters.items(), uses)
        }
        self.started = None
        self.prefill_s = 0.0

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.out

    def step(self) -> list[int]:
        """Advance by the prefill or one round; returns the tokens it appended."""
        if self.done:
            return []
        if self.started is None:
            return self._prefill()
        return self._round()

    def run(self) -> GenerationResult:
        """Step to the end and return the result."""
        while not self.done:
            self.step()
        return self.result()

    def _prefill(self) -> list[int]:
        self.started = time.perf_counter()
        keep = self.target_features is not None
        out = forward(self.engine.target, self.cache, self.prompt_ids, last_only=True, hidden=keep)
        logits, hidden = out if keep else (out, None)  # [1, vocab], [prompt, d]
        if keep:
            self.target_features.append(hidden)
        token = self._pick(probs_from_logits(logits[-1], self.params))
        self.prefill_s = time.perf_counter() - self.started
        return self._append([token])

    def _pick(self, p: torch.Tensor) -> int:
        return int(p.argmax()) if self.params.greedy else int(sample(p, self.generator))

    def _round(self) -> list[int]:
        choice = self.chooser(self) if self.chooser else Choice(self.arm, 1.0)
        arm = choice.arm
        if arm.drafter not in self.sessions:
            raise ValueError(f"the round chooser picked unknown drafter {arm.drafter!r}")
        ids = self.ids
        L = len(ids)
        k = min(arm.k, self.params.max_tokens - len(self.out) - 1)  # drafts past max_tokens are wasted
        # 1. draft
        t0 = time.perf_counter()
        session = self.sessions[arm.drafter]
        draft, q = session.propose(ids, k, self.params, self.generator, choice.threshold) if k > 0 else (torch.empty(0, dtype=torch.long), None)
        d = len(draft)
        t1 = time.perf_counter()
        # 2. verify: one target forward over the pending token and the drafts
        keep = self.target_features is not None
        out = verify_forward(self.engine.target, self.cache, [ids[-1]] + draft.tolist(),
                             self.engine.verify_pad_multiple, hidden=keep)
        logits, hidden = out if keep else (out, None)  # [d + 1, vocab], [d + 1, d_model]
        # the accept / reject draws use the request's CPU generator: bring the probabilities there
        p = probs_from_logits(logits, self.params).cpu()  # [d + 1, vocab]
        q = None if q is None else q.cpu()
        res = verify(p, draft, q, self.generator)
        n = res.num_accepted
        # 3. roll the target's cache back to the verified tokens but the new pending one
        #    (this drops rejected drafts and any padding)
        rollback(self.cache, L + n)
        if keep:
            self.target_features.append(hidden[: n + 1])  # the pending token and the accepted drafts
        t2 = time.perf_counter()
        # 4. keep drafters in sync; measure everyone's acceptance on the verified tokens
        new_ids = ids + res.tokens
        per_drafter = {arm.drafter: _own_acceptance(p, draft, q, n, exhausted=d < k and choice.threshold is None)} if k else {}
        for name, s in self.sessions.items():
            if name == arm.drafter or name == "none":
                s.sync(new_ids, L, None, self.params)
            else:
                acc = s.sync(new_ids, L, p[: n + 1] if self.engine.measures(name) else None, self.params)
                if acc is not None:
                    per_drafter[name] = acc
        t3 = time.perf_counter()
        # 5. emit, stopping at the exact token
        emitted = self._append(res.tokens)
        self.records.append(
            RoundRecord(
                drafter=arm.drafter, k=arm.k, num_drafted=d, accepted=n,
                emitted=len(emitted), draft_s=t1 - t0, verify_s=t2 - t1, sync_s=t3 - t2,
                propensity=choice.propensity, threshold=choice.threshold, accepted_per_pos=[1] * n + ([0] if n < d else []),
                per_drafter=per_drafter, load=self.load(), tenant=self.tenant, context=self.context,
                features=list(self.features), temperature=self.params.temperature, time=time.time(),
            )
        )
        return emitted

    def _append(self, tokens: list[int]) -> list[int]:
        appended = []
        for t in tokens:
            self.out.append(t)
            appended.append(t)
            if self._finished(t):
                self._finish()
                break
        return appended

    def _finished(self, token: int) -> bool:
        if not self.params.ignore_eos and token in self.engine.eos_ids:
            self.finish_reason = "stop"
            return True
        if self.params.stop:
            text = self._decode()
            hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
            if hits:
                self.finish_reason, self.stop_at = "stop", min(hits)
                return True
        if len(self.out) >= self.params.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def _finish(self) -> None:
        self.done = True
        self.finished_at = time.perf_counter()
        for s in self.sessions.values():
            s.close(self.ids)
        self.cache = None
        if self.engine.capture is not None:
            self.engine.capture.write(self.prompt_ids, self.out, self.tenant)

    def _decode(self) -> str:
        return self.engine.tokenizer.decode(self.out, skip_special_tokens=True)

    def result(self) -> GenerationResult:
        assert self.done, "generation still running"
        text = self._decode()
        if self.stop_at is not None:
            text = text[: self.stop_at]
        return GenerationResult(
            prompt_token_ids=self.prompt_ids, token_ids=self.out, text=text, finish_reason=self.finish_reason,
            records=self.records, generate_s=self.finished_at - self.started, prefill_s=self.prefill_s,
        )


def _own_acceptance(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, n: int, exhausted: bool) -> list[float]:
    """The chosen drafter's acceptance probability at each position up to the first rejection.

    p: [d + 1, vocab], draft: [d], q: [d, vocab] or None (deterministic). Under greedy: [1] * n (+ [0]).
    exhausted: the drafter proposed fewer tokens than asked, so a longer draft would have had
    nothing more to accept (a 0 closes the list; otherwise a fully accepted list is censored).
    """
    m = min(n + 1, len(draft))
    if q is None:
        out = p[torch.arange(m), draft[:m]].tolist()
    else:
        out = acceptance_probability(p[:m], q[:m]).tolist()
    if exhausted and n == len(draft):
        out.append(0.0)
    return out
