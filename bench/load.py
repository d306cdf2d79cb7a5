"""`draftpick bench load`: the endpoint under concurrent streaming clients, and what HTTP + Serve cost.

1. The service as `draftpick serve` runs it (Ray on loopback, the Serve application, the
   controller with a private embedded Redis in a temporary directory unless REDIS_URL is set),
   deployed once per *variant* of the worker and policy (`--variants`), side by side: each variant
   its own Serve application `draftpick-<variant>` at the route `/<variant>`, with its own worker,
   controller and statistics (serve.name); the workers share the CPUs (worker.num_cpus split
   among them), and only one variant runs requests at a time:
   - `interleaved`: the worker stepping one request's round at a time (worker.batching false);
   - `batched`: all requests in flight verified in one forward per step (the default);
   - `table`: batched, the policy a static table of k by requests in flight (`batch-table`).
2. The modes of all variants alternate level by level (`--repeats`: several times per level, each
   time on new prompts), so the machine's drift over the run falls on every mode alike: for each
   concurrency N (default 1, 4, 16, 32), N streaming clients each send their chat requests
   (`--requests-per-client`, more for `--min-requests`; greedy, up to max_tokens tokens: a request
   may end early at EOS; client i of N cuts its first to (i + 1) / N of max_tokens, so that the
   clients' requests end spread out, not in waves (`--no-stagger`: not cut); distinct prompts, the
   same for every mode, each mode its own tenant: see prompt_pool) with speculation off
   (`draftpick.drafter: none`), pinned to a fixed arm (`--fixed`, batched only), or decided by the
   variant's policy. Per mode and level: requests/s, output tokens/s (overall, and steady: while
   every client streamed, `_steady`), p50 / p99 time to first token and inter-token latency (client
   side, from the SSE chunks), errors (any non-200 or broken stream; target 0), and what speculation
   did (from each response's speculative stats: drafted tokens per round, their acceptance, and the
   arms of the requests' first rounds where the policy decided), and the share of the target's
   forward seconds that went to prompts (the worker's `forward_s` by phase, read from its status
   around each run: /health at the endpoint). With `--warmup W`, before
   each level the modes that learn (their policy decides) first send W requests per client at that
   concurrency, unmeasured, on other prompts: the policy is then measured after learning there.
3. Overhead (the first batched variant): the same pinned request (plain decoding, max_tokens tokens)
   sent alternately through HTTP and straight to the worker deployment's handle, one at a time;
   the median difference is what the ingress, HTTP and Serve's proxy add, as a share of the request
   (target <= 5 %).
Everything binds loopback; the run is bounded by the request counts.

With `--in-process`, the same clients call the worker in this process
(workers.actor.EngineWorker.generate_stream, its configuration switched to each variant's), without
Ray, Serve or HTTP: what the worker alone serves to this traffic. A variant whose policy decides
learns in a private Redis, its feedback folded in this process. Set beside the endpoint's figures,
it shows what the service around the worker costs.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from draftpick.bench import machine, write_results

def prompt_pool() -> list[dict]:
    """Distinct chat prompts from the installed sets (MT-Bench, HumanEval, 200 ShareGPT), in a fixed
    shuffled order. Each level gets its own slice, the same for every mode and variant (they compare
    on the same requests); each mode sends its requests as its own `user` (tenant), whose outputs
    the suffix drafter indexes apart, so no request finds its own output from another mode there."""
    import random

    from draftpick.bench.prompts import humaneval, mtbench, sharegpt

    items = [{"messages": [{"role": "user", "content": i["prompt"]}]} if "prompt" in i else {"messages": i["messages"]}
             for i in mtbench() + humaneval() + sharegpt(200)]
    random.Random(0).shuffle(items)
    return items


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML configuration (default: the embedded one)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--variants", default="interleaved,batched,table",
                   help=f"comma-separated service variants, deployed side by side ({', '.join(VARIANTS)})")
    p.add_argument("--fixed", default="ngram:3", help="the fixed arm the batched variant is also measured with")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=0,
                   help="each mode sends at least this many requests per level (more per client where there are "
                        "few clients: one client's 2 requests say little)")
    p.add_argument("--warmup", type=int, default=0,
                   help="before each level, the learning modes' clients first send this many requests each, "
                        "not measured (other prompts): the policy measured after learning at that load")
    p.add_argument("--repeats", type=int, default=1,
                   help="at each level, the modes alternate this many times, each time on new prompts; a row "
                        "pools them and lists each repetition's tokens/s (the spread is the run's noise)")
    p.add_argument("--in-process", action="store_true",
                   help="the same clients against the worker in this process (workers.actor.EngineWorker: no Ray, "
                        "Serve or HTTP; the policies learn in a private Redis): what the worker alone serves, to set "
                        "beside the endpoint's figures")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-stagger", action="store_true",
                   help="every client's first request runs max_tokens too (by default client i of n cuts its first "
                        "to (i + 1) / n of them, so that the clients' requests do not end, and start, in waves)")
    p.add_argument("--overhead-repeats", type=int, default=6, help="requests timed each way for the overhead")
    p.add_argument("--out", default="bench-results", help="directory for the JSON and markdown results")


# variant -> (configuration overrides, modes); a mode is (label, the request's `draftpick` pin or None)
VARIANTS = {
    "interleaved": ({"worker": {"batching": False}}, ["no speculation"]),
    "batched": ({"worker": {"batching": True}}, ["no speculation", "fixed", "learned"]),
    "table": ({"worker": {"batching": True}, "policy": {"name": "batch-table", "options": {}}}, ["batch-table"]),
}


def _modes(variant: str, fixed) -> list[tuple[str, str, dict | None]]:
    """(variant, label, the requests' pin or None) of each of a variant's modes."""
    pins = {"no speculation": {"drafter": "none"}, "learned": None, "batch-table": None,
            "fixed": {"drafter": fixed.drafter, "num_speculative_tokens": fixed.k}}
    return [(variant, f"{variant}, {'fixed ' + str(fixed) if m == 'fixed' else m}", pins[m])
            for m in VARIANTS[variant][1]]


def _variant_config(cfg, variant: str, side_by_side: int = 1):
    """The variant's configuration: its overrides, its own service name, and a 1/side_by_side share of
    the worker's CPUs (the variants take turns)."""
    from draftpick.workers.config import DraftpickConfig

    data = cfg.model_dump()
    for section, values in VARIANTS[variant][0].items():
        data[section] = {**data[section], **values}
    data["serve"] = {**data["serve"], "name": f"draftpick-{variant}"}
    data["worker"] = {**data["worker"], "num_cpus": data["worker"]["num_cpus"] / side_by_side}
    return DraftpickConfig.model_validate(data)


def run(args) -> int:
    from draftpick.policies.types import Arm

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency needs numbers >= 1, got {args.concurrency!r}")
    for name, value, least in (("--requests-per-client", args.requests_per_client, 1), ("--max-tokens", args.max_tokens, 1),
                               ("--warmup", args.warmup, 0), ("--min-requests", args.min_requests, 0),
                               ("--repeats", args.repeats, 1)):
        if value < least:
            raise ValueError(f"{name} needs a number >= {least}, got {value}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
    fixed = Arm.parse(args.fixed)
    if args.in_process:
        return _run_in_process(args, levels, variants, fixed)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from draftpick.controller.actor import stop_controller
    from draftpick.controller.redis_server import free_port
    from draftpick.deploy.serve import build_app
    from draftpick.workers.builtin import home as draftpick_home
    from draftpick.workers.config import load_config

    cfg = load_config(args.config)
    if fixed.drafter not in {d.name for d in cfg.drafters} or not 0 < fixed.k <= cfg.engine.max_k:
        raise ValueError(f"--fixed {args.fixed}: not a drafter:k of the configuration")
    port = free_port()
    report = {"how": _how(args, cfg, levels, variants), "load": [], "overhead": None}
    pool = _pool(args, levels)
    configs = {v: _variant_config(cfg, v, len(variants)) for v in variants}
    models = draftpick_home() / "models"  # converted built-in models: the usual cache, not converted again
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as home:
        os.environ.setdefault("DRAFTPICK_HOME", home)  # the embedded Redis servers start empty, in here
        (Path(home) / "models").symlink_to(models, target_is_directory=True)
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"DRAFTPICK_HOME": home}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            for variant, vcfg in configs.items():
                print(f"bench load: deploying variant {variant} at /{variant}", flush=True)
                serve.run(build_app(vcfg), name=vcfg.serve.name, route_prefix=f"/{variant}")
            modes = [m for v in variants for m in _modes(v, fixed)]
            report["load"] = asyncio.run(_http_levels(url, cfg.target.name, levels, args, modes, pool))
            batched = [v for v in variants if configs[v].worker.batching]
            if batched:
                report["overhead"] = asyncio.run(_overhead(f"{url}/{batched[0]}", configs[batched[0]], args, pool[-1]))
        finally:
            serve.shutdown()
            for vcfg in configs.values():
                stop_controller(vcfg.serve.name)
            ray.shutdown()
    write_results(args.out, "load", report, _markdown(report))
    return 0


def _how(args, cfg, levels, variants) -> dict:
    return {"machine": machine(), "target": cfg.target.name, "policy": cfg.policy.name, "levels": levels,
            "variants": variants, "fixed": args.fixed, "requests_per_client": args.requests_per_client,
            "min_requests": args.min_requests,
            "warmup": args.warmup, "repeats": args.repeats,
            "max_tokens": args.max_tokens, "stagger": not args.no_stagger,
            "date": time.strftime("%Y-%m-%d"), "workers": cfg.worker.model_dump()}


def _per_client(args, clients: int) -> int:
    """Requests each of `clients` clients sends in a mode: --requests-per-client, more to reach --min-requests."""
    return max(args.requests_per_client, -(-args.min_requests // clients))


def _pool(args, levels: list[int]) -> list[dict]:
    """The prompts (prompt_pool), refused when the run asks for more distinct ones than there are."""
    pool = prompt_pool()
    if len(pool) - 1 < sum(n * (_per_client(args, n) * args.repeats + args.warmup) for n in levels):
        raise ValueError("--concurrency, --requests-per-client, --repeats and --warmup ask for more distinct prompts "
                         f"than the {len(pool) - 1} there are")
    return pool


def _run_in_process(args, levels: list[int], variants: list[str], fixed) -> int:
    """--in-process: every mode of the variants against one EngineWorker in this process (its
    configuration switched to the variant's between modes, which never overlap). A variant whose
    policy decides (learned, batch-table) learns as at the endpoint, in a private Redis: each its
    own statistics, fed by all its modes' rounds, folded by a controller in this process
    (controller.actor.ControllerActor's loop) and decided from by the worker's local controller."""
    from draftpick.controller.redis_server import EmbeddedRedis
    from draftpick.workers.actor import EngineWorker
    from draftpick.workers.config import load_config

    cfg = load_config(args.config)
    pool = _pool(args, levels)
    modes = [m for v in variants for m in _modes(v, fixed)]
    configs = {v: _variant_config(cfg, v) for v in variants}
    worker = EngineWorker(configs[modes[0][0]])
    report = {"how": {**_how(args, cfg, levels, variants), "in_process": True}, "load": [], "overhead": None}
    deciding = sorted({v for v, _, pin in modes if pin is None})
    with tempfile.TemporaryDirectory() as home, EmbeddedRedis(data_dir=home) if deciding else nullcontext() as redis:
        learners = {v: _Learner(worker, configs[v], redis.url) for v in deciding}
        try:
            async def send(variant, item, pin, user, max_tokens=None):
                _switch(worker, configs[variant], learners.get(variant))
                return await _local_stream(worker, item, max_tokens or args.max_tokens, pin, user)

            async def forward_s(variant):
                return worker.status()["forward_s"]

            report["load"] = asyncio.run(_levels(send, levels, args, modes, pool, forward_s))
        finally:
            for learner in learners.values():
                learner.close()
        # what each deciding variant learned from: the feedback entries folded into its statistics
        report["how"]["folded"] = {v: learner.folder.folded for v, learner in learners.items()}
    write_results(args.out, "load", report, _markdown(report))
    return 0


class _Learner:
    """A variant that learns, in this process: the worker's decisions and feedback sink for it, and
    the controller folding its feedback stream (in a thread, as the controller actor does)."""

    def __init__(self, worker, cfg, redis_url: str):
        from draftpick.controller.actor import ControllerActor, DecisionClient
        from draftpick.controller.controller import describe

        description = worker.engine_thread.submit(describe, cfg, worker.engine).result()  # reads every weight
        self.folder = ControllerActor(cfg, description, redis_url, fold_block_ms=100)
        self.decisions = DecisionClient(cfg, description, redis_url)  # no Ray here: it decides locally
        self.sink = self.decisions.local.sink()

    def close(self) -> None:
        self.sink.close(timeout=10)
        self.folder.stop()


def _switch(worker, cfg, learner: "_Learner | None") -> None:
    """Point the worker at a variant: its configuration, and its learning (or none)."""
    worker.cfg = cfg
    worker.decisions, worker.sink = (learner.decisions, learner.sink) if learner else (None, None)
    worker.engine.sinks[:] = [learner.sink] if learner else []


async def _local_stream(worker, item: dict, max_tokens: int, pin: dict | None, user: str) -> dict:
    """What _stream measures, from the worker's own stream (its steps' token chunks)."""
    from draftpick.controller.local import request_context
    from draftpick.policies.types import Arm
    from draftpick.workers.actor import GenerateRequest
    from draftpick.workers.sampling import SamplingParams

    arm = None if pin is None else Arm(pin["drafter"], pin.get("num_speculative_tokens", 0))
    ids = worker.tokenize(item)
    # a request the policy decides carries the prompt features the ingress gives it (untagged, greedy)
    features = () if arm else request_context({"tag": "", **item}, ids, 0.0).features
    req = GenerateRequest(ids, SamplingParams(max_tokens=max_tokens), arm, tenant=user, features=features)
    t0, stamps, last = time.perf_counter(), [], None
    try:
        async for event in worker.generate_stream(req):
            if event.get("token_ids"):
                stamps.append(time.perf_counter())
            last = event
    except Exception as e:  # counted as an error, the run goes on
        return {"ok": False, "status": type(e).__name__}
    records = last["records"]
    return _measures(True, t0, stamps, len(last["result"]["token_ids"]), len(records),
                     sum(r["num_drafted"] for r in records), sum(r["accepted"] for r in records),
                     last["plan"]["arm"] if last.get("plan") else None)


async def _http_levels(url: str, model: str, levels: list[int], args, modes, pool: list[dict]) -> list[dict]:
    import httpx2 as httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=max(levels) + 4)) as client:
        async def send(variant, item, pin, user, max_tokens=None):
            return await _stream(client, f"{url}/{variant}", model, item, max_tokens or args.max_tokens, pin, user)

        async def forward_s(variant):  # None where the worker does not answer: the row then has no share
            try:
                r = await client.get(f"{url}/{variant}/health")
                return r.json().get("forward_s") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None

        return await _levels(send, levels, args, modes, pool, forward_s)


async def _levels(send, levels: list[int], args, modes, pool: list[dict], forward_s=None) -> list[dict]:
    """Every level, its modes alternating; send(variant, chat item, pin, user) -> one request's measures;
    forward_s(variant) -> the worker's forward seconds by phase so far (its status), read around each
    measured run to give the share of the target's forward time that went to prompts."""
    rows = []
    warmed = set()
    for variant, _, pin in modes:  # warm-up (models, caches, routes), unmeasured: each variant's first mode
        if variant not in warmed:
            warmed.add(variant)
            await send(variant, pool[-1], pin, "bench")
    for li, n in enumerate(levels):
        first = sum(m * _per_client(args, m) * args.repeats for m in levels[:li])
        prompts = pool[first: first + n * _per_client(args, n) * args.repeats]
        if args.warmup:  # the learning modes learn at this load first, on prompts from the pool's end
            end = len(pool) - 1 - sum(levels[:li]) * args.warmup
            warm = pool[end - n * args.warmup: end]
            for variant, mode, pin in modes:
                if pin is None:
                    await asyncio.gather(*(_client(send, variant, warm[i::n], pin, mode + " warm-up")
                                           for i in range(n)))
        results: dict[str, list[dict]] = {mode: [] for _, mode, _ in modes}
        walls: dict[str, list[float]] = {mode: [] for _, mode, _ in modes}
        steady: dict[str, list[tuple[float, float]]] = {mode: [] for _, mode, _ in modes}
        phases: dict[str, dict[str, float]] = {mode: {} for _, mode, _ in modes}  # forward seconds by phase
        per = n * _per_client(args, n)
        for rep in range(args.repeats):  # every mode once per repetition, each time on new prompts
            mine = prompts[rep * per: (rep + 1) * per]
            for variant, mode, pin in modes:
                before = await forward_s(variant) if forward_s else None
                t0 = time.perf_counter()
                runs = await asyncio.gather(*(_client(send, variant, mine[i::n], pin, mode,
                                                      _first_tokens(args, i, n)) for i in range(n)))
                walls[mode].append(time.perf_counter() - t0)
                after = await forward_s(variant) if forward_s else None
                if before is not None and after is not None:
                    for phase, seconds in after.items():
                        phases[mode][phase] = phases[mode].get(phase, 0.0) + seconds - before.get(phase, 0.0)
                results[mode].append([r for c in runs for r in c])
                steady[mode].append(_steady(runs))
                if args.repeats > 1:
                    rate = _row(n, mode, results[mode][-1], walls[mode][-1])["output_tokens_per_s"]
                    print(f"bench load: {n} clients, repetition {rep + 1}, {mode}: {rate:.1f} tokens/s", flush=True)
        for _, mode, _ in modes:
            rates = [_row(n, mode, rs, w)["output_tokens_per_s"] for rs, w in zip(results[mode], walls[mode])]
            windows = [w for w in steady[mode] if w[1] > 0]
            rows.append({**_row(n, mode, [r for rs in results[mode] for r in rs], sum(walls[mode])),
                         "repetitions_tokens_per_s": rates,
                         # while every client streamed (see _steady): pooled, and each repetition's
                         "steady_tokens_per_s": (sum(t for t, _ in windows) / sum(w for _, w in windows)
                                                 if windows else None),
                         "steady_window_s": sum(w for _, w in windows),
                         "repetitions_steady_tokens_per_s": [t / w if w > 0 else None for t, w in steady[mode]],
                         "forward_s": phases[mode] or None, "prefill_share": _prefill_share(phases[mode])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _prefill_share(phases: dict[str, float]) -> float | None:
    """The share of the target's forward seconds that went to prompts (None: not read, or no forward).
    Batching shares a step's weights among its rows, which divides decoding's cost per token; a
    prompt's rows already share them, so its cost stays, and this share says how much of a batched
    worker's time that leaves (docs/results.md)."""
    total = sum(phases.values())
    return phases.get("prefill", 0.0) / total if total > 0 else None


def _steady(runs: list[list[dict]]) -> tuple[float, float]:
    """(tokens, seconds) of a level's window where all its clients streamed: from the moment the last
    client got its first token (the opening burst of prefills is over) to the moment the first client
    got its last (after it, the batch thins while the slowest finish). The overall rate pools
    that ramp-up and tail, whose length depends on how unevenly the requests end, not on the load.
    A request counts its tokens in the window by the share of its chunks there (a chunk is one step's
    tokens; the stream does not say how many). (0, 0) when the window is empty (too few requests a client)."""
    firsts = [next((r["stamps"][0] for r in c if r.get("stamps")), None) for c in runs]
    lasts = [max((r["stamps"][-1] for r in c if r.get("stamps")), default=None) for c in runs]
    if not runs or None in firsts or None in lasts:
        return 0.0, 0.0
    start, end = max(firsts), min(lasts)
    if end <= start:
        return 0.0, 0.0
    tokens = sum(r["tokens"] * sum(start <= t <= end for t in r["stamps"]) / len(r["stamps"])
                 for c in runs for r in c if r.get("ok") and r.get("stamps"))
    return tokens, end - start


async def _client(send, variant: str, items: list[dict], pin, user: str, first_tokens: int | None = None) -> list[dict]:
    """One client's requests, one after another (the first cut to first_tokens tokens if given)."""
    return [await send(variant, item, pin, user, first_tokens if j == 0 else None) for j, item in enumerate(items)]


def _first_tokens(args, i: int, n: int) -> int | None:
    """Client i of n cuts its first request to (i + 1) / n of max_tokens (not with --no-stagger):
    started together, clients whose requests all run max_tokens would finish together and send
    their next requests together, every request in step (plain decoding's emit one token each a
    step), and each wave's prompts would stall the batch at once. Cut so, their requests end
    spread out from the first on, as a stream of clients' requests does; every mode gets the same cuts."""
    if args.no_stagger or n == 1:
        return None
    return max(1, round(args.max_tokens * (i + 1) / n))


async def _stream(client, url, model, item: dict, max_tokens: int, pin, user: str = "bench") -> dict:
    """One streaming chat request, timed from the client: first token, gaps between chunks."""
    body = {"model": model, "messages": item["messages"], "max_tokens": max_tokens, "user": user,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **({"draftpick": pin} if pin else {})}
    t0 = time.perf_counter()
    stamps, tokens, ok, spec, arm = [], 0, False, {}, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ok = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    spec = chunk.get("metrics", {}).get("speculative_decoding", {})
                    arm = chunk.get("draftpick", {}).get("arm")
    except Exception as e:  # counted as an error, the run goes on
        return {"ok": False, "status": type(e).__name__}
    return _measures(ok, t0, stamps, tokens, spec.get("num_spec_steps", 0), spec.get("num_draft_tokens", 0),
                     spec.get("num_accepted_draft_tokens", 0), arm)


def _measures(ok: bool, t0: float, stamps: list[float], tokens: int, rounds: int, drafted: int, accepted: int,
              first_arm: str | None) -> dict:
    """One request's measures (what _row pools), given when it was sent and when each of its token chunks came."""
    return {"ok": ok, "tokens": tokens, "ttft": stamps[0] - t0 if stamps else None, "stamps": stamps,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "seconds": time.perf_counter() - t0,
            "rounds": rounds, "drafted": drafted, "accepted": accepted, "first_arm": first_arm}


def _row(n: int, mode: str, results: list[dict], wall: float) -> dict:
    good = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in good if r["ttft"] is not None)
    gaps = sorted(g for r in good for g in r["gaps"])
    tokens = sum(r["tokens"] for r in good)
    rounds, drafted, accepted = (sum(r.get(k, 0) for r in good) for k in ("rounds", "drafted", "accepted"))
    arms: dict[str, int] = {}
    for r in good:  # the arm of each request's first round, as the response reports it
        if r.get("first_arm"):
            arms[r["first_arm"]] = arms.get(r["first_arm"], 0) + 1
    return {"concurrency": n, "mode": mode, "requests": len(results), "errors": len(results) - len(good),
            "requests_per_s": len(good) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(gaps, 50), "itl_p99_s": _pct(gaps, 99), "wall_s": wall,
            # what speculation did: drafted tokens per round, their acceptance, the first rounds' arms
            "drafted_per_round": drafted / rounds if rounds else None,
            "acceptance": accepted / drafted if drafted else None,
            "first_arms": dict(sorted(arms.items(), key=lambda kv: -kv[1]))}


def _pct(xs: list[float], p: float):
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _overhead(url: str, cfg, args, item: dict) -> dict:
    """HTTP (ingress + proxy) against the worker's handle, the same request alternately."""
    import httpx2 as httpx
    from ray import serve

    from draftpick.policies.types import Arm
    from draftpick.workers.actor import GenerateRequest
    from draftpick.workers.inputs import encode_input
    from draftpick.workers.models import load_tokenizer
    from draftpick.workers.sampling import SamplingParams

    tok = load_tokenizer(cfg.target.path, cfg.target.gguf_file)
    ids = encode_input(tok, item)
    handle = serve.get_deployment_handle("DraftpickWorker", app_name=cfg.serve.name)
    req = GenerateRequest(ids, SamplingParams(max_tokens=args.max_tokens), Arm("none", 0))  # what HTTP sends
    body = {"model": cfg.target.name, **item, "max_tokens": args.max_tokens, "temperature": 0,
            "draftpick": {"drafter": "none"}}
    http_s, direct_s = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(args.overhead_repeats):
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body)
            http_s.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            t0 = time.perf_counter()
            async for _event in handle.options(stream=True).generate_stream.remote(req):
                pass
            direct_s.append(time.perf_counter() - t0)
    h, d = statistics.median(http_s), statistics.median(direct_s)
    return {"http_median_s": h, "direct_median_s": d, "overhead_s": h - d, "overhead_share": (h - d) / h,
            "repeats": args.overhead_repeats}


def _ratios(rows: list[dict], rate: str = "output_tokens_per_s", what: str = "Output tokens/s") -> list[str]:
    """Aggregate tokens/s (`rate`) of each mode over the interleaved worker's plain decoding, per level."""
    base = {r["concurrency"]: r[rate] for r in rows if r["mode"] == "interleaved, no speculation" and r.get(rate)}
    if not base:
        return []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    levels = sorted(base)
    out = ["", f"{what} over the interleaved worker's plain decoding:", "",
           "| mode | " + " | ".join(f"{n} clients" for n in levels) + " |", "|---|" + "---|" * len(levels)]
    for m in modes:
        vals = {r["concurrency"]: r[rate] for r in rows if r["mode"] == m and r.get(rate)}
        out.append(f"| {m} | " + " | ".join(f"{vals[n] / base[n]:.2f}x" if n in vals and base[n] else "-"
                                             for n in levels) + " |")
    return out


def _markdown(report: dict) -> str:
    how = report["how"]
    lines = [f"# bench load ({how['date']}, {how['machine']})", "",
             f"target {how['target']}, policy {how['policy']}"
             f"{' (the table variant: batch-table)' if 'table' in how['variants'] else ''}, "
             f"{how['requests_per_client']} chat requests per client"
             + (f" (at least {how['min_requests']} per mode and level)" if how.get("min_requests") else "")
             + f", max_tokens {how['max_tokens']}"
             + (" (client i of n cutting its first request to (i + 1) / n of them)" if how.get("stagger") else "")
             + ", greedy, "
             "streaming, distinct prompts (MT-Bench, HumanEval, ShareGPT); client-side timings. "
             + ("The worker in this process (no Ray, Serve or HTTP), its variants' modes"
                if how.get("in_process") else "Variants side by side (one Serve application each), all their modes")
             + " alternating level by level"
             + (f"; the learning modes first sent {how['warmup']} unmeasured requests per client at each level"
                if how.get("warmup") else "") + ".", "",
             "Steady: output tokens/s while every client streamed, from the last client's first token to the "
             "first client's last (bench.load._steady); the overall rate also pools the ramp-up and the thinning tail.",
             "",
             "| clients | mode | requests/s | output tokens/s (each repetition) | steady tokens/s (each repetition) "
             "| TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | errors | drafted / round | acceptance | first rounds' arms "
             "| prompts' share of forward time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["load"]:
        itl = "/".join("-" if v is None else f"{1000 * v:.0f}" for v in (r["itl_p50_s"], r["itl_p99_s"]))
        ttft = "/".join("-" if v is None else f"{v:.2f}" for v in (r["ttft_p50_s"], r["ttft_p99_s"]))
        spec = " | ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("drafted_per_round", "acceptance"))
        arms = ", ".join(f"{a} ×{c}" for a, c in list(r.get("first_arms", {}).items())[:3]) or "-"
        reps = r.get("repetitions_tokens_per_s") or []
        rate = f"{r['output_tokens_per_s']:.1f}" + (f" ({', '.join(f'{x:.1f}' for x in reps)})" if len(reps) > 1 else "")
        sreps = r.get("repetitions_steady_tokens_per_s") or []
        steady = "-" if r.get("steady_tokens_per_s") is None else (
            f"{r['steady_tokens_per_s']:.1f}"
            + (f" ({', '.join('-' if x is None else f'{x:.1f}' for x in sreps)})" if len(sreps) > 1 else ""))
        share = "-" if r.get("prefill_share") is None else f"{100 * r['prefill_share']:.0f} %"
        lines.append(f"| {r['concurrency']} | {r['mode']} | {r['requests_per_s']:.2f} | "
                     f"{rate} | {steady} | {ttft} | {itl} | {r['errors']} | {spec} | {arms} | {share} |")
    lines += _ratios(report["load"])
    lines += _ratios(report["load"], "steady_tokens_per_s", "Steady tokens/s")
    o = report["overhead"]
    if o is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"HTTP + ingress + proxy overhead: {1000 * o['overhead_s']:.1f} ms of {o['http_median_s']:.2f} s "
              f"({100 * o['overhead_share']:.1f} %), median of {o['repeats']} alternated requests "
              f"(target <= 5 %)."]
    return "\n".join(lines) + "\n"
