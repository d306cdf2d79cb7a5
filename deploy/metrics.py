"""Prometheus metrics of the endpoint (`GET /metrics`), with vLLM's names where vLLM has one.

Per request, from the worker's final event (its rounds and the policy's plan):
- `draftpick:spec_decode_num_drafts_total{drafter}`: rounds that drafted;
- `draftpick:spec_decode_num_draft_tokens_total{drafter}`, `..._num_accepted_tokens_total{drafter}`;
- `draftpick:spec_decode_num_accepted_tokens_per_pos_total{drafter,position}`;
- `draftpick:request_success_total{finished_reason}`, `draftpick:prompt_tokens_total`,
  `draftpick:generation_tokens_total`;
- `draftpick:controller_decisions_total{arm,policy}`: arms the policy chose;
- `draftpick:time_to_first_token_seconds`, `draftpick:inter_token_latency_seconds` (histograms);
- `draftpick:round_batch_size` (histogram): per round, the requests its batched forward verified;
- `draftpick:request_errors_total{status}`: refused requests by HTTP status.
At scrape time, from a worker's status (gauges; with several worker replicas, the one that answered):
- `draftpick:feedback_lag_entries`: feedback entries appended but not yet folded;
- `draftpick:feedback_records{state}`: the worker's sink (`appended`, `buffered`, `dropped`);
- `draftpick:feedback_rejected_records`, `draftpick:feedback_dropped_records`: the controller's totals;
- `draftpick:prefix_cache_queries`, `draftpick:prefix_cache_hits`: prompt tokens looked up in the
  worker's prefix cache, and those found there (not prefilled), since it started;
- `draftpick:forward_seconds{phase}`: the target's forward seconds since the worker started, spent on
  prompts (`prefill`) and on rounds (`decode`), a batched forward's seconds shared by its requests' rows.
Each ingress replica counts its own requests (Prometheus sums replicas).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

P = "draftpick:"
disable_created_metrics()  # no `_created` twin of every sample
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()

        def counter(name, doc, labels=()):
            return Counter(P + name, doc, labels, registry=r)

        self.drafts = counter("spec_decode_num_drafts", "Rounds that drafted", ["drafter"])
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed", ["drafter"])
        self.accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted", ["drafter"])
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted by "
                                        "position in the draft (0 first)", ["drafter", "position"])
        self.requests = counter("request_success", "Requests answered, by finish reason", ["finished_reason"])
        self.errors = counter("request_errors", "Requests refused, by HTTP status", ["status"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of answered requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.decisions = counter("controller_decisions", "Arms the policy chose", ["arm", "policy"])
        self.ttft = Histogram(P + "time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Between tokens (a step's tokens share its gap)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram(P + "round_batch_size", "Requests verified in the forward of each round",
                               buckets=BATCH_BUCKETS, registry=r)
        self.lag = Gauge(P + "feedback_lag_entries", "Feedback entries appended but not yet folded", registry=r)
        self.feedback = Gauge(P + "feedback_records", "The worker's feedback sink", ["state"], registry=r)
        self.rejected = Gauge(P + "feedback_rejected_records", "Feedback records the controller refused", registry=r)
        self.dropped = Gauge(P + "feedback_dropped_records", "Feedback records dropped (Redis down too long)",
                             registry=r)
        self.prefix_queries = Gauge(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                    registry=r)
        self.prefix_hits = Gauge(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)",
                                 registry=r)
        self.forward = Gauge(P + "forward_seconds", "The target's forward seconds since the worker started, by phase "
                             "(a batched forward's seconds shared among its requests' prefills and rounds)", ["phase"],
                             registry=r)

    def observe_result(self, final: dict) -> None:
        """A request's final worker event: {"result", "records", "plan"}."""
        res = final["result"]
        self.requests.labels(res["finish_reason"]).inc()
        self.prompt_tokens.inc(len(res["prompt_token_ids"]))
        self.generation_tokens.inc(len(res["token_ids"]))
        for r in final["records"]:
            self.batch.observe(r.get("batch", 1))
            if r["drafter"] == "none" or r["num_drafted"] == 0:
                continue
            d = r["drafter"]
            self.drafts.labels(d).inc()
            self.draft_tokens.labels(d).inc(r["num_drafted"])
            self.accepted.labels(d).inc(r["accepted"])
            for pos in range(r["accepted"]):
                self.accepted_per_pos.labels(d, str(pos)).inc()
        plan = final.get("plan")
        if plan is not None:
            self.decisions.labels(plan["arm"], plan["policy"]).inc()

    def observe_worker(self, status: dict) -> None:
        """A worker's status (workers.actor.EngineWorker.status) at scrape time."""
        if "lag" in status:
            self.lag.set(status["lag"])
        for state in ("appended", "buffered", "dropped"):
            if state in status.get("feedback", {}):
                self.feedback.labels(state).set(status["feedback"][state])
        if "rejected_records" in status:
            self.rejected.set(status["rejected_records"])
        if "dropped_records" in status:
            self.dropped.set(status["dropped_records"])
        if "prefix_cache" in status:
            self.prefix_queries.set(status["prefix_cache"]["queried_tokens"])
            self.prefix_hits.set(status["prefix_cache"]["reused_tokens"])
        for phase, seconds in status.get("forward_s", {}).items():
            self.forward.labels(phase).set(seconds)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
