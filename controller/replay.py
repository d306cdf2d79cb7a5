"""Offline replay of recorded traffic through policies (`draftpick replay`).

A trace (see workers.record) fixes, for every request, each drafter's proposals
and matches at every position and the measured costs; so the rounds, seconds and
tokens of any arm on any request follow exactly, and the oracle (best arm per
request in hindsight) and the best fixed arm are computed from the same numbers.

Replay mirrors the controller: a policy chooses (once per request, or every round
for round-level policies), the rounds are simulated, their feedback is folded into a
plain dict of statistics through the policy's `increments`, and the next request
sees the updated statistics. Request-level policies receive one aggregated record
per request (its rounds summed, see policies.types.aggregate: one observation per
request), which is what makes 100,000 requests take seconds; round-level
policies are simulated and folded round by round.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from draftpick.policies.base import record_arm
from draftpick.policies.state import add
from draftpick.policies.types import Arm, Choice, Context, Rerun, RoundRecord, SoFar, aggregate
from draftpick.workers.engine import counterfactual_walks
from draftpick.workers.trace import TraceError, TraceRequest, load_trace


def trace_drafters(reqs: list[TraceRequest]) -> list[str]:
    """The drafters every request of the trace measured."""
    return sorted(set.intersection(*(set(r.data["drafters"]) for r in reqs)))


def lookup_drafters(req: TraceRequest) -> list[str]:
    """The request's deterministic drafters (n-gram, suffix: no model confidence in the trace), whose
    proposals at any position follow from the output alone, so their rounds can be re-run exactly."""
    return [n for n, tr in req.data["drafters"].items() if "confidence" not in tr and "draft_confidence" not in tr]


def trace_arms(reqs: list[TraceRequest], ks=(1, 2, 3, 5, 8)) -> list[Arm]:
    """Every drafter in the trace at every k <= k_max, plus plain decoding."""
    k_max = min(r.data["k_max"] for r in reqs)
    drafters = trace_drafters(reqs)
    return [Arm("none", 0)] + [Arm(d, k) for d in drafters for k in ks if k <= k_max]


def at_load(reqs: list[TraceRequest], load: int) -> list[TraceRequest]:
    """The requests as if `load` requests were in flight, each verifying in one batched forward with
    the others: each verify cost scaled by the trace's batched costs (workers.record's
    batch_verify_s: a request's share of a forward where every request verifies k + 1 tokens, over
    the same alone; interpolated between the batch sizes measured), and the draft cost per token of
    a drafter that drafts requests together (batch_draft_s, where recorded) by its batched cost
    over its cost alone. The others are taken to draft as much as this request (a symmetric batch)."""
    if load == 1:
        return reqs
    out = []
    for r in reqs:
        table = r.data.get("batch_verify_s") or {}
        if "1" not in table or not _around(table, load):
            raise TraceError(f"request {r.data.get('id')}: --load {load} needs the trace's batched verify costs "
                             f"for 1 and sizes around it (recorded: {sorted(map(int, table)) or 'none'}); record it again")
        k_max = r.data["k_max"]
        verify = [v * _interpolate(table, load, k) / table["1"][k] for k, v in enumerate(r.data["verify_s"][: k_max + 1])]
        draft = dict(r.data["draft_s_per_token"])
        for name, costs in (r.data.get("batch_draft_s") or {}).items():
            if name in draft and "1" in costs and _around(costs, load):
                draft[name] *= _interpolate(costs, load) / costs["1"]
        out.append(TraceRequest(dict(r.data, verify_s=verify, draft_s_per_token=draft, batch=load)))
    return out


def _around(table: dict, load: int) -> bool:
    """Whether a {batch size: ...} table measured sizes on both sides of `load`."""
    sizes = sorted(int(b) for b in table)
    return len(sizes) >= 2 and sizes[0] <= load <= sizes[-1]


def _interpolate(table: dict, load: int, k: int | None = None) -> float:
    """table[B] (or table[B][k]) at B = load, linear between the measured sizes around it."""
    sizes = sorted(int(b) for b in table)
    lo, hi = max(b for b in sizes if b <= load), min(b for b in sizes if b >= load)
    at = (lambda b: table[str(b)]) if k is None else (lambda b: table[str(b)][k])
    w = 0.0 if hi == lo else (load - lo) / (hi - lo)
    return (1 - w) * at(lo) + w * at(hi)


def simulate(req: TraceRequest, choose, arms: list[Arm], t0: float = 0.0) -> tuple[list[RoundRecord], float]:
    """Rounds of one request; choose(round, last_record) -> Choice. Returns (records, seconds)."""
    d = req.data
    n, max_tokens, verify = d["num_tokens"], d["max_tokens"], d["verify_s"]
    records: list[RoundRecord] = []
    g, seconds, last = 1, d["prefill_s"], None
    while g < n:
        choice = choose(len(records), last)
        arm = choice.arm
        k = min(arm.k, max_tokens - g - 1, d["k_max"])
        proposed = matched = 0
        if k > 0:
            tr = d["drafters"].get(arm.drafter)
            if tr is None:
                raise TraceError(f"request {d.get('id')}: the trace has no drafter {arm.drafter!r}")
            proposed = min(k, tr["proposed"][g - 1])
            if choice.threshold is not None and "draft_confidence" in tr:  # per round start (feature drafters)
                proposed = min(proposed, _confident(tr["draft_confidence"][g - 1], 0, proposed, choice.threshold))
            elif choice.threshold is not None and "confidence" in tr:
                proposed = min(proposed, _confident(tr["confidence"], g, proposed, choice.threshold))
            matched = min(tr["matched"][g - 1], proposed)
        emitted = min(matched + 1, n - g)
        # the played drafter is judged on its own draft, as live (workers.engine._own_acceptance): up to
        # its first rejection; a draft shorter than asked (nothing more to propose) closes with a 0
        own = [1.0] * matched + ([0.0] if matched < proposed or (proposed < k and choice.threshold is None) else [])
        draft_s = d["draft_s_per_token"].get(arm.drafter, 0.0) * proposed
        rec = RoundRecord(
            drafter=arm.drafter if k else "none", k=k, num_drafted=proposed, accepted=matched,
            emitted=emitted, draft_s=draft_s, verify_s=verify[proposed], propensity=choice.propensity,
            accepted_per_pos=[1] * matched + ([0] if matched < proposed else []),
            per_drafter=_per_drafter(d, g, matched + 1, arm.drafter if k else "none", own), context=d.get("tag", ""), features=d.get("features", []),
            time=t0, threshold=choice.threshold, load=d.get("batch", 1), batch=d.get("batch", 1),
        )
        records.append(rec)
        seconds += draft_s + verify[proposed]
        g += emitted
        last = rec
    return records, seconds


def _path(chosen: list[Arm]) -> str:
    """The arms a policy chose for a request's rounds, in order, each run of equal arms once
    ("chat:3>ngram:8")."""
    arms: list[str] = []
    for a in map(str, chosen):
        if not arms or arms[-1] != a:
            arms.append(a)
    return ">".join(arms)


def _confident(conf: list[float], g: int, k: int, threshold: float) -> int:
    """Tokens drafted when drafting stops after the first token whose confidence is below threshold."""
    j = 0
    while j < k:
        j += 1
        if g + j - 1 >= len(conf) or conf[g + j - 1] < threshold:
            break
    return j


def _per_drafter(d: dict, g: int, verified: int, played: str, own: list[float]) -> dict[str, list[float]]:
    """The acceptance on the round's verified positions (censored there, as live) of every
    full-information drafter but the played one, whose list is `own` (a drafter recorded with
    `full_information: false` is measured live only in the rounds it plays). A round without room
    to draft is plain decoding (played "none"): its drafter is then measured as any other.
    A proposal that ends inside the verified positions counts as rejected after its end."""
    out = {}
    for name, tr in d["drafters"].items():
        if name == played:
            out[name] = own
            continue
        if not tr.get("full_information", True):
            continue
        p, m = tr["proposed"][g - 1], tr["matched"][g - 1]
        out[name] = ([1.0] * min(m, p) + ([0.0] if m < p or p < verified else []))[:verified]
    return out


def rerun_rounds(req: TraceRequest, n: int) -> Rerun | None:
    """Per lookup drafter of a trace request, the rounds of (drafter, k), k = 1 .. k_max, over its first
    n tokens, and the rows they draft: the engine's walk (workers.engine.counterfactual_walks) over the
    trace's proposals and matches, each match cut at the n-th token (a match never exceeds the proposal
    nor the output). None when the request has no lookup drafter."""
    d = req.data
    rounds, drafted = {}, {}
    for name in lookup_drafters(req):
        tr = d["drafters"][name]
        matched = [min(m, n - g) for g, m in enumerate(tr["matched"][: n - 1], start=1)]
        rounds[name], drafted[name] = counterfactual_walks(matched, tr["proposed"][: n - 1], d["k_max"], n,
                                                           d["max_tokens"])
    return Rerun(rounds, float(n - 1), drafted) if rounds else None


class Replayer:
    """Caches each request's outcome under each fixed arm; replays policies over shuffled passes."""

    def __init__(self, reqs: list[TraceRequest], arms: list[Arm] | None = None, counterfactual: bool = True):
        """counterfactual: each request's feedback carries the exact rounds of every deterministic
        (lookup) drafter's arms along its output, as the engine's would (policies.types.RoundRecord)."""
        self.reqs = reqs
        self.arms = arms or trace_arms(reqs)
        self.counterfactual = counterfactual
        self._fixed: dict[tuple[int, Arm], tuple[RoundRecord, float, int]] = {}
        self._cf: dict[int, Rerun | None] = {}

    def fixed(self, i: int, arm: Arm) -> tuple[RoundRecord, float, int]:
        """(aggregated record, seconds, tokens) of request i under a fixed arm."""
        key = (i, arm)
        if key not in self._fixed:
            recs, secs = simulate(self.reqs[i], lambda r, last: Choice(arm, 1.0), self.arms)
            agg = self.with_counterfactual(i, aggregate(recs)) if recs else None
            self._fixed[key] = (agg, secs, self.reqs[i].n)
        return self._fixed[key]

    def with_counterfactual(self, i: int, record: RoundRecord) -> RoundRecord:
        """The record with request i's counterfactual rounds (when enabled): per lookup drafter, the
        rounds of (drafter, k) for k = 1 .. k_max over the request's tokens after the prefill."""
        if not self.counterfactual:
            return record
        if i not in self._cf:
            self._cf[i] = rerun_rounds(self.reqs[i], self.reqs[i].data["num_tokens"])
        if self._cf[i] is None:
            return record
        return replace(record, counterfactual=self._cf[i].rounds, counterfactual_tokens=self._cf[i].tokens,
                       counterfactual_drafted=self._cf[i].drafted)

    def table(self) -> np.ndarray:
        """[requests, arms] seconds under each fixed arm."""
        return np.array([[self.fixed(i, a)[1] for a in self.arms] for i in range(len(self.reqs))])

    def run(self, policy, repeat: int = 1, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        stats: dict[str, float] = {}
        seconds = self.table()
        oracle = seconds.min(1)
        best_fixed = int(np.argmin(seconds.sum(0)))
        total_tok = total_s = 0.0
        regret_oracle, regret_fixed, choices = [], [], []
        per_request: list[list[tuple[float, str]]] = [[] for _ in self.reqs]
        t = 0.0
        for _ in range(repeat):
            for i in rng.permutation(len(self.reqs)):
                req = self.reqs[i]
                ctx = Context(tag=req.data.get("tag", ""), features=tuple(req.data.get("features", ())), time=t,
                              load=req.data.get("batch", 1))
                if policy.level == "round":
                    recs, secs, chosen = self._per_round(policy, i, ctx, stats, rng, t)
                    arm = str(record_arm(recs[0])) if recs else "none:0"
                    path = _path([c.arm for c in chosen])
                else:
                    choice = policy.select(ctx, stats, rng)
                    agg, secs, _ = self.fixed(i, choice.arm)
                    recs = []
                    if agg is not None:
                        add(stats, policy.increments(replace(agg, propensity=choice.propensity, time=t)))
                    arm = path = str(choice.arm)
                per_request[i].append((secs, path))
                total_tok += req.n
                total_s += secs
                regret_oracle.append(secs - oracle[i])
                regret_fixed.append(secs - seconds[i, best_fixed])
                choices.append(arm)
                t += 1.0
        return {
            "tokens_per_s": total_tok / total_s,
            "regret_vs_oracle": float(np.sum(regret_oracle)),
            "regret_vs_best_fixed": float(np.sum(regret_fixed)),
            "requests": len(choices),
            "cumulative_regret_vs_oracle": np.cumsum(regret_oracle),
            "choices": choices,
            "per_request": self._per_request_table(per_request, seconds, best_fixed),
        }

    def _per_request_table(self, per_request, seconds, best_fixed) -> list[dict]:
        """Per trace request: the oracle's arm and seconds, the best fixed arm's, the policy's mean
        seconds over the second half of its passes (after learning), and the arms it played there
        ("a>b": switched from a to b within the request) with how often."""
        rows = []
        for i, plays in enumerate(per_request):
            late = plays[len(plays) // 2:] or plays
            paths: dict[str, int] = {}
            for _, p in late:
                paths[p] = paths.get(p, 0) + 1
            o = int(np.argmin(seconds[i]))
            rows.append({"id": self.reqs[i].data.get("id"), "tokens": self.reqs[i].n,
                         "oracle_arm": str(self.arms[o]), "oracle_s": float(seconds[i, o]),
                         "best_fixed_s": float(seconds[i, best_fixed]),
                         "policy_s": float(np.mean([s for s, _ in late])) if late else None,
                         "played": dict(sorted(paths.items(), key=lambda kv: -kv[1]))})
        return rows

    def _per_round(self, policy, i, ctx, stats, rng, t):
        req = self.reqs[i]

        so_far, seen, chosen = SoFar(), [], []

        def choose(r, last):
            if last is not None:
                seen.append(last)
            choice = policy.select(replace(ctx, round=r, last=last, request=so_far.update(seen), rerun=rerun,
                                           previous=chosen[-1] if chosen else None), stats, rng)
            chosen.append(choice)
            return choice

        def rerun():  # the rounds so far re-run, as the engine's Generation.rerun
            n = 1 + sum(r.emitted for r in seen)
            return rerun_rounds(req, n) if self.counterfactual and n >= 2 else None

        recs, secs = simulate(req, choose, self.arms, t0=t)
        if recs:  # the request's counterfactual comes with its last round, as the engine's would
            recs[-1] = self.with_counterfactual(i, recs[-1])
        for rec in recs:
            add(stats, policy.increments(rec))
        return recs, secs, chosen

    def oracle(self) -> dict:
        seconds = self.table()
        tokens = sum(r.n for r in self.reqs)
        best = int(np.argmin(seconds.sum(0)))
        return {
            "oracle": {"tokens_per_s": tokens / seconds.min(1).sum()},
            "best_fixed": {"arm": str(self.arms[best]), "tokens_per_s": tokens / seconds[:, best].sum()},
            "fixed": {str(a): tokens / seconds[:, j].sum() for j, a in enumerate(self.arms)},
        }


def estimate_bias(rp: Replayer, played: list[Arm] | None = None) -> dict:
    """How far the full-information estimate of each arm's tokens per round is from the truth.

    For each played arm P (default: plain decoding and the best fixed arm), every request is
    simulated under P and its rounds' full-information feedback folded into reach / hit counts,
    as `hedge` and `contextual` fold them; each arm A's tokens per round estimated from those
    counts is compared with A's true tokens per round (A's own rounds, simulated). Rounds start
    where P's rounds start, not where A's would: that is the bias this measures.
    Returns {"P": {"A": {"estimated", "true", "bias"}}} with bias = estimated / true - 1."""
    from draftpick.policies.base import key
    from draftpick.policies.estimators import arm_tokens_per_round, position_increments

    if played is None:
        best = rp.oracle()["best_fixed"]["arm"]
        played = [Arm("none", 0)] + [a for a in rp.arms if str(a) == best and a.k > 0]
    true = {}
    for a in rp.arms:
        recs = [rp.fixed(i, a)[0] for i in range(len(rp.reqs))]
        true[a] = sum(r.emitted for r in recs if r) / max(sum(r.rounds for r in recs if r), 1)
    out = {}
    for p in played:
        stats: dict[str, float] = {}
        for i in range(len(rp.reqs)):
            agg = rp.fixed(i, p)[0]
            if agg is not None:
                add(stats, position_increments(agg))
        est = arm_tokens_per_round(stats, rp.arms)
        # an arm whose drafter was never measured (one recorded with full_information: false, not
        # played) has no estimate, only the optimistic default: left out
        measured = {a.drafter for a in rp.arms if stats.get(key("reach", a.drafter, 0)) or stats.get(key("cftok", a.drafter))}
        out[str(p)] = {str(a): {"estimated": float(e), "true": true[a], "bias": float(e) / true[a] - 1}
                       for a, e in zip(rp.arms, est) if a.k > 0 and a.drafter in measured}
    return out


def keep_drafters(reqs: list[TraceRequest], names: list[str]) -> None:
    """Drop every other drafter from the trace, as if only these had been configured."""
    known = trace_drafters(reqs)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise TraceError(f"--drafters: {', '.join(unknown) or 'none given'} not in the trace; "
                         f"its drafters: {', '.join(known)}")
    for r in reqs:
        r.data["drafters"] = {n: t for n, t in r.data["drafters"].items() if n in names}


def replay(trace: str, policy_specs: list[str], repeat: int = 1, seed: int = 0, scale: float | None = None,
           configs: dict | None = None, ignore_tags: bool = False,
           drafters: list[str] | None = None, estimates: bool = False,
           counterfactual: bool = True, load: int = 1, ks: list[int] | None = None) -> tuple[dict, dict]:
    """Returns (the documented OUT.json object, per-policy series for the plot)."""
    from draftpick.policies.registry import create

    reqs = load_trace(trace)
    if ignore_tags:  # policies then see only the prompt features
        for r in reqs:
            r.data["tag"] = ""
    if drafters is not None:
        keep_drafters(reqs, drafters)
    reqs = at_load(reqs, load)
    if ks is not None and (not ks or min(ks) < 1):
        raise TraceError(f"--ks: draft lengths must be >= 1, got {ks}")
    rp = Replayer(reqs, trace_arms(reqs, tuple(sorted(set(ks)))) if ks else None, counterfactual=counterfactual)
    ref = rp.oracle()
    # reward scale: the oracle's tokens/s (so rewards are in [0, 1] with room to spare)
    scale = scale or 1.5 * ref["oracle"]["tokens_per_s"]
    out = {"policies": {}, **{k: ref[k] for k in ("oracle", "best_fixed")}, "fixed_arms": ref["fixed"],
           "arms": [str(a) for a in rp.arms], "requests_in_trace": len(reqs), "repeat": repeat, "seed": seed,
           "tags": not ignore_tags, "reward_scale": scale, "counterfactual": counterfactual, "load": load}
    if estimates:
        out["estimate_bias"] = estimate_bias(rp)
    series = {}
    for spec in policy_specs:
        cfg = dict((configs or {}).get(spec, {}))
        if spec in ("fixed",) and "arm" not in cfg:
            cfg["arm"] = ref["best_fixed"]["arm"]
        # the trace's reward scale goes to the policies that take a `scale` option
        policy = create(spec, rp.arms, cfg, offered={"scale": scale})
        t0 = time.perf_counter()
        res = rp.run(policy, repeat, seed)
        wall = time.perf_counter() - t0
        series[spec] = res
        out["policies"][spec] = {
            "tokens_per_s": res["tokens_per_s"],
            "ratio_vs_oracle": res["tokens_per_s"] / ref["oracle"]["tokens_per_s"],
            "ratio_vs_best_fixed": res["tokens_per_s"] / ref["best_fixed"]["tokens_per_s"],
            "regret_vs_oracle": res["regret_vs_oracle"],
            "regret_vs_best_fixed": res["regret_vs_best_fixed"],
            "replay_wall_s": wall,
            "requests_replayed": res["requests"],
            "per_request": res["per_request"],
        }
    return out, series


def summary_lines(out: dict, per_request: bool = False) -> list[str]:
    """What `draftpick replay` prints: the oracle, the best fixed arm, and each policy's ratios
    (with per_request, each policy's per-request table, worst against the oracle first)."""
    lines = [f"oracle {out['oracle']['tokens_per_s']:.2f} tok/s; best fixed {out['best_fixed']['arm']} "
             f"{out['best_fixed']['tokens_per_s']:.2f} tok/s"]
    for name, p in out["policies"].items():
        lines.append(f"{name:>16}: {p['tokens_per_s']:.2f} tok/s  {p['ratio_vs_oracle']:.3f} x oracle  "
                     f"{p['ratio_vs_best_fixed']:.3f} x best fixed  ({p['requests_replayed']} requests in "
                     f"{p['replay_wall_s']:.1f} s)")
    if per_request:
        for name, p in out["policies"].items():
            lines.append(f"{name}, per request (second half of the passes): tokens, oracle arm, seconds: "
                         f"oracle / best fixed / policy, arms played")
            for row in sorted(p["per_request"], key=lambda r: r["oracle_s"] / r["policy_s"]):
                played = ", ".join(f"{a} x{n}" for a, n in list(row["played"].items())[:3])
                lines.append(f"  {str(row['id'])[:24]:24s} {row['tokens']:4d} {row['oracle_arm']:>10s}  "
                             f"{row['oracle_s']:6.2f} / {row['best_fixed_s']:6.2f} / {row['policy_s']:6.2f}  {played}")
    for played, arms in out.get("estimate_bias", {}).items():
        worst = sorted(arms.items(), key=lambda kv: -abs(kv[1]["bias"]))[:5]
        lines.append(f"full-information estimates while playing {played} (tokens/round, estimated vs true): "
                     + ", ".join(f"{a} {v['estimated']:.2f} vs {v['true']:.2f} ({100 * v['bias']:+.0f} %)"
                                 for a, v in worst))
    return lines


def plot(series: dict, arms: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    for name, res in series.items():
        ax1.plot(res["cumulative_regret_vs_oracle"], label=name)
    ax1.set_xlabel("request")
    ax1.set_ylabel("cumulative regret vs oracle (s)")
    ax1.legend(fontsize=8)
    index = {a: i for i, a in enumerate(arms)}
    for j, (name, res) in enumerate(series.items()):
        ys = [index.get(c, -1) + (j - len(series) / 2) * 0.05 for c in res["choices"]]
        ax2.scatter(range(len(ys)), ys, s=1, label=name)
    ax2.set_yticks(range(len(arms)), arms, fontsize=7)
    ax2.set_xlabel("request")
    ax2.set_title("arm chosen")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
