"""The controller: decides each request's arm from the learned state, and folds feedback into it.

A plain class (testable without Ray; the service wraps it in an actor). `decide(context)` asks the
configured policy over a snapshot of the statistics in Redis (refreshed at most every `refresh_s`,
and kept when Redis is down, so decisions go on). `fold_pending()` consumes the feedback stream
with a consumer group: it first claims entries left pending by a dead consumer (XAUTOCLAIM), then
reads new ones, and folds each exactly once (controller.store). Request-level policies fold one
aggregated record per request and round-level ones every round, as `draftpick replay` does, so the
same records give the same statistics live and offline.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from draftpick.controller.feedback import BadRecord, FeedbackSink, parse_entry
from draftpick.controller.store import DONE_LIMIT, FOLD, GROUP, SCHEMA, Keys, entry_score, flatten, namespace
from draftpick.policies.base import record_arm
from draftpick.policies.state import add, decode
from draftpick.policies.types import Arm, Choice, Context, RoundRecord, SoFar, aggregate

log = logging.getLogger(__name__)
TOTALS = ("requests", "rounds", "draft_tokens", "accepted_tokens", "rejected_records", "dropped_records")


@dataclass(frozen=True)
class Plan:
    """A decision: the arm (k = 0: plain decoding), what the policy reported, and for round-level
    policies what the decision carries to the request's later rounds."""

    arm: Arm
    propensity: float
    threshold: float | None
    policy: str
    level: str  # "request" or "round"
    context: str
    decided_s: float  # seconds the decision took
    # round-level policies: what the decision carries to the request's later rounds (its Choice.note)
    note: tuple | None = None


def round_chooser(policy, context: Context, stats, rng, first: Choice | None = None):
    """choose(generation) -> Choice: a round-level policy asked before each round of one request, with
    the round's index, the last round, the request's rounds so far (and their re-run for the lookup
    drafters), the load now, the other requests drafting with each drafter, and its own last choice
    (the generation: its `records`, `load()`, `co_drafting()` and `rerun`, as workers.engine.Generation
    has them), over the statistics `stats()` returns then.
    first: the request's decision, as its first round's previous choice: the policy then reuses
    what it computed there (its note) instead of computing it again on the worker's engine thread."""
    so_far, previous = SoFar(), [first]

    def choose(g):
        ctx = replace(context, round=len(g.records), last=g.records[-1] if g.records else None,
                      request=so_far.update(g.records), load=g.load(), drafting=g.co_drafting(), rerun=g.rerun,
                      previous=previous[0])
        previous[0] = policy.select(ctx, stats(), rng)
        return previous[0]
    return choose


