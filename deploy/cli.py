"""The `draftpick` command line: argument glue over library functions (each `cmd_*` parses, calls, prints)."""
from __future__ import annotations

import argparse
import json
import sys

from draftpick.workers.config import ConfigError, default_config_path, load_config
from draftpick.workers.inputs import InputError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ConfigError, InputError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"draftpick: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftpick", description="Online draft selection for speculative decoding.")
    sub = p.add_subparsers(metavar="COMMAND")
    s = sub.add_parser("setup", help="install the embedded model and prompt sets, convert and cache the target")
    s.add_argument("--config", help="also prepare this config's built-in models")
    s.set_defaults(func=cmd_setup)
    s = sub.add_parser("info", help="describe the configured target and drafters")
    s.add_argument("--config", help=f"YAML configuration (default: the embedded {default_config_path().name})")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)
    _add_generate(sub.add_parser("generate", help="generate with speculative decoding (in-process engine)"))
    s = sub.add_parser("serve", help="serve the OpenAI-compatible endpoint with Ray Serve (learns live)")
    s.add_argument("--config", help=f"YAML configuration (default: the embedded {default_config_path().name})")
    s.add_argument("--host", help="address to listen on (default: serve.host of the configuration, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: serve.port of the configuration, 8000)")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("demo", help="serve the embedded default, answer one request over HTTP, shut down")
    s.add_argument("--config", help=f"YAML configuration (default: the embedded {default_config_path().name})")
    s.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--port", type=int, help="port (default: a free one)")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("stats", help="what the policy has learned (Redis: REDIS_URL, else the embedded server)")
    s.add_argument("--config")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--reset", action="store_true", help="forget this configuration's learned state")
    s.set_defaults(func=cmd_stats)
    _add_prompts(sub.add_parser("prompts", help="write prompts from the installed prompt sets as JSONL"))
    _add_record(sub.add_parser("record", help="record a full-information trace of real requests (for replay)"))
    _add_replay(sub.add_parser("replay", help="replay a trace through policies: throughput and regret"))
    _add_distill(sub.add_parser("distill", help="train a small drafter from the target (a feature head or a small "
                                                "LM; token-level distillation, optionally on the target's answers)"))
    _add_bench(sub.add_parser("bench", help="benchmarks"))
    return p


def _add_generate(s) -> None:
    s.add_argument("--config")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one raw completion prompt")
    src.add_argument("--prompts", help='JSONL file: {"prompt": ...} or {"messages": [...]} per line, optional "id"')
    s.add_argument("--drafter", help="pin the drafter (`none` = plain decoding); without --drafter and -k the "
                                     "configured policy decides from the learned state and learns from the rounds")
    s.add_argument("--num-speculative-tokens", "-k", type=int,
                   help="pin the draft length k (with no --drafter: engine.default_drafter, else the first drafter)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, help="the output is then a function of prompt, parameters and seed only")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--tenant", default="", help="tenant scope of the suffix drafter's index")
    s.add_argument("--json", action="store_true", help="one JSON line per prompt")
    s.set_defaults(func=cmd_generate)


def _add_prompts(s) -> None:
    s.add_argument("--domains", default="all", help="comma-separated domains, or `all`")
    s.add_argument("--per-domain", type=int, default=10)
    s.add_argument("--offset", type=int, default=0, help="skip this many prompts of each domain first")
    s.add_argument("--tag", action="store_true", help="also set each prompt's context tag to its domain")
    s.add_argument("--training", metavar="SETS",
                   help="instead, write the training items of these sets (comma-separated, as `distill --prompts` "
                        "takes them: text + prompt or messages), e.g. for a GPU machine without the prompt packages")
    s.add_argument("--max-items", type=int, default=100000, help="--training: items read from each set")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_prompts)


def _add_record(s) -> None:
    s.add_argument("--config")
    s.add_argument("--prompts", required=True, help="JSONL prompts (optional `id`, `domain`, `tag` keys)")
    s.add_argument("--max-tokens", type=int, default=96)
    s.add_argument("--k-max", type=int, default=8)
    s.add_argument("--tenant", default="")
    s.add_argument("--out", required=True, help="trace file (JSONL, one request per line)")
    s.set_defaults(func=cmd_record)


