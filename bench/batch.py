"""`draftpick bench batch`: batched verification in the engine, without HTTP, and its losslessness.

For each concurrency N (default 1, 4, 16, 32): N benchmark prompts (the domains in turn) generate
together, greedy, up to max_tokens tokens each, in three ways on the same loaded engine:
  - interleaved: each request's step with its own forward, round-robin (today's worker without
    batching), plain decoding;
  - batched plain: one forward per step for all of them (`SpeculativeEngine.step_batch`);
  - batched <arm>: the same with every request drafting with a fixed arm (`--arm`, default ngram:3);
    for a drafter that drafts requests together (`propose_batch`: feature heads, model drafters), once more with
    each request drafting alone ("drafts alone"), to show what drafting together saves.
Reported per N: aggregate output tokens/s and its ratio to interleaved, and how many greedy outputs
differ from the request served alone (the interleaved run steps each request alone: target 0 in
fp32). The three runs alternate level by level in one process.

With `--prefill-chunk C`, two more batched plain runs per level where the requests join one per
step (as a server's arrivals do) instead of all at once: whole prompts in the step they join, and
chunked prefill (at most C prompt tokens a step, all joining requests together). Their step-time p50 / p99 is the
inter-token latency the requests in flight see while others join.

With `--join-every J`, two more batched plain runs per level where request i joins at step i * J: without and
with the prefix cache (workers.prefix, empty at the start of the run; the other runs have it off, since they
send the same prompts), and how many prompt tokens it saved.
"""
from __future__ import annotations

import time

from draftpick.bench import machine, write_results


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML configuration (default: the embedded one)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated numbers of requests generating together")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are cut from the left")
    p.add_argument("--arm", default="ngram:3", help="the fixed arm of the batched speculative run")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="also compare requests joining one per step with whole and with chunked prefill (C tokens)")
    p.add_argument("--join-every", type=int, default=0,
                   help="also compare requests joining one every J steps without and with the prefix cache")
    p.add_argument("--out", default="bench-results", help="directory for the JSON and markdown results")