class Controller:
    def __init__(self, client, policy, description: dict, drafters: set[str], max_k: int,
                 consumer: str | None = None, refresh_s: float = 0.5, seed: int | None = None):
        self.client, self.policy, self.description = client, policy, description
        self.drafters, self.max_k = set(drafters) | {"none"}, max_k
        self.keys = Keys(namespace(description))
        self.consumer = consumer or f"controller-{uuid.uuid4().hex[:8]}"
        self.refresh_s = refresh_s
        self.rng = np.random.default_rng(seed)
        self.level = getattr(policy, "level", "request")  # "round": the policy also chooses every round
        self._snapshot: dict[str, float] = {}
        self._snapshot_at = -1e9
        self.redis_error: str | None = None
        self._fold = client.register_script(FOLD)
        self._setup()

    def _setup(self) -> None:
        import redis

        self.client.hsetnx(self.keys.meta, "description", json.dumps(self.description, sort_keys=True))
        try:  # from the stream's start: entries appended before any controller ran are folded too
            self.client.xgroup_create(self.keys.feedback, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- decisions --
    def snapshot(self) -> dict[str, float]:
        """The policy's statistics, at most refresh_s old; the last one while Redis is unreachable."""
        now = time.monotonic()
        if now - self._snapshot_at >= self.refresh_s:
            try:
                self._snapshot = decode(self.client.hgetall(self.keys.stats))
                self._snapshot_at, self.redis_error = now, None
            except Exception as e:  # Redis down: decide from the last statistics
                self.redis_error = f"{type(e).__name__}: {e}"
                self._snapshot_at = now
        return self._snapshot

    def decide(self, context: Context) -> Plan:
        t0 = time.perf_counter()
        choice: Choice = self.policy.select(context, self.snapshot(), self.rng)
        return Plan(choice.arm, choice.propensity, choice.threshold, self.policy.name, self.level, context.tag,
                    time.perf_counter() - t0, choice.note if self.level == "round" else None)

    def chooser(self, plan: Plan, context: Context):
        """The engine's round chooser for a plan: the plan's arm (request level), or the policy
        asked before every round (round level) with the request's rounds so far and the load now,
        over this controller's latest snapshot: the one read when the round comes (refreshed here
        and by each decision, read there without I/O: the chooser runs on the engine thread). A
        request's later rounds so see what was learned while it ran: frozen at its start, a request
        begun at 16 clients with only one client's costs learned kept a head drafting alone at
        every switch point (docs/results.md)."""
        if plan.level != "round":
            return lambda g: Choice(plan.arm, plan.propensity, plan.threshold)
        self.snapshot()
        first = Choice(plan.arm, plan.propensity, plan.threshold, note=plan.note) if plan.note is not None else None
        return round_chooser(self.policy, context, lambda: self._snapshot, self.rng, first)

    # -- feedback --
    def sink(self, max_buffer: int = 10_000) -> FeedbackSink:
        return FeedbackSink(self.client, self.keys.feedback, self.keys.totals, max_buffer)

    def increments(self, records: list[RoundRecord], context: str) -> tuple[dict, dict, dict]:
        """(policy statistics, totals, arm table) deltas of one request's records."""
        stats: dict[str, float] = {}
        folded = [aggregate(records)] if self.level == "request" else records
        for r in folded:
            add(stats, self.policy.increments(r))
        totals = {"requests": 1, "rounds": len(records), "draft_tokens": sum(r.num_drafted for r in records),
                  "accepted_tokens": sum(r.accepted for r in records)}
        arms: dict[str, float] = {}
        for r in records:
            base = f"{context or '-'}|{record_arm(r)}"
            add(arms, {f"{base}|rounds": 1, f"{base}|accepted": r.accepted, f"{base}|emitted": r.emitted,
                       f"{base}|seconds": r.draft_s + r.verify_s})
        return stats, totals, arms

    def fold(self, entry_id: str, data) -> bool:
        """Fold one stream entry (exactly once); returns whether this call folded it."""
        return self.fold_batch([(entry_id, data)]) == 1

    def fold_batch(self, entries: list[tuple[str, bytes]]) -> int:
        """Fold stream entries with one script call over their summed increments; a bad entry is
        counted and acknowledged, never folded. Returns how many this call folded (entries another
        consumer folded first are left out and the rest folded again)."""
        incs = {}
        for entry_id, data in entries:
            try:
                records, context = parse_entry(data, self.drafters, self.max_k)
                incs[entry_id] = self.increments(records, context)
            except BadRecord as e:
                log.warning("draftpick: feedback entry %s rejected: %s", entry_id, e)
                incs[entry_id] = ({}, {"rejected_records": 1}, {})
        keys = [self.keys.stats, self.keys.totals, self.keys.arms, self.keys.done, self.keys.feedback]
        while incs:
            ids = list(incs)
            sums: tuple[dict, dict, dict] = ({}, {}, {})
            for parts in incs.values():
                for total, part in zip(sums, parts):
                    add(total, part)
            args = [GROUP, DONE_LIMIT, len(ids), *ids, *(entry_score(i) for i in ids), *flatten(*sums)]
            already = [_id(i) for i in self._fold(keys=keys, args=args)]
            if not already:
                self._snapshot_at = -1e9  # the next decision reads the new statistics
                return len(ids)
            for i in already:
                del incs[i]
        return 0

    def fold_pending(self, count: int = 256, min_idle_ms: int = 30_000, block_ms: int | None = None) -> int:
        """Claim entries pending longer than min_idle_ms (a dead consumer's), then read new ones;
        fold them all. Returns how many this call folded."""
        folded = 0
        start = "0-0"
        while True:  # a dead consumer's entries first
            start, claimed, *_ = self.client.xautoclaim(self.keys.feedback, GROUP, self.consumer, min_idle_ms,
                                                       start_id=start, count=count)
            folded += self.fold_batch([(_id(i), f[b"data"]) for i, f in claimed if f])
            if _id(start) == "0-0":
                break
        while True:
            got = self.client.xreadgroup(GROUP, self.consumer, {self.keys.feedback: ">"}, count=count, block=block_ms)
            entries = got[0][1] if got else []
            if not entries:
                return folded
            folded += self.fold_batch([(_id(i), f[b"data"]) for i, f in entries])
            block_ms = None

    # -- what was learned --
    def stats(self) -> dict:
        """What `draftpick stats --json` prints."""
        totals = decode(self.client.hgetall(self.keys.totals))
        table: dict[tuple[str, str], dict[str, float]] = {}
        for field, v in decode(self.client.hgetall(self.keys.arms)).items():
            context, arm, name = field.rsplit("|", 2)
            table.setdefault((context, arm), {})[name] = v
        arms = []
        for (context, arm), t in sorted(table.items()):
            drafter, _, k = arm.rpartition(":")
            rounds = t.get("rounds", 0.0)
            arms.append({"context": "" if context == "-" else context, "drafter": drafter, "k": int(k),
                         "rounds": int(rounds), "mean_acceptance_length": 1 + t.get("accepted", 0.0) / rounds if rounds else None,
                         "tokens_per_s": t.get("emitted", 0.0) / t["seconds"] if t.get("seconds") else None})
        return {"namespace": self.keys.prefix, "policy": self.description.get("policy"),
                "totals": {k: int(totals.get(k, 0)) for k in TOTALS}, "arms": arms}

    def reset(self) -> None:
        """Forget this namespace's learned state and feedback."""
        self.client.delete(*self.keys.all())
        self._snapshot, self._snapshot_at = {}, -1e9
        self._setup()

    def status(self) -> dict:
        try:
            pending = self.client.xpending(self.keys.feedback, GROUP)["pending"]
            groups = {_id(g["name"]): g for g in self.client.xinfo_groups(self.keys.feedback)}
            undelivered = groups.get(GROUP, {}).get("lag") or 0
            rejected, dropped = (float(v or 0) for v in self.client.hmget(self.keys.totals, "rejected_records",
                                                                          "dropped_records"))
            return {"redis": "up", "pending": pending, "lag": pending + undelivered, "namespace": self.keys.prefix,
                    "rejected_records": rejected, "dropped_records": dropped}
        except Exception as e:
            return {"redis": f"down: {type(e).__name__}: {e}", "namespace": self.keys.prefix}


def _id(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def fingerprint(obj) -> str:
    """A drafter's or model's fingerprint: its configuration and a sample of every weight tensor
    (first and last values and the sum of each), so other weights give another namespace."""
    h = hashlib.sha256()
    model = getattr(obj, "model", None) or getattr(obj, "head", None) or obj
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    # a feature head's trained state leaves out its unused (randomly initialised) token embedding
    params = getattr(model, "trained_state", None) or getattr(model, "state_dict", None)
    if callable(params):
        for name, t in sorted(params().items()):
            flat = t.detach().float().flatten().cpu()
            h.update(name.encode() + str(tuple(t.shape)).encode())
            h.update(flat[:64].numpy().tobytes() + flat[-64:].numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    else:  # model-free drafters: their settings
        h.update(json.dumps({k: v for k, v in vars(obj).items() if isinstance(v, (int, float, str))},
                            sort_keys=True).encode())
    kept = getattr(obj, "kept", None)
    if kept is not None:
        h.update(str(kept.tolist() if hasattr(kept, "tolist") else kept).encode())
    return h.hexdigest()[:16]


def describe(cfg, engine) -> dict:
    """What a namespace stands for: the service (serve.name), the schema, the target's and each
    drafter's fingerprint, the policy."""
    return {
        "service": cfg.serve.name,
        "schema": SCHEMA,
        "target": {"name": cfg.target.name, "fingerprint": fingerprint(engine.target)},
        "drafters": {n: {"type": type(d).__name__, "fingerprint": fingerprint(d)}
                     for n, d in engine.drafters.items() if n != "none"},
        "policy": cfg.policy.name, "options": cfg.policy.options, "arms": [str(a) for a in cfg.arms()],
    }


def from_config(cfg, engine, client, **kw) -> Controller:
    return Controller(client, cfg.build_policy(), describe(cfg, engine), set(engine.drafters), cfg.engine.max_k, **kw)
