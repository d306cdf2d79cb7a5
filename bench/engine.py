"""`draftpick bench engine`: this engine vs target-only vs transformers' assisted generation.

Side by side in one run, on the same prompts and the same loaded target:
  - hf:target-only             transformers `generate(do_sample=False)`
  - hf:pld:k                   transformers prompt lookup (`prompt_lookup_num_tokens=k`)
  - hf:assist:<drafter>:k      transformers assisted generation, constant schedule
  - hf:assist:<drafter>:heur   ... with transformers' heuristic schedule (+2 / -1)
  - engine:<drafter>:k         this engine, for each configured drafter and k (k = 0: plain decoding)
  - engine:<drafter>:k@t       ... a model drafter with confidence threshold t (--thresholds)
For each prompt every configuration runs once, in a rotated order (so slow
drift of the machine hits all alike); throughput is generated tokens over wall
seconds per domain, reported as a ratio to hf:target-only. Greedy outputs are
compared with hf:target-only token for token (the lossless check; in bf16 the
mismatches are the divergence rate). Results go to JSON and a markdown table.
"""
from __future__ import annotations

import json
import sys
import time
import zlib
from collections import defaultdict

from draftpick.bench import machine, write_results
from draftpick.workers.metrics import per_position_acceptance, spec_decode_metrics

DEFAULT_KS = "0,1,2,3,5,8"
DEFAULT_DOMAINS = "mtbench-writing,mtbench-roleplay,mtbench-reasoning,mtbench-math,mtbench-coding,mtbench-extraction,mtbench-stem,mtbench-humanities,humaneval,sharegpt"


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML configuration (default: the embedded one)")
    p.add_argument("--domains", default=DEFAULT_DOMAINS, help="comma-separated prompt domains")
    p.add_argument("--prompts-per-domain", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=768, help="longer prompts are cut from the left")
    p.add_argument("--ks", default=DEFAULT_KS, help="draft lengths for the engine and transformers")
    p.add_argument("--drafters", help="comma-separated drafters to run (default: all configured)")
    p.add_argument("--thresholds", default="",
                   help="model drafters also run with these confidence thresholds (rows engine:<drafter>:<k>@<t>: "
                        "drafting stops after a token the drafter gives less than t)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], help="override engine.dtype (bf16 on CPU is lossy: see divergence)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: sample; each engine row then runs twice, unseeded (the standard rule, min(1, p/q)) "
                        "and seeded (`+seed`: position-keyed Gumbel-max, output independent of the arm), and "
                        "`mismatches` counts seeded outputs that differ from seeded plain decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    p.add_argument("--no-hf", action="store_true",
                   help="skip transformers' prompt lookup and assisted generation rows (its plain generate, "
                        "the baseline, always runs)")
    p.add_argument("--out", default="bench-results", help="directory for the JSON and markdown results")
    p.set_defaults(func=run)


def run(args) -> int:
    """Load the configured engine and prompts, run every configuration on every prompt, write the results."""
    cfg, engine, drafters = _engine(args)
    ks = [int(k) for k in args.ks.split(",")]
    thresholds = _thresholds(args.thresholds)
    sampling = None
    if args.temperature > 0:
        from draftpick.workers.sampling import SamplingParams

        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)  # checks them
    prompts = _prompts(engine, args.domains.split(","), args.prompts_per_domain, args.max_prompt_tokens)
    configs = _configs(engine, drafters, ks, args.max_tokens, hf=not args.no_hf and sampling is None,
                       thresholds=thresholds, sampling=sampling)
    how = {
        "command": "draftpick bench engine " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "engine"] else "bench",
        "machine": machine(),
        "device": str(engine.target.device), "dtype": str(engine.target.dtype).removeprefix("torch."),
        "target": cfg.target.name, "prompts": len(prompts), "max_tokens": args.max_tokens, "greedy": sampling is None,
        "temperature": args.temperature, "top_p": args.top_p,
        "method": "wall time of each generate call (prefill included); configs rotated per prompt; one warm-up pass",
    }
    print(json.dumps(how), file=sys.stderr)
    acc = _measure(engine, configs, prompts, args.max_tokens)
    report = _report(how, acc, list(configs), args.domains.split(","))
    write_results(args.out, "engine", report, _markdown(report))
    return 0


