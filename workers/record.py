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
request follow exactly (see controller.replay).

Trace format: one JSON object per line (one request), documented in the README.
"""
from __future__ import annotations

import statistics
import time

import torch

from policies.features import prompt_features
from policies.types import Arm
from workers.drafters.base import gate_length
from workers.drafters.feature import FeatureDrafter, TargetFeatures
from workers.drafters.model import ModelDrafter
from workers.engine import SpeculativeEngine
from workers.models import forward, new_cache, rollback, verify_forward
from workers.sampling import SamplingParams

TRACE_VERSION = 1


def record_request(engine: SpeculativeEngine, item: dict, ids: list[int], text: str, max_tokens: int,
                   k_max: int, tenant: str = "", repeats: int = 3) -> dict:
    # the plain run indexes its output under a throwaway tenant: the suffix drafter must not see
    # this request's own output before its lookups below are recorded
    g = engine.start(ids, SamplingParams(max_tokens=max_tokens), Arm("none", 0), tenant="\0record-plain")
    res = g.run()  # g keeps the target's hidden states, which feature drafters' traces use below
    out = res.token_ids
    seq = ids + out
    n = len(out)
    drafters = {}
    draft_cost = {}
    for name, d in engine.drafters.items():
        if name == "none":
            continue
        if isinstance(d, FeatureDrafter):  # drafts from the target's hidden states the plain run kept
            hidden = g.target_features.rows[: len(seq) - 1]
            drafters[name], draft_cost[name] = _feature_drafter_trace(d, hidden, ids, out, k_max, repeats)
        elif isinstance(d, ModelDrafter):
            drafters[name], draft_cost[name] = _model_drafter_trace(d, ids, out, k_max, repeats)
        else:
            drafters[name], draft_cost[name] = _lookup_drafter_trace(d, ids, out, k_max, tenant)
        # live, a drafter that is not full-information is measured only in the rounds it plays
        drafters[name]["full_information"] = engine.measures(name)
    return {
        "version": TRACE_VERSION,
        "id": item.get("id"),
        "domain": item.get("domain", ""),
        "tag": item.get("tag", ""),
        "features": list(prompt_features(text, ids)),
        "prompt_tokens": len(ids),
        "max_tokens": max_tokens,
        "num_tokens": n,
        "finish_reason": res.finish_reason,
        "k_max": k_max,
        "prefill_s": res.prefill_s,
        "plain_generate_s": res.generate_s,
        "verify_s": _verify_costs(engine, seq[: len(ids) + n // 2], k_max, repeats),
        "draft_s_per_token": draft_cost,
        "drafters": drafters,
    }


def _lookup_drafter_trace(drafter, ids, out, k_max, tenant):
    """proposed[g-1], matched[g-1] for g = 1..n-1, and mean seconds per lookup token."""
    session = drafter.session(tenant, len(ids))
    proposed, matched = [], []
    t0 = time.perf_counter()
    calls = 0
    for g in range(1, len(out)):
        draft = session.lookup(ids + out[:g], k_max)
        calls += 1
        proposed.append(len(draft))
        matched.append(_run(draft, out[g:]))
    spent = time.perf_counter() - t0
    session.close(ids + out)  # index the output, as the live engine does when a request ends
    return {"proposed": proposed, "matched": matched}, spent / max(calls, 1) / max(k_max, 1)


def _run(draft, truth) -> int:
    m = 0
    while m < len(draft) and m < len(truth) and draft[m] == truth[m]:
        m += 1
    return m


@torch.inference_mode()
def _model_drafter_trace(drafter, ids, out, k_max, repeats):
    seq = ids + out
    # the drafter's own logits (only its kept vocabulary for a distilled drafter), as the engine drafts
    logits = drafter.logits(new_cache(drafter.model), seq[:-1])  # [L - 1, vocab]
    probs = logits[len(ids) - 1 :].softmax(-1)  # rows predict out[0..n-1]
    conf, pred = probs.max(-1)
    hit = (pred == torch.tensor(out, device=pred.device)).tolist()
    matched, proposed, confidence = [], [], conf.tolist()
    for g in range(1, len(out)):
        # the drafter's min_confidence gate ends its draft before the first unconfident position
        # (positions past the output's end have no confidence: they do not stop it)
        ahead = confidence[g : g + k_max]
        k = gate_length(ahead, drafter.min_confidence)
        k = k_max if k == len(ahead) else k
        m = 0
        while m < k and g + m < len(out) and hit[g + m]:
            m += 1
        matched.append(m)
        proposed.append(k)
    # cost of one drafted token: a one-token forward with the context in cache
    cache = new_cache(drafter.model)
    forward(drafter.model, cache, seq[:-1], last_only=True)
    seconds = _median_seconds(lambda: drafter.logits(cache, [seq[-1]], last_only=True), cache, len(seq) - 1,
                              max(repeats, 3))
    return {"proposed": proposed, "matched": matched, "confidence": confidence}, seconds


@torch.inference_mode()
def _feature_drafter_trace(drafter, hidden, ids, out, k_max, repeats):
    """A feature drafter drafts from predicted features beyond the verified token, so teacher forcing
    would overstate it: each position's greedy draft of k_max tokens is run as the engine runs it.
    draft_confidence[g - 1][j]: the drafter's probability of its j-th drafted token (its own path)."""
    features = TargetFeatures()
    session = drafter.session("", len(ids), features)
    proposed, matched, confidence = [], [], []
    for g in range(1, len(out)):
        verified = ids + out[:g]
        features.rows = hidden[: len(verified) - 1]
        confs: list[float] = []

        def choose(i, logits):
            probs = logits.softmax(-1)
            confs.append(float(probs.max()))
            return int(probs.argmax()), True

        draft, _ = session.draft(verified, len(verified) - 1, k_max, choose)
        # the drafter's min_confidence gate ends its draft before the first unconfident position
        draft = draft[: gate_length(confs, drafter.min_confidence)]
        proposed.append(len(draft))
        matched.append(_run(draft, out[g:]))
        confidence.append(confs)
    # cost of one drafted token: one head step on a predicted feature, plus its logits
    cache = session.cache
    keep = cache.get_seq_length()
    h = hidden[-1:]
    seconds = _median_seconds(lambda: drafter.logits(drafter.step(cache, h, [out[-1]])), cache, keep, max(repeats, 3))
    return {"proposed": proposed, "matched": matched, "draft_confidence": confidence}, seconds


@torch.inference_mode()
def _verify_costs(engine, context, k_max, repeats) -> list[float]:
    """Median seconds of the engine's verify forward over k + 1 tokens after `context`, k = 0..k_max."""
    target = engine.target
    cache = new_cache(target)
    forward(target, cache, context[:-1], last_only=True)
    return [_median_seconds(lambda k=k: verify_forward(target, cache, [context[-1]] * (k + 1), engine.verify_pad_multiple),
                            cache, len(context) - 1, repeats)
            for k in range(k_max + 1)]


def _median_seconds(run, cache, keep: int, repeats: int) -> float:
    """Median wall seconds of run() over `repeats` calls after one warm-up (a new shape's first call
    is slower), rolling `cache` back to `keep` positions after each."""
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
        rollback(cache, keep)
    return statistics.median(times[1:])
