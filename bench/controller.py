"""`draftpick bench controller`: what deciding and learning cost, next to what a request costs.

1. Real requests: the configured engine generates a few prompts (decided by the policy), which
   gives real round records and the time to first token (the prefill).
2. Decisions in process: `Controller.decide` repeated over the learned state: p50 / p99 latency,
   and its share of the time to first token.
3. Folding: the records of those requests appended N times (contexts cycled) through the
   feedback sink, then folded: entries and records per second, and Redis commands per request
   (from INFO commandstats: append + fold; decisions read the statistics at most twice a second).
4. Decisions through Ray: C concurrent callers asking the controller actor for S seconds.

Redis is a private embedded server in a temporary directory unless REDIS_URL is set.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace

from draftpick.bench import machine, write_results

PROMPTS = [{"prompt": "def fibonacci(n):\n"}, {"messages": [{"role": "user", "content": "Name three colours."}]},
           {"prompt": "import json\n\ndef load(path):\n"}, {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}]


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML configuration (default: the embedded one)")
    p.add_argument("--requests", type=int, default=2000, help="feedback entries appended and folded")
    p.add_argument("--decisions", type=int, default=2000, help="in-process decisions timed")
    p.add_argument("--callers", type=int, default=8, help="concurrent callers of the controller actor")
    p.add_argument("--seconds", type=float, default=5.0, help="how long the callers call")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="bench-results", help="directory for the JSON and markdown results")


def run(args) -> int:
    from draftpick.controller.local import LocalLearning
    from draftpick.workers.config import load_config
    from draftpick.workers.factory import build_engine
    from draftpick.workers.inputs import encode_inputs
    from draftpick.workers.sampling import SamplingParams

    if min(args.requests, args.decisions, args.callers) < 1 or args.seconds <= 0:
        raise ValueError("--requests, --decisions, --callers must be >= 1 and --seconds > 0")
    cfg = load_config(args.config)
    engine = build_engine(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        learning = LocalLearning(cfg, engine, data_dir=tmp)  # REDIS_URL, else a private server in tmp
        try:
            results = [learning.generate(item, ids, SamplingParams(max_tokens=args.max_tokens))
                       for item, ids in zip(PROMPTS, encode_inputs(engine.tokenizer, PROMPTS))]
            learning.sink.close()
            ctrl = learning.controller
            ctrl.fold_pending()
            report = {"how": _how(args, cfg), "requests_generated": len(results)}
            report["decisions"] = _decisions(ctrl, results, args.decisions)
            report["folding"] = _folding(ctrl, results, args.requests)
            report["ray"] = _ray_decisions(cfg, ctrl, learning.redis_url, args.callers, args.seconds)
        finally:
            learning.close()
    write_results(args.out, "controller", report, _markdown(report))
    return 0


def _how(args, cfg) -> dict:
    return {"command": "draftpick bench controller " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "controller"]
            else "bench", "machine": machine(), "policy": cfg.policy.name, "arms": len(cfg.arms()),
            "method": "decisions timed in process and through Ray; folding of appended real records; Redis commands "
                      "from INFO commandstats"}


def _decisions(ctrl, results, n: int) -> dict:
    from draftpick.policies.features import prompt_features
    from draftpick.policies.types import Context

    ctxs = [Context(tag=t, features=prompt_features("x", res.prompt_token_ids)) for (res, _), t in
            zip(results, ["", "code", "chat", ""])]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        ctrl.decide(ctxs[i % len(ctxs)])
        times.append(time.perf_counter() - t0)
    times.sort()
    ttft = statistics.median(res.prefill_s for res, _ in results)
    p50, p99 = times[len(times) // 2], times[int(0.99 * (len(times) - 1))]
    return {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "ttft_ms": 1e3 * ttft, "p50_share_of_ttft": p50 / ttft,
            "decisions": n}


SENT = ("xadd", "evalsha", "eval", "xreadgroup", "xautoclaim", "hgetall", "exec")  # what clients send


def _commands(client) -> tuple[int, int]:
    """(commands Redis executed, those a client sent (pipelined: fewer round trips); the rest ran inside the fold script)."""
    stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}
    return sum(stats.values()), sum(stats.get(c, 0) for c in SENT)


def _folding(ctrl, results, n: int) -> dict:
    from types import SimpleNamespace

    sink = ctrl.sink(max_buffer=n + 1)
    before = _commands(ctrl.client)
    contexts = ["", "code", "chat", "math"]
    t0 = time.perf_counter()
    for i in range(n):
        res, _ = results[i % len(results)]
        records = [replace(r, context=contexts[i % 4]) for r in res.records]
        sink(SimpleNamespace(records=records, context=contexts[i % 4], tenant=""))
    sink.close(120)
    appended = time.perf_counter() - t0
    t1 = time.perf_counter()
    folded = 0
    while folded < n:
        got = ctrl.fold_pending(count=512)
        if not got:
            break
        folded += got
    fold_s = time.perf_counter() - t1
    after = _commands(ctrl.client)
    commands, trips = after[0] - before[0], after[1] - before[1]
    records = sum(len(results[i % len(results)][0].records) for i in range(n))
    return {"entries": folded, "records": records, "append_per_s": n / appended, "entries_per_s": folded / fold_s,
            "records_per_s": records / fold_s, "redis_commands_per_request": commands / n,
            "redis_commands_sent_per_request": trips / n}


def _ray_decisions(cfg, ctrl, redis_url: str, callers: int, seconds: float) -> dict:
    import ray

    from draftpick.controller.actor import start_controller, stop_controller
    from draftpick.policies.types import Context

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        actor = start_controller(cfg, ctrl.description, redis_url)
        ray.get(actor.decide.remote(Context()))
        counts, latencies = [0] * callers, [[] for _ in range(callers)]
        stop = time.monotonic() + seconds

        def call(i):
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                ray.get(actor.decide.remote(Context()))
                latencies[i].append(time.perf_counter() - t0)
                counts[i] += 1

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lat = sorted(x for per in latencies for x in per)
        local = _local_rate(ctrl, seconds)
        return {"callers": callers, "decisions_per_s": sum(counts) / seconds, "p50_ms": 1e3 * lat[len(lat) // 2],
                "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))], "local_snapshot_decisions_per_s": local,
                "snapshot_staleness_s": ctrl.refresh_s}
    finally:
        stop_controller(cfg.serve.name)
        ray.shutdown()


def _local_rate(ctrl, seconds: float) -> float:
    from draftpick.policies.types import Context

    n, stop = 0, time.monotonic() + min(seconds, 2.0)
    t0 = time.perf_counter()
    while time.monotonic() < stop:
        ctrl.decide(Context())
        n += 1
    return n / (time.perf_counter() - t0)


def _markdown(r: dict) -> str:
    d, f, ray_ = r["decisions"], r["folding"], r["ray"]
    return "\n".join([
        f"## draftpick bench controller — policy {r['how']['policy']}, {r['how']['arms']} arms",
        f"Machine: {r['how']['machine']}. {r['how']['method']}.", "",
        "| what | figure |", "|---|---|",
        f"| decision in process, p50 / p99 | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} ms |",
        f"| time to first token (prefill, median) | {d['ttft_ms']:.1f} ms |",
        f"| decision's share of time to first token (p50) | {100 * d['p50_share_of_ttft']:.2f} % |",
        f"| decisions through Ray, {ray_['callers']} callers | {ray_['decisions_per_s']:.0f} /s "
        f"(p50 {ray_['p50_ms']:.2f} ms, p99 {ray_['p99_ms']:.2f} ms) |",
        f"| decisions from the caller's snapshot (at most {ray_['snapshot_staleness_s']} s old) | "
        f"{ray_['local_snapshot_decisions_per_s']:.0f} /s |",
        f"| feedback appended | {f['append_per_s']:.0f} requests/s |",
        f"| folded | {f['entries_per_s']:.0f} requests/s, {f['records_per_s']:.0f} records/s |",
        f"| Redis commands sent per request (append + fold, pipelined) | {f['redis_commands_sent_per_request']:.2f} "
        f"({f['redis_commands_per_request']:.1f} commands executed, most inside the fold script) |",
    ]) + "\n"