def _engine(args):
    """The configuration (with --dtype applied), the engine with only the drafters asked for (so
    full-information sync costs only what is measured), and those drafters' names."""
    from draftpick.workers.config import load_config
    from draftpick.workers.factory import build_engine

    cfg = load_config(args.config)
    if args.dtype:
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"dtype": args.dtype})})
    drafters = args.drafters.split(",") if args.drafters else [d.name for d in cfg.drafters]
    for d in drafters:
        if d not in cfg.drafter_names():
            raise ValueError(f"--drafters: {d!r} is not configured ({', '.join(cfg.drafter_names())})")
    cfg = cfg.model_copy(update={"drafters": [d for d in cfg.drafters if d.name in drafters]})
    return cfg, build_engine(cfg), [d for d in drafters if d != "none"]


def _thresholds(text: str) -> list[float]:
    try:
        thresholds = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--thresholds: {text!r} is not a comma-separated list of numbers") from None
    if not all(0 < t < 1 for t in thresholds):
        raise ValueError(f"--thresholds: each threshold must lie in (0, 1), got {text!r}")
    return thresholds


def _prompts(engine, domains: list[str], per_domain: int, max_prompt_tokens: int) -> list[tuple[str, str, list[int]]]:
    """(domain, prompt id, token ids cut from the left to max_prompt_tokens) of each prompt."""
    from draftpick.bench.prompts import load_domain
    from draftpick.workers.inputs import encode_input

    return [(domain, item["id"], encode_input(engine.tokenizer, item)[-max_prompt_tokens:])
            for domain in domains for item in load_domain(domain, per_domain)]


def _measure(engine, configs: dict, prompts, max_tokens: int) -> dict:
    """(config, domain) -> _Acc: every configuration on every prompt, in an order rotated per prompt."""
    from tqdm import tqdm

    warm = engine.tokenizer("def f(x):\n    return x + 1\n").input_ids
    for name, fn in tqdm(configs.items(), desc="warm-up", file=sys.stderr):
        fn(warm, 8, "warmup")
    acc = defaultdict(_Acc)
    names = list(configs)
    bar = tqdm(total=len(prompts) * len(names), desc="bench engine", unit="gen", file=sys.stderr)
    for i, (domain, pid, ids) in enumerate(prompts):
        outs = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            tokens, records = configs[name](ids, max_tokens, name)
            outs[name] = (tokens, records, time.perf_counter() - t0)
            bar.update()
        for name, (tokens, records, secs) in outs.items():
            acc[(name, domain)].add(tokens, records, secs, tokens == _reference(outs, name))
    bar.close()
    return acc


def _reference(outs: dict, name: str):
    """The output a row must reproduce: greedy rows the target's plain greedy output; seeded rows
    seeded plain decoding; unseeded sampled rows nothing (any sample is right: counted as equal)."""
    if name.endswith("+seed"):
        return outs["engine:none:0+seed"][0]
    if "engine:none:0+seed" in outs:
        return outs[name][0]
    return outs["hf:target-only"][0] if "hf:target-only" in outs else outs["engine:none:0"][0]


