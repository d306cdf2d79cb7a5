"""Per-round cost estimates for full-information policies (hedge, contextual).

Full-information feedback gives every arm's tokens per round, but only played arms show their
cost. A played arm's seconds per round are measured directly (they depend on the drafter as well
as on k: an n-gram drafter that finds no match verifies a single token); the estimate for an arm
shrinks toward a model: verify seconds per k pooled over drafters, with a prior
v(k) = v(0) * (1 + VERIFY_SLOPE * k) for draft lengths not yet played, plus the drafter's
seconds per drafted token times k. Statistics: cs|arm, cn|arm (seconds, rounds of a played
arm), vs|k, vn|k (verify seconds, rounds), ds|drafter, dn|drafter (draft seconds, tokens).

Load: a round batched with other requests pays its share of the forward, a / n + c + b rows
(workers.batched.ForwardCost: the weights' read split among the n requests, each request's own work c, each row's own
compute b), so a drafted token costs more of a step the fuller the batch, and what it costs does
not depend on what the other requests draft. The verify and per-arm seconds are also kept per load
level (`load_level` of the round's batch size: L0 alone, L1 2-3, L2 4-7, ...: L|<level>|vs|k, ...),
and a request's costs come from its level's statistics where there are any: at a batched level the
verify cost's slope in k is fitted from the draft lengths the level has seen (the prior slope until
two were seen).

Drafting together: a drafter that drafts the rounds of several requests in one call (a feature head
runs its layer and its vocabulary projection once per draft step for all of them) shares the call's
seconds among them by tokens, so what a drafted token costs depends on how many requests draft with
that drafter in the same step: a / m + b for a group of m (the head's weights read once, each row's
own compute). Where a drafter's rounds were seen in groups of different sizes (RoundRecord.draft_group),
its seconds per token are fitted as that line in 1 / m (dx|d, dxx|d, dsx|d with ds|d, dn|d), and an
arm's cost is its measured seconds less the drafting they measured (cd|arm, cdn|arm: seconds and
tokens, also per level) plus its drafted tokens at the rate of the group it would join now
(Context.drafting: the other requests drafting with that drafter). Without it a head played by many
requests at once looks cheap to the one request that would then draft alone with it. A drafter
never seen drafting is priced per token like the dearest drafter seen (alone), until its own rounds
are measured: priced at 0, an unmeasured head looked free, and was tried in a full batch.

Rows a request would draft: a lookup drafter proposes only where its context matches, so what an
arm's round costs depends on the request, not only on k (ngram:1 drafts in few rounds of a request that
rarely copies, in most rounds of one that copies), and the arm's measured seconds hold the rows it drafted
for the requests that played it. Per load level the verify seconds of a round are fitted as a line in its
drafted rows (L|<level>|rn, rd, rdd, rv, rvd: rounds, and sums of rows, rows², seconds, seconds x rows;
also over all levels: rn, rd, ..), the same for every arm (a round's share of a batched forward is
a / n + c + b x its rows), and the mean seconds of its rounds by their number of drafted rows
(L|<level>|pn|rows, pv|rows: a row's price moves with the drafts in flight, see row_cost). Given the rows a round of
an arm would draft for this request (round_costs' `rows`, e.g. from the request's rounds re-run:
policies.types.Rerun) and a weight, the arm's estimate is shrunk toward what its rounds at k rows and at
none cost in that mix (row_cost, each shrunk toward the line), plus the drafter's seconds for them, and
plain decoding is priced at a round of no rows, so that both are judged alike; at batched levels only
(alone, a verify forward's seconds step with its rows: few-row products take other kernel paths).
"""
from __future__ import annotations

import numpy as np

from draftpick.policies.base import key, record_arm
from draftpick.policies.types import Arm, RoundRecord

VERIFY_SLOPE = 0.06  # prior: each drafted token adds 6 % to a verify step (measured data replaces it)


