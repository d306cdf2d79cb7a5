"""`draftpick record`: full-information traces of real requests, for offline replay of policies.

Greedy output does not depend on the arm (the engine is lossless), so one plain
generation per request fixes the output tokens out[0..N-1]. Then, for every
drafter and every position g (tokens generated so far), the trace stores how many
tokens the drafter would propose from prompt + out[:g] (up to k_max) and how
many of them match out[g:]. Model drafters are read teacher-forced in one
forward (with their top-1 confidence at each position; so their `min_confidence` gate is
exact up to the first rejected draft, and past it reads the true text's confidences). Costs are measured on the
request's own context: one target forward of k + 1 tokens for k = 0..k_max, and
each drafter's seconds per drafted token. Any arm's rounds, time and tokens on the
request follow exactly (see controller.replay). Each drafter's part comes from its `trace` hook
(workers.drafters.base.Drafter). Batched costs, measured once per recording on the first request's
context and written on every line: a request's share (by rows) of one batched forward in which B
requests each verify k + 1 tokens, for B in BATCHES and k = 0..k_max (and B = 1 the same way
alone), and, for drafters that draft requests together (feature heads, model drafters), the
seconds per drafted token when B requests draft together, so that `replay --load B` can replay
the trace as if B requests were in flight.

Trace format: workers.trace (documented in docs/formats.md).
"""
from __future__ import annotations

import torch

from draftpick.policies.features import prompt_features
from draftpick.policies.types import Arm
from draftpick.workers.engine import SpeculativeEngine
from draftpick.workers.models import forward, median_seconds, new_cache, verify_forward
from draftpick.workers.sampling import SamplingParams, TokenSampler
from draftpick.workers.trace import trace_line


def record_file(engine: SpeculativeEngine, items: list[dict], out: str, max_tokens: int = 96, k_max: int = 8,
                tenant: str = "", progress: bool = True) -> int:
    """Record one trace line per input item (written and flushed as it goes); returns the count."""
    import json
    import sys

    from tqdm import tqdm

    from draftpick.workers.inputs import encode_inputs, input_text

    encoded = encode_inputs(engine.tokenizer, items)
    batch_costs = batch_verify_costs(engine, encoded[0][-256:], k_max) if encoded and engine.batchable else {}
    draft_costs = batch_draft_costs(engine, encoded[0][-256:], k_max) if encoded and engine.batchable else {}
    with open(out, "w") as f:
        for item, ids in zip(items, tqdm(encoded, desc="record", unit="request", file=sys.stderr, disable=not progress)):
            line = record_request(engine, item, ids, input_text(item), max_tokens, k_max, tenant)
            line["batch_verify_s"] = batch_costs
            if draft_costs:
                line["batch_draft_s"] = draft_costs
            f.write(json.dumps(line) + "\n")
            f.flush()
    return len(items)