def _add_replay(s) -> None:
    s.add_argument("trace")
    s.add_argument("--policies", required=True, help="comma-separated: built-in names, entry points or module:Class")
    s.add_argument("--policy-config", default="{}", help='JSON {"policy": {option: value}}')
    s.add_argument("--repeat", type=int, default=1, help="passes over the trace, each in a new shuffled order")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", required=True, dest="json_out", help="OUT.json")
    s.add_argument("--plot", help="OUT.png: cumulative regret and arm choices")
    s.add_argument("--ignore-tags", action="store_true", help="hide the requests' context tags (features only)")
    s.add_argument("--drafters", help="comma-separated: replay only these of the trace's drafters (plus plain decoding)")
    s.add_argument("--estimates", action="store_true", help="also measure how far the full-information estimates "
                   "of each arm are from its true tokens per round (played: plain decoding, best fixed arm)")
    s.add_argument("--load", type=int, default=1,
                   help="replay as if this many requests were in flight, verified in one batched forward (costs from "
                        "the trace's batched verify costs; policies see the load)")
    s.add_argument("--ks", help="comma-separated draft lengths of the arms (default 1,2,3,5,8; at most the trace's k_max)")
    s.add_argument("--per-request", action="store_true",
                   help="also print each policy's per-request table (always in OUT.json): the oracle's arm, the "
                        "policy's seconds and the arms it played, worst against the oracle first")
    s.add_argument("--no-counterfactual", dest="counterfactual", action="store_false",
                   help="leave out the exact re-run rounds of lookup drafters (the estimates before issue 19)")
    s.set_defaults(func=cmd_replay)


def _add_distill(s) -> None:
    s.add_argument("--config", help="the target comes from this configuration (default: the embedded one)")
    s.add_argument("--target", help="target model path (HF id, directory, .gguf, builtin:NAME); overrides --config")
    s.add_argument("--prompts", required=True,
                   help="training text: sharegpt, sharegpt-turns, humaneval, mtbench, stdlib, stdlib-defs "
                        "(comma-separated) or a JSONL file (text / prompt / messages / captured traffic)")
    s.add_argument("--max-items", type=int, default=2000, help="items read from each source")
    s.add_argument("--held-out", type=int, default=8, help="items kept out of training for the validation figure")
    s.add_argument("--out", required=True, help="drafter directory (resumes from its checkpoint if present)")
    s.add_argument("--init", default="feature",
                   help="feature: a one-layer head on the target's hidden states (EAGLE-like, the default); "
                        "target-layers:N: a small LM made of the target's embeddings and first N layers; "
                        "or a drafter directory to continue from")
    s.add_argument("--steps", type=int)
    s.add_argument("--minutes", type=float)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--vocab", type=int,
                   help="size of the drafter's reduced output vocabulary (default 8192; continuing from --init DIR "
                        "keeps that drafter's unless given, which widens it with the most frequent tokens it lacks)")
    s.add_argument("--teacher-dtype", default="fp32", choices=["fp32", "bf16"])
    s.add_argument("--student-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast the student's matrix products (weights and optimizer stay fp32)")
    s.add_argument("--unroll", type=int, default=1, help="feature heads: also train on N - 1 steps of their own predictions")
    s.add_argument("--generate", type=int, default=0, metavar="N",
                   help="sequence-level: first let the target answer each training prompt with up to N tokens "
                        "(greedy; OUT/sequences.jsonl, resumable) and train on prompt + answer (0: train on the text)")
    s.add_argument("--generate-batch", type=int, default=16, help="prompts answered together by --generate")
    s.add_argument("--generate-minutes", type=float,
                   help="stop answering after this long and train on the answers so far (a later run resumes)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where teacher and student run (auto: cuda when a GPU is visible)")
    s.add_argument("--teacher-cache-gb", type=float, default=2.0,
                   help="memory for the teacher's hidden states, reused by later passes over the text")
    s.add_argument("--loss-on", default="all", choices=["all", "answers"],
                   help="answers: with prompt + answer items (captured traffic, --generate) learn to predict only "
                        "the answer tokens, the text drafted at serving time; prompts are still read as context")
    s.add_argument("--prompt-context", type=int, metavar="N",
                   help="prompt + answer items: keep only the last N prompt tokens as context (default: whole prompts)")
    # the choices are draftpick.workers.drafters.feature.WEIGHTS, not imported here to keep torch out of parsing
    s.add_argument("--weights", default="int8", choices=["int8", "int4", "bf16"],
                   help="how a feature head is stored: int8 rows (default), int4 groups of 64 (about half of "
                        "int8's bytes), or bf16; rerunning a finished run (same --out and --steps or --minutes) stores it again")
    s.add_argument("--validate-tokens", type=int, default=64, help="tokens generated per held-out prompt (0: skip)")
    s.set_defaults(func=cmd_distill)