def load_level(batch: int) -> int:
    """0 for a forward of one request, then floor(log2(batch)): 2-3 -> 1, 4-7 -> 2, 8-15 -> 3, ..."""
    return max(int(batch), 1).bit_length() - 1


def cost_increments(record: RoundRecord, tag: str = "") -> dict[str, float]:
    """With a tag, the played arm's seconds, rounds and emitted tokens are also counted under it
    (cs|tag|arm, cn|tag|arm, ct|tag|arm); the verify and arm seconds also under the round's load level."""
    arm = record_arm(record)
    seconds, rounds = record.verify_s + record.draft_s, float(record.rounds)
    level = key("L", load_level(record.batch))
    inc = {key("vs", record.k): record.verify_s, key("vn", record.k): rounds,
           key("cs", arm): seconds, key("cn", arm): rounds,
           key(level, "vs", record.k): record.verify_s, key(level, "vn", record.k): rounds,
           key(level, "cs", arm): seconds, key(level, "cn", arm): rounds}
    if tag:
        inc[key("cs", tag, arm)] = seconds
        inc[key("cn", tag, arm)] = rounds
        inc[key("ct", tag, arm)] = float(record.emitted)
    if rounds:  # the line of verify seconds in drafted rows, per level and over all (an aggregated record: at its mean)
        d = record.num_drafted / rounds
        for prefix in ("", level):
            inc.update({key(prefix, "rn"): rounds, key(prefix, "rd"): float(record.num_drafted),
                        key(prefix, "rdd"): rounds * d * d, key(prefix, "rv"): record.verify_s,
                        key(prefix, "rvd"): record.verify_s * d})
    if rounds == 1:  # a single round: its verify seconds by its number of drafted rows, per level (row_cost)
        inc[key(level, "pn", record.num_drafted)] = 1.0
        inc[key(level, "pv", record.num_drafted)] = record.verify_s
    if record.k:
        n, x = float(record.num_drafted), 1.0 / max(record.draft_group, 1)
        inc[key("ds", record.drafter)] = record.draft_s
        inc[key("dn", record.drafter)] = n
        inc[key("dx", record.drafter)] = n * x
        inc[key("dxx", record.drafter)] = n * x * x
        inc[key("dsx", record.drafter)] = record.draft_s * x
        for prefix in ("", level):
            inc[key(prefix, "cd", arm)] = record.draft_s
            inc[key(prefix, "cdn", arm)] = n
    return inc


MIN_SPREAD = 0.1  # the standard deviation of 1 / draft_group a drafter's rounds need before its line is fitted


def _fit(stats, w: str, x: str, xx: str, y: str, xy: str) -> tuple[float, float, float] | None:
    """(mean x, mean y, slope >= 0) of a least-squares line of y on x from the sums kept in `stats` under
    the names w (weights), x, xx, y, xy (weighted sums of x, x², y, x y); None without weight or where x
    spread less than MIN_SPREAD (standard deviation)."""
    n = stats.get(w, 0.0)
    if n <= 0:
        return None
    mx, my = stats.get(x, 0.0) / n, stats.get(y, 0.0) / n
    var = stats.get(xx, 0.0) / n - mx * mx
    if var < MIN_SPREAD ** 2:
        return None
    return mx, my, max((stats.get(xy, 0.0) / n - mx * my) / var, 0.0)


def draft_rate(stats, drafter: str, others: int) -> float | None:
    """Seconds per token of `drafter` drafting together with `others` other requests: the line
    a / m + b (m = others + 1) fitted to its rounds' seconds per token weighted by tokens; None where
    its rounds were not seen in groups of different sizes (MIN_SPREAD)."""
    fit = _fit(stats, *(key(s, drafter) for s in ("dn", "dx", "dxx", "ds", "dsx")))
    if fit is None:
        return None
    mx, my, a = fit
    b = my - a * mx
    if b < 0:  # a line through the mean with no fixed part
        a, b = my / mx, 0.0
    return a / (others + 1) + b