def record_request(engine: SpeculativeEngine, item: dict, ids: list[int], text: str, max_tokens: int,
                   k_max: int, tenant: str = "", repeats: int = 3) -> dict:
    """One trace line (workers.trace): the plain greedy output, each drafter's proposals along it, the costs."""
    # the plain run indexes its output under a throwaway tenant: the suffix drafter must not see
    # this request's own output before its lookups below are recorded
    g = engine.start(ids, SamplingParams(max_tokens=max_tokens), Arm("none", 0), tenant="\0record-plain")
    res = g.run()  # g keeps the target's hidden states, which feature drafters' traces use below
    out = res.token_ids
    seq = ids + out
    hidden = g.target_features.rows[: len(seq) - 1] if g.target_features is not None else None
    drafters, draft_cost = {}, {}
    for name, d in engine.drafters.items():
        if name == "none":
            continue
        drafters[name], draft_cost[name] = d.trace(ids, out, k_max, hidden, tenant)
        # live, a drafter that is not full-information is measured only in the rounds it plays
        drafters[name]["full_information"] = engine.measures(name)
    return trace_line(
        id=item.get("id"), domain=item.get("domain", ""), tag=item.get("tag", ""),
        features=list(prompt_features(text, ids)), prompt_tokens=len(ids), max_tokens=max_tokens,
        num_tokens=len(out), finish_reason=res.finish_reason, k_max=k_max, prefill_s=res.prefill_s,
        plain_generate_s=res.generate_s, verify_s=_verify_costs(engine, seq[: len(ids) + len(out) // 2], k_max, repeats),
        draft_s_per_token=draft_cost, drafters=drafters,
    )


BATCHES = (1, 2, 4, 8, 16, 32)


@torch.inference_mode()
def batch_verify_costs(engine, context: list[int], k_max: int, batches=BATCHES, repeats: int = 3) -> dict[str, list[float]]:
    """{B: [seconds per request of a batched forward where B requests verify k + 1 tokens each after
    `context`, k = 0..k_max]}: the forward's median seconds / B (workers.batched)."""
    import copy
    import sys

    from tqdm import tqdm

    from draftpick.workers.batched import batched_forward

    target = engine.target
    base = new_cache(target)
    forward(target, base, context[:-1], last_only=True)
    out = {}
    for b in tqdm(batches, desc="batched verify costs", unit="batch size", file=sys.stderr):
        caches = [copy.deepcopy(base) for _ in range(b)]
        out[str(b)] = []
        for k in range(k_max + 1):
            rows = [[context[-1]] * (k + 1)] * b
            out[str(b)].append(median_seconds(lambda: batched_forward(target, caches, rows), caches,
                                              len(context) - 1, repeats) / b)
    return out


@torch.inference_mode()
def batch_draft_costs(engine, context: list[int], k_max: int, batches=BATCHES, repeats: int = 3) -> dict[str, dict[str, float]]:
    """{drafter: {B: seconds per drafted token when B requests draft up to k_max tokens each after
    `context` in one call}} for the drafters that draft requests together (`propose_batch`: feature
    heads, model drafters), greedy, with the drafter's confidence gate off (so every draft is k_max
    long, as the trace's cost per token alone is measured); the catch-up on the context is done once
    beforehand, so this is the draft steps' cost (the median of `repeats` calls over the tokens
    they drafted)."""
    import statistics
    import sys
    import time

    from tqdm import tqdm

    from draftpick.workers.drafters.feature import TargetFeatures

    names = [n for n in engine.drafters if engine.drafts_together(n)]
    if not names:
        return {}
    _, hidden = forward(engine.target, new_cache(engine.target), context, hidden=True)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for name in names:
        d = engine.drafters[name]
        gate, d.min_confidence = d.min_confidence, 0.0  # every draft k_max tokens long (as the trace's cost is)
        try:
            for b in tqdm(batches, desc=f"batched draft costs ({name})", unit="batch size", file=sys.stderr):
                asks = []
                for _ in range(b):
                    features = TargetFeatures()
                    features.rows = hidden[: len(context) - 1]
                    sampler = TokenSampler(SamplingParams(max_tokens=k_max + 1))  # greedy
                    asks.append((d.session("", len(context), features), context, k_max, sampler, None))
                d.propose_batch(asks)  # the catch-up on the context
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    drafts = d.propose_batch(asks)
                    times.append(time.perf_counter() - t)
                out[name][str(b)] = statistics.median(times) / max(sum(len(x) for x, _ in drafts), 1)
        finally:
            d.min_confidence = gate
    return out


@torch.inference_mode()
def _verify_costs(engine, context, k_max, repeats) -> list[float]:
    """Median seconds of the engine's verify forward over k + 1 tokens after `context`, k = 0..k_max."""
    target = engine.target
    cache = new_cache(target)
    forward(target, cache, context[:-1], last_only=True)
    return [median_seconds(lambda k=k: verify_forward(target, cache, [context[-1]] * (k + 1), engine.verify_pad_multiple),
                            cache, len(context) - 1, repeats)
            for k in range(k_max + 1)]