def _add_bench(b) -> None:
    from draftpick.bench import batch, controller, engine, forward, load

    sub = b.add_subparsers(metavar="BENCH")
    for name, module, help_ in (
        ("engine", engine, "this engine vs target-only vs transformers' assisted generation"),
        ("forward", forward, "cost of a target forward of n tokens, PyTorch's linear layers vs small_batch_linears"),
        ("controller", controller, "decision latency, decisions/s through Ray, folding rate, Redis commands"),
        ("batch", batch, "batched verification in the engine: interleaved vs batched tokens/s at 1 / 4 / 16 / 32 "
                          "requests, and greedy outputs that differ from the request alone"),
        ("load", load, "the endpoint under 1 / 4 / 16 / 32 streaming clients: interleaved vs batched worker, fixed, table and learned policies; HTTP overhead"),
    ):
        s = sub.add_parser(name, help=help_)
        module.add_arguments(s)
        s.set_defaults(func=module.run)


def cmd_setup(args) -> int:
    from draftpick.deploy.setup import setup

    setup(args.config)
    return 0


def cmd_info(args) -> int:
    cfg = load_config(args.config)
    info = cfg.describe()
    info["config"] = str(args.config or default_config_path())
    if args.json:
        print(json.dumps(info))
    else:
        print(f"target   {info['target']['name']}  ({info['target']['path']})")
        print(f"drafters {', '.join(info['drafters'])}")
        print(f"engine   {info['engine']}")
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from draftpick.workers.factory import build_engine
    from draftpick.workers.inputs import encode_inputs, read_jsonl
    from draftpick.workers.sampling import SamplingParams

    cfg = load_config(args.config)
    items = [{"prompt": args.prompt}] if args.prompt is not None else read_jsonl(args.prompts)
    pinned = args.drafter is not None or args.num_speculative_tokens is not None
    arm = cfg.pinned_arm(args.drafter, args.num_speculative_tokens) if pinned else None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    engine = build_engine(cfg)
    encoded = encode_inputs(engine.tokenizer, items)
    learning = None
    if not pinned:
        from draftpick.controller.local import LocalLearning

        learning = LocalLearning(cfg, engine)
    try:
        for item, ids in zip(items, tqdm(encoded, desc="generate", unit="prompt", disable=len(items) < 2, file=sys.stderr)):
            _generate_one(engine, learning, item, ids, params, arm, args)
    finally:
        if learning is not None:
            learning.close()
    return 0


def _generate_one(engine, learning, item, ids, params, arm, args) -> None:
    if learning is None:
        res, extra = engine.generate(ids, params, arm, tenant=args.tenant), {}
    else:
        from draftpick.controller.local import plan_json

        res, plan = learning.generate(item, ids, params, args.tenant)
        extra = {"draftpick": plan_json(plan)}
    print(json.dumps({**res.to_json(item.get("id")), **extra}) if args.json else res.text, flush=True)


def cmd_demo(args) -> int:
    """`draftpick serve` on loopback, one chat request over HTTP (the policy decides the arm), the
    answer and its speculative stats printed, then everything stopped."""
    import urllib.request

    from draftpick.controller.redis_server import free_port
    from draftpick.deploy.serve import run_service

    cfg = load_config(args.config)
    done = {}

    def ask(url: str, stop) -> None:
        try:
            body = {"model": cfg.target.name, "messages": [{"role": "user", "content": args.prompt}],
                    "max_tokens": args.max_tokens, "temperature": 0}
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
            print(f"POST {url}/v1/chat/completions  {json.dumps(body)}", flush=True)
            with urllib.request.urlopen(req, timeout=300) as r:
                done["answer"] = json.loads(r.read())
            print(json.dumps(done["answer"], indent=2), flush=True)
        finally:
            stop()

    run_service(args.config, "127.0.0.1", args.port or free_port(), ready=ask)
    return 0 if "answer" in done else 1


def cmd_serve(args) -> int:
    from draftpick.deploy.serve import run_service

    run_service(args.config, args.host, args.port)
    return 0