def _configs(engine, drafters, ks, max_tokens, hf: bool, thresholds=(), sampling=None) -> dict:
    """name -> fn(prompt_ids, max_tokens, tenant) -> (generated token ids, round records or None).
    sampling: SamplingParams to sample with (each engine row then also runs seeded, `+seed`)."""
    import torch

    from draftpick.policies.types import Arm, Choice
    from draftpick.workers.sampling import SamplingParams

    target = engine.target

    def hf_generate(**kw):
        def fn(ids, n, tenant):
            x = torch.tensor([ids], device=target.device)
            with torch.inference_mode():
                out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, **kw)
            return out[0, len(ids) :].tolist(), None
        return fn

    def ours(arm, threshold=None, seeded=False):
        chooser = None if threshold is None else (lambda g: Choice(arm, 1.0, threshold))

        def fn(ids, n, tenant):
            if sampling is None:
                params = SamplingParams(max_tokens=n)
            else:  # a seed of the prompt's own: the same for every row
                seed = zlib.crc32(repr(ids).encode()) if seeded else None
                params = SamplingParams(max_tokens=n, temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
            res = engine.generate(ids, params, arm, tenant=tenant, chooser=chooser)
            return res.token_ids, res.records
        return fn

    if sampling is not None:  # each engine row, unseeded and seeded; plain decoding is the baseline
        rows = {"engine:none:0": Arm("none", 0)}
        rows.update({f"engine:{d}:{k}": Arm(d, k) for d in drafters for k in ks if k > 0})
        configs = {}
        for name, arm in rows.items():
            configs[name] = ours(arm)
            configs[name + "+seed"] = ours(arm, seeded=True)
        return configs
    configs = {"hf:target-only": hf_generate()}  # the baseline of every ratio
    configs["engine:none:0"] = ours(Arm("none", 0))
    for d in drafters:
        # transformers' assisted generation needs a causal LM (a feature head is not one)
        assistant = getattr(engine.drafters[d], "model", None) if hf else None
        for k in (k for k in ks if k > 0):
            if hf and d == "ngram":
                configs[f"hf:pld:{k}"] = hf_generate(prompt_lookup_num_tokens=k)
            if assistant is not None:
                configs[f"hf:assist:{d}:{k}"] = hf_generate(
                    assistant_model=assistant, num_assistant_tokens=k, num_assistant_tokens_schedule="constant")
            configs[f"engine:{d}:{k}"] = ours(Arm(d, k))
            if getattr(engine.drafters[d], "is_model", False):
                for t in thresholds:
                    configs[f"engine:{d}:{k}@{t:g}"] = ours(Arm(d, k), t)
        if assistant is not None:
            configs[f"hf:assist:{d}:heur"] = hf_generate(
                assistant_model=assistant, num_assistant_tokens=5, num_assistant_tokens_schedule="heuristic")
    return configs


class _Acc:
    """One configuration's requests on one domain: tokens, seconds, exactness, and every round's record."""

    def __init__(self):
        self.tokens = self.seconds = self.n = self.mismatch = 0
        self.records = []

    def add(self, tokens, records, secs, same):
        self.tokens += len(tokens)
        self.seconds += secs
        self.n += 1
        self.mismatch += not same
        self.records += records or []

    def summary(self) -> dict:
        s = {"prompts": self.n, "tokens": self.tokens, "seconds": round(self.seconds, 4),
             "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0, "mismatches": self.mismatch}
        if self.records:
            m = spec_decode_metrics(self.records)  # pooled over the requests
            judged = sum(min(r.accepted + 1, r.num_drafted) for r in self.records)
            a = m["num_accepted_draft_tokens"] / judged if judged else 0.0  # per-token acceptance, pooled over positions
            steps = m["num_spec_steps"]
            s.update({
                "num_spec_steps": steps,
                "mean_acceptance_length": m["mean_acceptance_length"],
                "draft_acceptance_rate": m["draft_acceptance_rate"],
                "per_token_acceptance": a,
                "per_position_acceptance": per_position_acceptance(self.records),
                "mean_drafted": m["num_draft_tokens"] / steps,
                # (1 - a^(d+1)) / (1 - a) averaged over rounds with their drafted length d
                "formula_tokens_per_round": sum(_expected(a, r.num_drafted) for r in self.records) / steps,
                "time_share": {k: m[f"{k}_s"] / self.seconds for k in ("draft", "verify", "sync")},
            })
        return s


def _expected(a: float, d: int) -> float:
    return d + 1.0 if a >= 1 else (1 - a ** (d + 1)) / (1 - a)


def _report(how, acc, names, domains) -> dict:
    rows = {}
    for name in names:
        per = {d: acc[(name, d)].summary() for d in domains if (name, d) in acc}
        total = _Acc()
        for d in domains:
            if (name, d) in acc:
                _merge(total, acc[(name, d)])
        rows[name] = {"domains": per, "all": total.summary()}
    base = "hf:target-only" if "hf:target-only" in rows else "engine:none:0"
    for name, row in rows.items():
        for key, s in [*row["domains"].items(), ("all", row["all"])]:
            b = rows[base]["all"] if key == "all" else rows[base]["domains"][key]
            s["ratio_vs_target_only"] = s["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None
    best = {}
    for d in domains + ["all"]:
        cands = [(r["all" if d == "all" else "domains"][d] if d != "all" else r["all"], n) for n, r in rows.items()]
        cands = [(s["ratio_vs_target_only"], n) for s, n in cands if s.get("ratio_vs_target_only")]
        best[d] = max(cands)[1] if cands else None
    return {"how": how, "baseline": base, "configs": rows, "best_per_domain": best}


def _merge(total: _Acc, a: _Acc) -> None:
    for f in ("tokens", "seconds", "n", "mismatch"):
        setattr(total, f, getattr(total, f) + getattr(a, f))
    total.records += a.records


def _markdown(report) -> str:
    how, rows = report["how"], report["configs"]
    domains = list(next(iter(rows.values()))["domains"])
    short = [d.removeprefix("mtbench-") for d in domains]
    lines = [
        f"## draftpick bench engine — {how['target']}, {how['device']} {how['dtype']}, {how['prompts']} prompts, "
        f"max_tokens {how['max_tokens']}, " + ("greedy" if how["greedy"] else
                                                f"temperature {how['temperature']:g}, top-p {how['top_p']:g}"),
        f"Machine: {how['machine']}. {how['method']}. Ratios: tokens/s over {report['baseline']} on the same prompts.",
        "",
        "| config | " + " | ".join(short) + " | all | tok/s | mismatches |",
        "|---|" + "---|" * (len(domains) + 3),
    ]
    for name, row in rows.items():
        cells = [f"{row['domains'][d]['ratio_vs_target_only']:.2f}" for d in domains]
        a = row["all"]
        # unseeded sampled rows have no reference output to match
        checked = how["greedy"] or name.endswith("+seed")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{a['ratio_vs_target_only']:.2f}** | "
                     f"{a['tokens_per_s']:.1f} | " + (f"{a['mismatches']}/{a['prompts']} |" if checked else "- |"))
    lines += ["", "Best per domain: " + ", ".join(f"{d.removeprefix('mtbench-')}: `{n}`" for d, n in report["best_per_domain"].items()), ""]
    lines += [
        "| engine config | mean acc. len | drafted/round | acc. rate | per-token a | per-position acceptance | tokens/round measured | formula (1-a^(d+1))/(1-a) | meas./formula | draft/verify/sync share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        a = row["all"]
        if not name.startswith("engine:") or "num_spec_steps" not in a:
            continue
        pos = " ".join(f"{x:.2f}" for x in a["per_position_acceptance"]) or "-"
        rate = f"{a['draft_acceptance_rate']:.2f}" if a["draft_acceptance_rate"] is not None else "-"
        ts = a["time_share"]
        lines.append(
            f"| {name} | {a['mean_acceptance_length']:.2f} | {a['mean_drafted']:.2f} | {rate} | {a['per_token_acceptance']:.2f} | {pos} | "
            f"{a['mean_acceptance_length']:.2f} | {a['formula_tokens_per_round']:.2f} | "
            f"{a['mean_acceptance_length'] / a['formula_tokens_per_round']:.2f} | "
            f"{ts['draft']:.2f}/{ts['verify']:.2f}/{ts['sync']:.2f} |")
    return "\n".join(lines) + "\n"