def run(args) -> int:
    from draftpick.bench.engine import DEFAULT_DOMAINS
    from draftpick.bench.prompts import load_domain
    from draftpick.policies.types import Arm
    from draftpick.workers.config import EngineConfig, load_config
    from draftpick.workers.factory import build_engine
    from draftpick.workers.inputs import encode_input
    from draftpick.workers.models import set_threads
    from draftpick.workers.prefix import PrefixCache
    from draftpick.workers.sampling import SamplingParams

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.max_tokens < 1 or args.prefill_chunk < 0 or args.join_every < 0:
        raise ValueError("--concurrency needs numbers >= 1; --max-tokens >= 1; --prefill-chunk and --join-every >= 0")
    cfg = load_config(args.config)
    arm = Arm.parse(args.arm)
    if arm.drafter not in cfg.drafter_names():
        raise ValueError(f"--arm {args.arm}: drafter {arm.drafter!r} is not configured")
    set_threads(cfg.worker.torch_threads)
    engine = build_engine(cfg)
    # the runs send the same prompts, and the interleaved one would find each request's prefix stored by
    # the one before it: the prefix cache is off but in the "prefix cache" mode, which starts it empty
    blocks = cfg.engine.prefix_cache_blocks or EngineConfig.model_fields["prefix_cache_blocks"].default
    engine.prefix = None
    if not engine.batchable:
        print("bench batch: this target does not batch (workers.batched.batchable); each request steps alone")
    domains = DEFAULT_DOMAINS.split(",")
    per = -(-max(levels) // len(domains))
    items = [item for d in domains for item in load_domain(d, per)]
    items = [items[i * len(items) // max(levels)] for i in range(max(levels))]  # the domains in turn
    prompts = [encode_input(engine.tokenizer, item)[-args.max_prompt_tokens:] for item in items]
    params = SamplingParams(max_tokens=args.max_tokens)
    plain = Arm("none", 0)
    # the batched modes: (label, arm, a request joins every .. steps (0: all at once), prefill chunk,
    # the arm's drafter drafts the requests together where it can, prefix cache)
    modes = [("batched plain", plain, 0, None, True, False), (f"batched {arm}", arm, 0, None, True, False)]
    if engine.drafts_together(arm.drafter):
        modes.append((f"batched {arm}, drafts alone", arm, 0, None, False, False))
    if args.prefill_chunk:
        modes += [("joining, whole prefill", plain, 1, None, True, False),
                  (f"joining, prefill chunk {args.prefill_chunk}", plain, 1, args.prefill_chunk, True, False)]
    if args.join_every:
        modes += [(f"joining every {args.join_every}", plain, args.join_every, None, True, False),
                  (f"joining every {args.join_every}, prefix cache", plain, args.join_every, None, True, True)]
    rows = []
    for n in levels:
        alone = _run(engine, prompts[:n], params, plain, batched=False)
        for label, a, join_every, chunk, together, prefix in modes:
            cache = PrefixCache(blocks) if prefix else None
            engine.batch_drafts, engine.prefix = together, cache
            try:
                r = _run(engine, prompts[:n], params, a, batched=True, join_every=join_every, chunk=chunk)
            finally:
                engine.batch_drafts, engine.prefix = True, None
            if cache is not None:
                r["reused_tokens"] = cache.reused_tokens
            r["mismatches"] = sum(x != y for x, y in zip(r.pop("outputs"), alone["outputs"]))
            r.update(mode=label, ratio=r["tokens_per_s"] / alone["tokens_per_s"])
            rows.append(r)
        alone.pop("outputs")
        rows.append({**alone, "mode": "interleaved plain", "ratio": 1.0, "mismatches": 0})
        for r in rows[-len(modes) - 1:]:
            step = f"  step p50/p99 {r['step_p50_ms']:.0f}/{r['step_p99_ms']:.0f} ms" if "step_p50_ms" in r else ""
            print(f"N={n:<3} {r['mode']:<32} {r['tokens_per_s']:7.1f} tok/s  {r['ratio']:5.2f}x  "
                  f"drafting {100 * r['draft_share']:4.1f} %  mismatches {r['mismatches']}{step}", flush=True)
    report = {"how": {"machine": machine(), "target": cfg.target.name, "levels": levels, "max_tokens": args.max_tokens,
                      "arm": str(arm), "domains": domains, "prefill_chunk": args.prefill_chunk,
                      "date": time.strftime("%Y-%m-%d")}, "rows": rows}
    write_results(args.out, "batch", report, _markdown(report))
    return 0


def _run(engine, prompts, params, arm, batched: bool, join_every: int = 0, chunk: int | None = None) -> dict:
    """join_every: request i joins at step i * join_every (0: all at the start); chunk: chunked prefill.
    Batched runs also report the p50 / p99 seconds of the steps in which some request decoded."""
    import numpy as np

    gens = [engine.start(p, params, arm) for p in prompts]
    t0, steps, times = time.perf_counter(), 0, []
    while any(not g.done for g in gens):
        live = [g for i, g in enumerate(gens) if not g.done and i * join_every <= steps]
        if batched:
            decoding = any(not g.prefill_left for g in live)
            ts = time.perf_counter()
            errors = [e for e in engine.step_batch(live, None, chunk) if isinstance(e, Exception)]
            if decoding:
                times.append(time.perf_counter() - ts)
            if errors:
                raise errors[0]
            steps += 1
        else:
            for g in live:  # round-robin, one forward each
                g.step()
                steps += 1
    wall = time.perf_counter() - t0
    tokens = sum(len(g.out) for g in gens)
    draft_s = sum(r.draft_s for g in gens for r in g.records)
    out = {"concurrency": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "steps": steps, "draft_share": draft_s / wall, "outputs": [g.out for g in gens]}
    if times:
        out.update(step_p50_ms=1000 * float(np.percentile(times, 50)), step_p99_ms=1000 * float(np.percentile(times, 99)))
    return out


def _markdown(report: dict) -> str:
    how = report["how"]
    lines = [f"# bench batch ({how['date']}, {how['machine']})", "",
             f"target {how['target']}, greedy, max_tokens {how['max_tokens']}, benchmark prompts (the domains in "
             "turn); one process, the modes alternating level by level. Mismatches: greedy outputs that differ "
             "from the request served alone.", "",
             "| requests | mode | output tokens/s | × interleaved | drafting (% of wall) | steps | step p50 / p99 (ms) "
             "| mismatches |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        step = f"{r['step_p50_ms']:.0f} / {r['step_p99_ms']:.0f}" if "step_p50_ms" in r else "-"
        mode = r["mode"] + (f" ({r['reused_tokens']} prompt tokens reused)" if "reused_tokens" in r else "")
        lines.append(f"| {r['concurrency']} | {mode} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f} | "
                     f"{100 * r['draft_share']:.1f} | {r['steps']} | {step} | {r['mismatches']} |")
    return "\n".join(lines) + "\n"
