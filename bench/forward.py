"""`draftpick bench forward`: what a target forward of n tokens costs, with PyTorch's own linear
layers and with `small_batch_linears` (workers.models), side by side.

A verify round runs one target forward of k + 1 tokens, so its cost relative to a one-token
step decides what a draft must earn. Both variants of the target are loaded in one process and
measured interleaved (for each repeat, each n, each variant in turn) after the same context,
each forward rolled back; the median is reported in milliseconds and as a multiple of that
variant's own one-token forward. The logits of the two variants are compared too (largest
difference, and whether their argmax agrees at every position). Results go to JSON and
markdown, like `bench engine`.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

from draftpick.bench import machine, write_results


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML configuration (default: the embedded one); its target is measured")
    p.add_argument("--tokens", default="1,2,3,4,5,6,8,9", help="comma-separated forward sizes")
    p.add_argument("--context", type=int, default=300, help="tokens already in the KV cache")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="bench-results", help="directory for the JSON and markdown results")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from draftpick.workers.config import load_config
    from draftpick.workers.models import forward, load_model, new_cache, place, rollback, small_batch_linears

    cfg = load_config(args.config)
    placement = place(cfg.engine.device, cfg.engine.dtype)
    try:
        sizes = sorted({int(n) for n in args.tokens.split(",") if n.strip()})
    except ValueError:
        raise ValueError(f"--tokens: {args.tokens!r} is not a comma-separated list of integers") from None
    if not sizes or sizes[0] < 1 or args.context < 1 or args.repeats < 1:
        raise ValueError("--tokens must be >= 1 each, --context and --repeats >= 1")
    stock = load_model(cfg.target.path, placement, cfg.target.gguf_file, small_batch=False)
    fast = copy.deepcopy(stock)
    if not small_batch_linears(fast):
        raise ValueError(f"small_batch_linears changes nothing for a {placement.dtype} target on {placement.device} "
                         "(it applies to fp32 on the CPU)")
    models = {"stock": stock, "small_batch": fast}
    vocab = stock.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
    probes = {n: torch.randint(0, vocab, (n,), generator=gen).tolist() for n in sizes}
    caches = {}
    for name, m in models.items():
        caches[name] = new_cache(m)
        forward(m, caches[name], context)
    seconds = {name: {n: [] for n in sizes} for name in models}
    logits = {}
    with torch.inference_mode():
        for r in tqdm(range(args.repeats + 1), desc="bench forward", unit="repeat", file=sys.stderr):
            for n in sizes:
                for name, m in models.items():
                    t0 = time.perf_counter()
                    out = forward(m, caches[name], probes[n])
                    if r:  # the first pass warms up
                        seconds[name][n].append(time.perf_counter() - t0)
                    else:
                        logits[(name, n)] = out
                    rollback(caches[name], args.context)
    report = {
        "how": {
            "command": "draftpick bench forward " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "forward"] else "bench",
            "machine": machine(),
            "device": placement.device, "dtype": str(placement.dtype).removeprefix("torch."), "target": cfg.target.name,
            "context": args.context, "repeats": args.repeats,
            "method": "median wall time of one target forward of n tokens after the context (rolled back after each); "
                      "variants interleaved; one warm-up pass",
        },
        "ms": {name: {n: 1e3 * statistics.median(v) for n, v in per.items()} for name, per in seconds.items()},
        "max_abs_logit_diff": {n: (logits[("stock", n)] - logits[("small_batch", n)]).abs().max().item() for n in sizes},
        "argmax_agrees": {n: bool((logits[("stock", n)].argmax(-1) == logits[("small_batch", n)].argmax(-1)).all())
                          for n in sizes},
    }
    write_results(args.out, "forward", report, _markdown(report, sizes))
    return 0


def _markdown(report: dict, sizes: list[int]) -> str:
    how, ms = report["how"], report["ms"]
    lines = [f"## draftpick bench forward — {how['target']}, {how['device']} {how['dtype']}, context {how['context']}",
             f"Machine: {how['machine']}. {how['method']}; {how['repeats']} repeats.", "",
             "| tokens | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name in ms:
        one = ms[name][sizes[0]]
        lines.append(f"| {name}: ms | " + " | ".join(f"{ms[name][n]:.1f}" for n in sizes) + " |")
        lines.append(f"| {name}: × its {sizes[0]}-token forward | " + " | ".join(f"{ms[name][n] / one:.2f}" for n in sizes) + " |")
    lines.append("| small_batch ÷ stock | " + " | ".join(f"{ms['small_batch'][n] / ms['stock'][n]:.2f}" for n in sizes) + " |")
    lines.append("| max abs logit diff | " + " | ".join(f"{report['max_abs_logit_diff'][n]:.1e}" for n in sizes) + " |")
    lines.append("| argmax agrees | " + " | ".join("yes" if report["argmax_agrees"][n] else "NO" for n in sizes) + " |")
    return "\n".join(lines) + "\n"
