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

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from draftpick.policies.types import Arm, Choice, Rerun, RoundRecord
from draftpick.workers.batched import ForwardCost, batchable, batched_forward
from draftpick.workers.drafters.base import Drafter
from draftpick.workers.drafters.feature import TargetFeatures
from draftpick.workers.drafters.none import NoneDrafter
from draftpick.workers.metrics import spec_decode_metrics
from draftpick.workers.models import forward, new_cache, rollback, verify_forward
from draftpick.workers.prefix import PrefixCache
from draftpick.workers.sampling import SamplingParams, TokenSampler
from draftpick.workers.verify import acceptance_probability, verify

log = logging.getLogger(__name__)

# (generation in progress) -> the next round's choice: arm, propensity, optional confidence threshold
RoundChooser = Callable[["Generation"], Choice]
# called with each finished request's result (traffic capture, the service's feedback); must not block
Sink = Callable[["GenerationResult"], None]


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, up to and including the one that ended generation
    text: str  # decoded output, cut before a stop string
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens) or "abort" (cancelled)
    records: list[RoundRecord]
    generate_s: float  # wall seconds from prefill to the last token (models already loaded)
    prefill_s: float
    tenant: str = ""
    context: str = ""

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


class SpeculativeEngine:
    """One target and its drafters. Does no file or network I/O: finished requests go to the sinks
    the caller attaches (`add_sink`), e.g. traffic capture or the service's feedback."""

    def __init__(self, target, tokenizer, drafters: dict[str, Drafter] | None = None, full_information: bool = True,
                 verify_pad_multiple: int = 1, played_only: set[str] = frozenset(), counterfactual_k: int = 16,
                 prefix_blocks: int = 0):
        self.target, self.tokenizer = target, tokenizer
        # prompt prefixes' keys and values, reused by later prompts that start the same (0 blocks: off)
        self.prefix = PrefixCache(prefix_blocks) if prefix_blocks else None
        self.verify_pad_multiple = verify_pad_multiple  # see workers.models.verify_forward
        self.sinks: list[Sink] = []
        self.sink_errors = 0  # sink calls that raised (logged; the request is answered all the same)
        self.drafters: dict[str, Drafter] = {"none": NoneDrafter(), **(drafters or {})}
        self.full_information = full_information
        self.played_only = set(played_only)  # drafters measured only in the rounds they are played
        self.counterfactual_k = counterfactual_k  # re-run lookup drafters' rounds for k = 1 .. this (0: off)
        self.eos_ids = _eos_ids(target, tokenizer)
        self.vocab_size = target.config.vocab_size
        self.context_window = getattr(target.config, "max_position_embeddings", None)
        self.batchable = batchable(target)  # concurrent requests share one forward (workers.batched)
        # in step_batch, the rounds of one drafter that drafts requests together (`propose_batch`:
        # feature heads, model drafters) draft in one call; False: each request drafts alone
        self.batch_drafts = True
        self.forward_cost = ForwardCost()  # each request's share of a batched forward's seconds
        # the target's forward seconds since the engine started, by phase: each step's share of its
        # forward (Generation.complete), so a batched forward's seconds split between its prefill rows
        # and its rounds (read by the worker's status, its /metrics and `draftpick bench load`)
        self.forward_s = {"prefill": 0.0, "decode": 0.0}
        # the requests of the step in progress whose last round drafted with each drafter that drafts
        # requests together (what a round's draft will share: Generation.co_drafting)
        self.drafting: Counter[str] = Counter()

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def _emit(self, result: "GenerationResult") -> None:
        for sink in self.sinks:
            try:
                sink(result)
            except Exception:  # a sink must never fail the request it reports
                self.sink_errors += 1
                log.exception("draftpick: a result sink failed")

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
        rng_seed: int | None = None,
    ) -> "Generation":
        """rng_seed: see workers.sampling.TokenSampler (reproducible unseeded sampling, for tests)."""
        if arm.drafter not in self.drafters:
            raise ValueError(f"unknown drafter {arm.drafter!r}; known: {', '.join(self.drafters)}")
        self.check_prompt(prompt_ids, params)
        return Generation(self, list(prompt_ids), params, arm, tenant, context, chooser, load, tuple(features),
                          rng_seed=rng_seed)

    def generate(self, prompt_ids: list[int], params: SamplingParams, arm: Arm = Arm("none", 0), **kw) -> GenerationResult:
        return self.start(prompt_ids, params, arm, **kw).run()

    def step_batch(self, gens: list["Generation"], max_rows: int | None = None,
                   prefill_chunk: int | None = None) -> list[list[int] | Exception]:
        """One step of every unfinished generation in `gens` (prefill or round) with one target forward
        for them all (workers.batched); returns the tokens each appended, or the exception that ended
        it (a request's own error, e.g. from its round chooser, fails that request alone: it is
        cancelled, and its rounds still go to the sinks). Each request's share of the
        forward's seconds (a / n + c + b rows, batched.ForwardCost) is its round's verify time.
        max_rows bounds the forward's rows: the prefills take theirs, the rounds share the rest
        (their drafts are cut to fit, never below 0).
        prefill_chunk: the prompt tokens all prefilling requests together run in this step (chunked
        prefill, first come first served; a prompt beyond it waits; None: whole prompts); a request
        still prefilling appends no token.
        A target that `batched.batchable` refuses runs one forward per request."""
        live = [g for g in gens if not g.done]
        out: dict[int, list[int] | Exception] = {}
        self.drafting = Counter()
        if len(live) <= 1 or not self.batchable:
            for g in live:
                out[id(g)] = _guarded(g, g.step)
            return [out.get(id(g), []) for g in gens]
        if self.batch_drafts:
            self.drafting = Counter(d for d in (g.records[-1].drafter for g in live if g.records)
                                    if self.drafts_together(d))
        chunks, budget = {}, prefill_chunk or None
        for g in live:
            g.begin()  # (a stored prompt prefix shortens its prefill)
        for g in live:  # the prompt tokens each prefill runs: all, or first come first served from the budget
            if g.prefill_left:
                chunks[id(g)] = g.prefill_left if budget is None else min(g.prefill_left, budget)
                budget = None if budget is None else budget - chunks[id(g)]
        live = [g for g in live if chunks.get(id(g)) != 0]  # a prompt beyond the budget waits a step
        n_rounds = sum(not g.prefill_left for g in live)
        max_k = None
        if max_rows is not None and n_rounds:
            max_k = max(0, (max_rows - sum(chunks.values()) - n_rounds) // n_rounds)
        tokens = {id(g): _guarded(g, lambda g=g: g.plan(max_k, chunks.get(id(g)))) for g in live}
        rounds = [g for g in live if tokens[id(g)] is None]
        together = self._draft_together(rounds) if self.batch_drafts else {}
        for g in rounds:
            tokens[id(g)] = together.get(id(g)) or _guarded(g, g.draft_planned)
        for g in live:
            if isinstance(tokens[id(g)], Exception):
                out[id(g)] = tokens[id(g)]
        batch = [g for g in live if id(g) not in out]
        if batch:
            keep = any(g.target_features is not None for g in batch)
            t = time.perf_counter()
            outs = batched_forward(self.target, [g.cache for g in batch], [tokens[id(g)] for g in batch],
                                   [g.prefilling for g in batch], hidden=keep)
            forward_s = time.perf_counter() - t
            lengths = [len(tokens[id(g)]) for g in batch]
            rows = sum(lengths)
            if not any(g.prefilling for g in batch):
                self.forward_cost.observe(rows, forward_s, len(batch))
            shares = self.forward_cost.shares(lengths, forward_s)
            for g, (logits, hidden), share in zip(batch, outs, shares):
                out[id(g)] = _guarded(g, lambda g=g, lg=logits, h=hidden, s=share: g.complete(lg, h, s, len(batch), rows))
        return [out.get(id(g), []) for g in gens]

    def drafts_together(self, drafter: str) -> bool:
        """Whether `drafter` drafts the rounds of several requests in one call (`propose_batch`)."""
        return hasattr(self.drafters[drafter], "propose_batch")

    def _draft_together(self, gens: list["Generation"]) -> dict[int, list[int]]:
        """Drafts the planned rounds of drafters that draft several requests in one call
        (`propose_batch`: a feature head's layer or a model drafter's forward runs once per draft step
        for all of them), grouped by drafter, each request's draft seconds the call's shared by the
        tokens it drafted.
        Returns each drafted request's forward tokens; the others (other drafters, alone on theirs,
        or in a group whose call failed) draft alone, where a request's own error shows as its own."""
        groups: dict[str, list[Generation]] = {}
        for g in gens:
            _, k, name = g.planned
            if k > 0 and self.drafts_together(name):
                groups.setdefault(name, []).append(g)
        out: dict[int, list[int]] = {}
        for name, gs in groups.items():
            if len(gs) < 2:
                continue
            t = time.perf_counter()
            try:
                drafts = self.drafters[name].propose_batch(
                    [(g.sessions[name], g.ids, g.planned[1], g.sampler, g.planned[0].threshold) for g in gs])
            except Exception:  # noqa: BLE001 - each request then drafts alone, and fails alone if it must
                log.warning("draftpick: drafting %d requests together with %r failed; drafting them one by one",
                            len(gs), name, exc_info=True)
                continue
            seconds = time.perf_counter() - t
            total = sum(len(d) for d, _ in drafts)
            for g, (draft, q) in zip(gs, drafts):
                out[id(g)] = g.drafted(draft, q, seconds * (len(draft) / total if total else 1 / len(gs)), len(gs))
        return out

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse, with a message naming the problem, what the target cannot run."""
        check_prompt(prompt_ids, params.max_tokens, self.vocab_size, self.context_window)


def check_prompt(prompt_ids: list[int], max_tokens: int, vocab_size: int, context_window: int | None) -> None:
    """The engine's check of a prompt, also run where only the target's limits are known (the ingress)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]!r} is outside the target's vocabulary [0, {vocab_size})")
    if context_window and len(prompt_ids) + max_tokens > context_window:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                         f"the target's context window of {context_window} tokens")


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
    rng_seed: int | None = None  # the random stream of an unseeded request (None: fresh entropy)
    # per lookup drafter, its arms' rounds re-run along the output (set when it finishes, see rerun)
    counterfactual: Rerun | None = None
    out: list[int] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    done: bool = False
    finish_reason: str = ""
    stop_at: int | None = None  # index in the text where a stop string begins

    def __post_init__(self):
        self.sampler = TokenSampler(self.params, self.rng_seed)  # the request's randomness (seeded: position-keyed noise)
        self.cache = new_cache(self.engine.target)
        # the target's hidden states of the verified tokens, kept only when a feature drafter needs them
        uses = any(d.uses_target_features for d in self.engine.drafters.values())
        self.target_features = TargetFeatures() if uses else None
        self.sessions = {n: d.session(self.tenant, len(self.prompt_ids), self.target_features)
                         for n, d in self.engine.drafters.items()}
        self.started = None
        self.prefill_s = 0.0
        self.prefilled = 0  # prompt tokens in the target's cache (a chunked prefill takes several steps)
        self._chunk = 0  # prompt tokens the prepared prefill step runs
        self._round_state = None  # a prepared round: (choice, k, drafter, draft, q, draft seconds, draft group)
        self.planned = None  # a planned round before its draft: (choice, k, drafter)
        self._proposals: dict[str, list[list[int]]] = {}  # rerun(): each lookup drafter's proposal at each position

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.out

    @property
    def prefill_left(self) -> int:
        """Prompt tokens not yet in the target's cache (0 once the prefill is done)."""
        return len(self.prompt_ids) - self.prefilled

    def prefill_rows(self, chunk: int | None = None) -> int:
        """Rows the next prefill step runs with chunks of at most `chunk` tokens (None: the rest)."""
        return self.prefill_left if not chunk else min(chunk, self.prefill_left)

    def step(self) -> list[int]:
        """Advance by the prefill or one round, with its own target forward; returns the tokens it
        appended. (`SpeculativeEngine.step_batch` runs the same two halves for many requests with
        one forward.)"""
        if self.done:
            return []
        tokens = self.prepare()
        keep = self.target_features is not None
        t = time.perf_counter()
        if self.prefilling:  # only the last row's logits are needed
            out = forward(self.engine.target, self.cache, tokens, last_only=True, hidden=keep)
        else:
            out = verify_forward(self.engine.target, self.cache, tokens, self.engine.verify_pad_multiple, hidden=keep)
        logits, hidden = out if keep else (out, None)
        return self.complete(logits, hidden, time.perf_counter() - t)

    def prepare(self, max_k: int | None = None, chunk: int | None = None) -> list[int]:
        """The first half of a step: the tokens its target forward runs after the cache. The prefill
        (the prompt, or its next `chunk` tokens; the forward needs only its last row's logits,
        `prefilling`), or a round's choice and draft: [pending token] + drafts, at most max_k drafts
        (the worker's bound on rows per step). = plan(), then draft the planned round (step_batch
        drafts the rounds of one drafter for several requests at once, then calls `drafted`)."""
        tokens = self.plan(max_k, chunk)
        return tokens if tokens is not None else self.draft_planned()

    def co_drafting(self) -> dict[str, int]:
        """The other requests of the step in progress whose last round drafted with each drafter
        that drafts requests together (SpeculativeEngine.drafting): how many this request's round
        would share a drafting call with, if it drafted with one of them."""
        mine = self.records[-1].drafter if self.records else None
        return {d: n - (d == mine) for d, n in self.engine.drafting.items() if n - (d == mine) > 0}

    def draft_planned(self) -> list[int]:
        """Drafts the planned round alone; returns the tokens the round's forward runs."""
        choice, k, drafter = self.planned
        t0 = time.perf_counter()
        draft, q = self._draft(drafter, self.ids, k, choice.threshold)  # 1. draft
        return self.drafted(draft, q, time.perf_counter() - t0)

    def plan(self, max_k: int | None = None, chunk: int | None = None) -> list[int] | None:
        """The prefill's tokens for this step, or None for a round, whose choice, k and drafter are
        then in `planned` (the round's draft not yet made)."""
        assert not self.done and self._round_state is None and self.planned is None, \
            "prepare() twice without complete()"
        self.begin()
        if self.prefill_left:
            self._chunk = self.prefill_rows(chunk)
            return self.prompt_ids[self.prefilled: self.prefilled + self._chunk]
        choice = self.chooser(self) if self.chooser else Choice(self.arm, 1.0)
        if choice.arm.drafter not in self.sessions:
            raise ValueError(f"the round chooser picked unknown drafter {choice.arm.drafter!r}")
        # drafts past max_tokens are wasted: draft (and record) at most what can still be emitted
        k = min(choice.arm.k, self.params.max_tokens - len(self.out) - 1, choice.arm.k if max_k is None else max_k)
        self.planned = (choice, k, choice.arm.drafter if k > 0 else "none")
        return None

    def begin(self) -> None:
        """At the request's first step: starts its clock, and puts the longest prefix of its prompt
        that the engine's prefix cache holds for its tenant into its cache (those tokens are not
        prefilled; prefixes stored while it waited count)."""
        if self.started is not None:
            return
        self.started = time.perf_counter()
        if self.engine.prefix is not None:
            self.prefilled = self.engine.prefix.seed(self.prompt_ids, self.cache, self.target_features, self.tenant)

    def drafted(self, draft: torch.Tensor, q: torch.Tensor | None, seconds: float, group: int = 1) -> list[int]:
        """The planned round's draft [d <= k] (and q [d, vocab], None: deterministic), made in
        `seconds` (its share of a call that drafted `group` requests together); returns the tokens the
        round's forward runs: [pending token] + drafts."""
        (choice, k, drafter), self.planned = self.planned, None
        self._round_state = (choice, k, drafter, draft, q, seconds, group)
        return [self.ids[-1]] + draft.tolist()

    @property
    def prefilling(self) -> bool:
        """Whether the prepared step is (a chunk of) the prefill."""
        return self._round_state is None and self.prefill_left > 0

    def complete(self, logits: torch.Tensor, hidden: torch.Tensor | None, forward_s: float, batch: int = 1,
                 rows: int = 0) -> list[int]:
        """The second half of a step, given its forward's logits [rows or 1 (prefill), vocab] and, when
        a feature drafter needs them, hidden states [rows, d]: the prefill's first token, or a round's
        verify -> sync -> emit. forward_s: this request's share of the forward's seconds; batch, rows:
        the requests and rows that forward ran (the round's record carries them). Returns the tokens
        appended."""
        self.engine.forward_s["prefill" if self._round_state is None else "decode"] += forward_s
        if self._round_state is None:
            tokens = self._first_token(logits, hidden)
        else:
            tokens = self._round(logits, hidden, forward_s, batch, rows)
        if self.done:  # its last round recorded: the result goes to the engine's sinks
            self._emit()
        return tokens

    def _emit(self) -> None:
        """The result to the engine's sinks, its last record carrying the request's counterfactual."""
        if self.counterfactual and self.records:
            self.records[-1] = replace(self.records[-1], counterfactual=self.counterfactual.rounds,
                                       counterfactual_tokens=self.counterfactual.tokens,
                                       counterfactual_drafted=self.counterfactual.drafted)
        self.engine._emit(self.result())

    def rerun(self) -> Rerun | None:
        """Per deterministic (lookup) drafter, the rounds its arm (drafter, k) would have taken over the
        tokens emitted yet, k = 1 .. counterfactual_k, and the rows they would have drafted: its
        proposals re-run at every position (a match cut at the last token), which under greedy or
        seeded decoding does not depend on the arm played (policies.types.RoundRecord), with tokens
        after the prefill's (policies.types.Rerun). Asked by round-level choosers where they revisit
        their choice (Context.rerun), and at the end for the request's counterfactual; each position's
        proposal is looked up once and kept. None for unseeded sampling (the output depends on the arm)
        or when turned off."""
        from draftpick.workers.drafters.base import LookupSession, matching_prefix

        k_max, n = self.engine.counterfactual_k, len(self.out)
        if k_max <= 0 or n < 2 or (self.params.temperature > 0 and self.params.seed is None):
            return None
        rounds, drafted = {}, {}
        for name, s in self.sessions.items():
            if not isinstance(s, LookupSession):
                continue
            proposals = self._proposals.setdefault(name, [])  # [g - 1]: the proposal after out[:g]
            while len(proposals) < n - 1:
                proposals.append(s.lookup(self.prompt_ids + self.out[:len(proposals) + 1], k_max))
            matched = [matching_prefix(p, self.out[g:]) for g, p in enumerate(proposals, start=1)]
            rounds[name], drafted[name] = counterfactual_walks(matched, [len(p) for p in proposals], k_max, n,
                                                               self.params.max_tokens)
        return Rerun(rounds, float(n - 1), drafted) if rounds else None

    def cancel(self) -> None:
        """Stop here (its client went away): finish_reason "abort"; the rounds it ran still go to
        the engine's sinks, so their feedback is not lost. Call between steps, never during one."""
        if self.done:
            return
        if self.started is None:
            self.started = time.perf_counter()
        self.finish_reason = "abort"
        self._finish()
        self._emit()

    def fail(self) -> None:
        """End it after its step failed midway: the prepared round (if any) is dropped, then as cancel()."""
        self._round_state = self.planned = None
        self.cancel()

    def run(self) -> GenerationResult:
        """Step to the end and return the result."""
        while not self.done:
            self.step()
        return self.result()

    def _first_token(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> list[int]:
        """A prefill step's end: the chunk is in the cache; after the last chunk, the first token."""
        if self.target_features is not None:
            self.target_features.append(hidden)  # [chunk, d]
        self.prefilled += self._chunk
        if self.prefill_left:
            return []
        if self.engine.prefix is not None:
            self.engine.prefix.store(self.prompt_ids, self.cache, self.target_features, self.tenant)
        token = self.sampler.draw(self.sampler.probs(logits[-1:], len(self.prompt_ids))[0])
        self.prefill_s = time.perf_counter() - self.started
        return self._append([token])

    def _round(self, logits: torch.Tensor, hidden: torch.Tensor | None, forward_s: float, batch: int,
               rows: int) -> list[int]:
        """The rest of a draft -> verify -> accept round; appends and returns the tokens it emitted."""
        choice, k, drafter, draft, q, draft_s, group = self._round_state
        self._round_state = None
        ids = self.ids
        t1 = time.perf_counter()
        p, res = self._verify(ids, logits, hidden, draft, q)  # 2. verify, 3. roll the target's cache back
        t2 = time.perf_counter()
        exhausted = len(draft) < k and choice.threshold is None
        per_drafter = self._sync(drafter, ids, ids + res.tokens, p, draft, q, res.num_accepted, exhausted)  # 4. sync
        t3 = time.perf_counter()
        emitted = self._append(res.tokens)  # 5. emit, stopping at the exact token
        # a round cut short by a stop counts only the drafts it emitted
        accepted = min(res.num_accepted, len(emitted))
        rejected = [0] if accepted == res.num_accepted < len(draft) else []
        self.records.append(RoundRecord(
            drafter=drafter, k=k if drafter != "none" else 0, num_drafted=len(draft), accepted=accepted,
            emitted=len(emitted), draft_s=draft_s, verify_s=forward_s + t2 - t1, sync_s=t3 - t2,
            propensity=choice.propensity, threshold=choice.threshold, accepted_per_pos=[1] * accepted + rejected,
            per_drafter=per_drafter, load=self.load(), batch=batch, batch_rows=rows or len(draft) + 1, draft_group=group,
            tenant=self.tenant, context=self.context, features=list(self.features),
            temperature=self.params.temperature, time=time.time(),
        ))
        return emitted

    def _draft(self, drafter: str, ids: list[int], k: int, threshold: float | None):
        """The drafter's proposal: tokens [d <= k] and q [d, vocab] (None: deterministic)."""
        if k <= 0:
            return torch.empty(0, dtype=torch.long), None
        return self.sessions[drafter].propose(ids, k, self.sampler, threshold)

    def _verify(self, ids: list[int], logits: torch.Tensor, hidden: torch.Tensor | None, draft: torch.Tensor,
                q: torch.Tensor | None):
        """The accept / reject rule on the target's logits [d + 1, vocab] of the pending token and the
        drafts; the target's cache rolled back to the verified tokens but the new pending one (this
        drops rejected drafts and any padding). Returns (p [d + 1, vocab], VerifyResult)."""
        # rows predict positions len(ids) ..; the accept / reject draws use the request's CPU generator
        p = self.sampler.probs(logits, len(ids))  # [d + 1, vocab] on the CPU
        res = verify(p, draft, None if q is None else q.cpu(), self.sampler.generator)
        if len(res.tokens) != res.num_accepted + 1:  # else generation would never end
            raise RuntimeError(f"a round emitted no token: verification must emit accepted + 1 tokens, got "
                               f"{len(res.tokens)} with {res.num_accepted} accepted (engine defect)")
        rollback(self.cache, len(ids) + res.num_accepted)
        if self.target_features is not None:
            self.target_features.append(hidden[: res.num_accepted + 1])  # the pending token and the accepted drafts
        self.sampler.forget(len(ids))
        return p, res

    def _sync(self, played: str, ids: list[int], new_ids: list[int], p: torch.Tensor, draft: torch.Tensor,
              q: torch.Tensor | None, n: int, exhausted: bool) -> dict[str, list[float]]:
        """Keep every drafter in sync with the verified tokens; returns each measured drafter's
        acceptance on them (full information)."""
        L = len(ids)
        per_drafter = {played: _own_acceptance(p, draft, q, n, exhausted)} if played != "none" else {}
        for name, s in self.sessions.items():
            if name == played or name == "none":
                s.sync(new_ids, L, None, self.sampler)
            else:
                acc = s.sync(new_ids, L, p[: n + 1] if self.engine.measures(name) else None, self.sampler)
                if acc is not None:
                    per_drafter[name] = acc
        return per_drafter

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
        self.counterfactual = self.rerun()  # the whole output, before the sessions close (the suffix index learns)
        for s in self.sessions.values():
            s.close(self.ids)
        self.cache = None

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
            tenant=self.tenant, context=self.context,
        )