def cmd_stats(args) -> int:
    from draftpick.controller.controller import from_config
    from draftpick.controller.redis_server import connect, default_data_dir
    from draftpick.workers.factory import build_engine

    cfg = load_config(args.config)
    engine = build_engine(cfg)  # the namespace is the service's name and the target's and drafters' fingerprints
    client, server = connect(data_dir=default_data_dir(cfg.serve.name))
    try:
        controller = from_config(cfg, engine, client)
        if args.reset:
            controller.reset()
        out = controller.stats()
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps(out))
    else:
        t = out["totals"]
        print(f"{out['namespace']}  policy {out['policy']}: {t['requests']} requests, {t['rounds']} rounds, "
              f"{t['rejected_records']} rejected, {t['dropped_records']} dropped")
        for a in out["arms"]:
            mal = "-" if a["mean_acceptance_length"] is None else f"{a['mean_acceptance_length']:.2f}"
            tps = "-" if a["tokens_per_s"] is None else f"{a['tokens_per_s']:.1f}"
            print(f"  {a['context'] or '-':>12} {a['drafter']}:{a['k']:<3} rounds {a['rounds']:>6}  "
                  f"acc. length {mal:>5}  tok/s {tps:>6}")
    return 0


def cmd_prompts(args) -> int:
    from draftpick.workers.inputs import write_jsonl

    if args.training is not None:
        from draftpick.training.datasets import training_lines

        lines, what = training_lines(args.training, args.max_items), "training items"
    else:
        from draftpick.bench.prompts import benchmark_prompts

        lines, what = benchmark_prompts(args.domains, args.per_domain, args.offset, args.tag), "prompts"
    print(f"wrote {write_jsonl(args.out, lines)} {what} to {args.out}", file=sys.stderr)
    return 0


def cmd_record(args) -> int:
    from draftpick.workers.factory import build_engine
    from draftpick.workers.inputs import read_jsonl
    from draftpick.workers.record import record_file

    cfg = load_config(args.config)
    if not 1 <= args.k_max <= cfg.engine.max_k:
        raise ValueError(f"--k-max must be in [1, {cfg.engine.max_k}] (engine.max_k)")
    items = read_jsonl(args.prompts)
    n = record_file(build_engine(cfg), items, args.out, args.max_tokens, args.k_max, args.tenant)
    print(f"wrote {n} requests to {args.out}", file=sys.stderr)
    return 0


def cmd_replay(args) -> int:
    from draftpick.controller.replay import plot, replay, summary_lines

    try:
        configs = json.loads(args.policy_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"--policy-config is not valid JSON: {e}") from None
    if args.repeat < 1 or args.load < 1:
        raise ValueError("--repeat and --load must be >= 1")
    try:
        ks = None if args.ks is None else [int(k) for k in args.ks.split(",") if k]
    except ValueError:
        raise ValueError(f"--ks must be comma-separated draft lengths, got {args.ks!r}") from None
    specs = [p for p in args.policies.split(",") if p]
    drafters = None if args.drafters is None else [d for d in args.drafters.split(",") if d]
    out, series = replay(args.trace, specs, args.repeat, args.seed, configs=configs, ignore_tags=args.ignore_tags,
                         drafters=drafters, estimates=args.estimates, counterfactual=args.counterfactual,
                         load=args.load, ks=ks)
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=1)
    if args.plot:
        plot(series, out["arms"], args.plot)
    for line in summary_lines(out, args.per_request):
        print(line, file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from draftpick.training.distill import DistillSettings
    from draftpick.training.run import DistillJob, run_distill
    from draftpick.workers.models import place

    job = DistillJob(target_path=args.target or load_config(args.config).target.path, prompts=args.prompts,
                     max_items=args.max_items, held_out=args.held_out, generate=args.generate,
                     generate_batch=args.generate_batch, generate_minutes=args.generate_minutes,
                     validate_tokens=args.validate_tokens)
    settings = DistillSettings(
        out=args.out, init=args.init, steps=args.steps, minutes=args.minutes, seq_len=args.seq_len,
        batch=args.batch, lr=args.lr, vocab=args.vocab, teacher_dtype=args.teacher_dtype,
        student_dtype=args.student_dtype, unroll=args.unroll, teacher_cache_gb=args.teacher_cache_gb,
        loss_on=args.loss_on, prompt_context=args.prompt_context, weights=args.weights,
        device=place(args.device, "fp32").device)
    print(json.dumps(run_distill(job, settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