def alone_rate(stats, drafter: str) -> float | None:
    """Seconds per token of `drafter` drafting alone (draft_rate's line where fitted, else its mean;
    0 if its rounds never drafted a token); None if it never drafted a round."""
    ds, dn = stats.get(key("ds", drafter), 0.0), stats.get(key("dn", drafter), 0.0)
    if not ds and not dn:
        return None
    rate = draft_rate(stats, drafter, 0)
    return rate if rate is not None else (ds / dn if dn else 0.0)


def row_line(stats, level: str) -> tuple[float, float] | None:
    """(c, r): a round's verify seconds at a load level (`level`: "L|<n>", or "" for all) as c + r x its
    drafted rows, fitted over the level's rounds; None until they drafted different numbers of rows
    (MIN_SPREAD rows of standard deviation)."""
    fit = _fit(stats, *(key(level, s) for s in ("rn", "rd", "rdd", "rv", "rvd")))
    if fit is None:
        return None
    md, mv, r = fit
    return mv - r * md, r


def row_cost(stats, level: str, rows: int, line: tuple[float, float], prior_rounds: float) -> float:
    """A round's verify seconds at a load level when it drafts exactly `rows` rows: the mean over the
    level's rounds that did (pn|<level>|rows, pv|<level>|rows), shrunk toward the line (c, r) by
    `prior_rounds`. A round's seconds are its share of a batched forward (workers.batched.ForwardCost:
    a / n + c + b x its rows, b fitted over the recent forwards), and b moves with the drafts in flight:
    a pooled attention runs its members at the most rows any of them verifies, so while long drafts are
    played a row costs more (at 16 clients rounds of 1-2 rows came to 2.1-2.4 ms a row, the warm-up's
    8-row rounds to 3.5; docs/results.md). One line over all of them priced the one row of `ngram:1` at
    twice what its rounds cost; the mean by rows keeps each draft length at the price it was seen at."""
    c, r = line
    n, s = stats.get(key(level, "pn", rows), 0.0), stats.get(key(level, "pv", rows), 0.0)
    return (s + prior_rounds * (c + r * rows)) / (n + prior_rounds)