def _guarded(g: "Generation", run):
    """run() for one request of a batch; an error there ends that request (cancelled) and is returned."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - handed to that request's caller
        g.fail()
        return e


def counterfactual_walks(matched: list[int], proposed: list[int], k_max: int, n: int,
                        max_tokens: int) -> tuple[list[float], list[float]]:
    """For k = 1 .. k_max, the rounds a fixed arm with draft length k takes to emit tokens 1 .. n - 1
    (token 0 comes from the prefill) and the rows it drafts, given how many tokens the drafter proposes
    at each position g (proposed[g - 1]) and how many of them match the output (matched[g - 1]): a round
    at g drafts min(k, proposed, max_tokens - g - 1) tokens, each a row of its verify forward. The same
    walk as replay's simulate (controller.replay), whose counterfactual counts come from here."""
    rounds, drafted = [], []
    for k in range(1, k_max + 1):
        g, r, d = 1, 0, 0
        while g < n:
            k_eff = min(k, max_tokens - g - 1)
            accepted = min(matched[g - 1], k_eff) if k_eff > 0 else 0
            d += min(proposed[g - 1], k_eff) if k_eff > 0 else 0
            g += min(accepted + 1, n - g)
            r += 1
        rounds.append(float(r))
        drafted.append(float(d))
    return rounds, drafted


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