def round_costs(stats, arms: list[Arm], prior_rounds: float = 5.0, tag: str = "", load: int | None = None,
                drafting: dict[str, int] | None = None,
                rows: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """[K] estimated seconds per round of each arm (all 1.0 before anything was observed).
    With a tag, the arm's seconds measured under that tag come first, shrunk toward the rest.
    With a load (requests in flight), the statistics of its load level, where it has any.
    drafting: the other requests drafting with each drafter now (Context.drafting; none: alone),
    for the drafters whose cost per token was fitted by group size (draft_rate).
    rows: {arm index: (rows a round of the arm would draft for this request, weight w in [0, 1])}: at a
    batched load level, the arm's estimate is shrunk, by w, toward what those rows cost there: rows / k of
    its rounds at the seconds of a round that drafted k rows, the others at those of a round that drafted
    none (row_cost, toward row_line, else the verify prior v0 (1 + slope x rows)), plus the drafter's
    seconds a token; and plain decoding (k = 0) at a round that drafted none."""
    ks = sorted({a.k for a in arms})
    level = key("L", load_level(load)) if load is not None else ""
    if not level or not any(stats.get(key(level, "vn", k), 0.0) for k in ks):
        level = ""
    seen = {k: (stats.get(key(level, "vs", k), 0.0), stats.get(key(level, "vn", k), 0.0)) for k in ks}
    v0, slope = _verify_model(seen, fit=level not in ("", key("L", 0)))
    if v0 is None:
        return np.ones(len(arms))
    # a drafter never seen drafting is priced like the dearest seen, per token, until its rounds are measured
    dearest = max([r for r in (alone_rate(stats, d) for d in {a.drafter for a in arms if a.k}) if r is not None],
                  default=0.0)
    # rows price a round only at a batched level, where its verify is its share a / n + c + b x rows of the
    # forward; alone a verify forward's seconds step with its rows (few-row products take other kernel paths,
    # workers.models.small_batch_linears, or are padded), so a line through their mean misprices long drafts
    # (replay of the held-out trace alone: 1.047 -> 1.037 x the best fixed arm)
    batched = level not in ("", key("L", 0))
    line = (row_line(stats, level) or (v0, v0 * slope)) if rows and batched else None
    plain = row_cost(stats, level, 0, line, prior_rounds) if line is not None else None
    out = []
    for arm in arms:
        s, n = seen[arm.k]
        verify = (s + prior_rounds * v0 * (1 + slope * arm.k)) / (n + prior_rounds)
        ds, dn = stats.get(key("ds", arm.drafter), 0.0), stats.get(key("dn", arm.drafter), 0.0)
        per_token = ds / dn if dn else 0.0 if ds else dearest  # the drafter's mean seconds a drafted token
        model = verify + per_token * arm.k
        cs, cn = stats.get(key(level, "cs", arm), 0.0), stats.get(key(level, "cn", arm), 0.0)
        est = (cs + prior_rounds * model) / (cn + prior_rounds)
        rate = draft_rate(stats, arm.drafter, (drafting or {}).get(arm.drafter, 0)) if arm.k else None
        if rate is not None:  # the measured seconds less their drafting, plus the drafted tokens at today's rate
            cd, cdn = stats.get(key(level, "cd", arm), 0.0), stats.get(key(level, "cdn", arm), 0.0)
            est = ((cs - cd + prior_rounds * verify) + (cdn + prior_rounds * arm.k) * rate) / (cn + prior_rounds)
        if tag:
            cs, cn = stats.get(key("cs", tag, arm), 0.0), stats.get(key("cn", tag, arm), 0.0)
            est = (cs + prior_rounds * est) / (cn + prior_rounds)
        if line is not None and len(out) in rows and arm.k:
            # a lookup arm drafts its k rows where the context matches and none elsewhere: `mine` rows a
            # round (at most k) are mine / k of its rounds at k rows, the others at none
            mine, w = rows[len(out)]
            mine = min(mine, arm.k)
            at_rows = plain + max(row_cost(stats, level, arm.k, line, prior_rounds) - plain, 0.0) * mine / arm.k
            est = (1 - w) * est + w * (at_rows + (rate if rate is not None else per_token) * mine)
        elif line is not None and not arm.k:  # plain decoding: the level's rounds that drafted nothing
            est = plain
        out.append(est)
    return np.array(out)


def _verify_model(seen: dict[int, tuple[float, float]], fit: bool) -> tuple[float | None, float]:
    """(v0, slope) of verify seconds per round v(k) = v0 (1 + slope k) from the per-k means: the
    prior slope (v0 the mean of the v0s the means give), or with `fit` (a batched load level, where
    the slope grows with the batch) a least-squares line through the means (weighted by rounds)
    once two ks were seen."""
    pts = [(k, s / n, n) for k, (s, n) in seen.items() if n > 0]
    if not pts:
        return None, VERIFY_SLOPE
    if not fit or len({k for k, _, _ in pts}) < 2:
        return float(np.mean([v / (1 + VERIFY_SLOPE * k) for k, v, _ in pts])), VERIFY_SLOPE
    k, v, w = (np.array(c, dtype=float) for c in zip(*pts))
    A = np.stack([np.ones_like(k), k], 1) * np.sqrt(w)[:, None]
    a, b = np.linalg.lstsq(A, v * np.sqrt(w), rcond=None)[0]
    if a <= 0:  # a line through too few or noisy points: keep the prior's shape
        return float(np.average(v / (1 + VERIFY_SLOPE * k), weights=w)), VERIFY_SLOPE
    return float(a), float(max(b, 0.0) / a)
