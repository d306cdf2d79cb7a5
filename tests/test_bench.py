"""`draftpick bench engine` and `bench forward` end to end on tiny models (fast): every row present, outputs lossless."""
import asyncio
import json

import yaml

from draftpick.deploy.cli import main
from tiny import save_models


def _tiny_config(tmp_path, target, tok) -> None:
    """cfg.yaml: the tiny target with an n-gram and a close model drafter."""
    save_models(tmp_path, target, tok)
    cfg = {"target": {"name": "tiny", "path": str(tmp_path / "target")},
           "drafters": [{"type": "ngram"}, {"type": "model", "name": "close", "path": str(tmp_path / "close")}],
           "engine": {"device": "cpu"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))


def test_bench_engine_writes_side_by_side_results(tmp_path, target, tok, capsys):
    _tiny_config(tmp_path, target, tok)
    code = main(["bench", "engine", "--config", str(tmp_path / "cfg.yaml"), "--domains", "humaneval,mtbench-coding",
                 "--prompts-per-domain", "1", "--max-tokens", "12", "--ks", "0,2", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(next((tmp_path / "out").glob("engine-*.json")).read_text())
    rows = report["configs"]
    assert set(rows) == {"hf:target-only", "engine:none:0", "hf:pld:2", "engine:ngram:2", "hf:assist:close:2",
                         "engine:close:2", "hf:assist:close:heur"}
    for name, row in rows.items():
        assert row["all"]["mismatches"] == 0, name  # greedy: every configuration equals plain generate
        assert row["all"]["prompts"] == 2 and row["all"]["tokens"] > 0
    assert rows["hf:target-only"]["all"]["ratio_vs_target_only"] == 1.0
    close = rows["engine:close:2"]["all"]
    assert close["mean_acceptance_length"] > 1 and len(close["per_position_acceptance"]) == 2
    md = next((tmp_path / "out").glob("engine-*.md")).read_text()
    assert "| engine:close:2 |" in md and "formula" in md


def test_bench_engine_samples_with_both_rules_side_by_side(tmp_path, target, tok):
    """--temperature: every engine row unseeded and seeded; seeded outputs all equal seeded plain decoding."""
    _tiny_config(tmp_path, target, tok)
    code = main(["bench", "engine", "--config", str(tmp_path / "cfg.yaml"), "--domains", "humaneval,mtbench-coding",
                 "--prompts-per-domain", "2", "--max-tokens", "16", "--ks", "0,3", "--temperature", "0.8",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    rows = json.loads(next((tmp_path / "out").glob("engine-*.json")).read_text())["configs"]
    assert set(rows) == {f"engine:{a}{s}" for a in ("none:0", "ngram:3", "close:3") for s in ("", "+seed")}
    for name, row in rows.items():
        assert row["all"]["mismatches"] == 0, name
        assert row["all"]["prompts"] == 4
    assert rows["engine:close:3+seed"]["all"]["mean_acceptance_length"] > 1
    assert rows["engine:close:3"]["all"]["mean_acceptance_length"] > 1


def test_bench_forward_measures_both_variants_side_by_side(tmp_path, target, tok, capsys):
    save_models(tmp_path, target, tok, close_noise=None)
    cfg = {"target": {"name": "tiny", "path": str(tmp_path / "target")}, "drafters": [], "engine": {"device": "cpu"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["bench", "forward", "--config", str(tmp_path / "cfg.yaml"), "--tokens", "1,2,4,20",
                 "--context", "24", "--repeats", "3", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(next((tmp_path / "out").glob("forward-*.json")).read_text())
    assert set(report["ms"]) == {"stock", "small_batch"}
    for variant in report["ms"].values():
        assert set(variant) == {"1", "2", "4", "20"} and all(v > 0 for v in variant.values())
    # 20 tokens (and the 24-token context) take `linear` in both variants: the same numbers; fewer may take
    # other paths, close to them
    assert report["max_abs_logit_diff"]["20"] == 0.0
    assert all(report["max_abs_logit_diff"][n] < 1e-4 and report["argmax_agrees"][n] for n in ("1", "2", "4"))
    assert "| small_batch ÷ stock |" in next((tmp_path / "out").glob("forward-*.md")).read_text()
    assert main(["bench", "forward", "--config", str(tmp_path / "cfg.yaml"), "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_bench_controller_measures_decisions_folding_and_ray(tmp_path, target, tok):
    _tiny_config(tmp_path, target, tok)
    code = main(["bench", "controller", "--config", str(tmp_path / "cfg.yaml"), "--requests", "60", "--decisions", "200",
                 "--callers", "2", "--seconds", "1", "--max-tokens", "8", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(next((tmp_path / "out").glob("controller-*.json")).read_text())
    assert report["folding"]["entries"] == 60 and report["folding"]["records_per_s"] > 0
    assert 0 < report["decisions"]["p50_ms"] <= report["decisions"]["p99_ms"]
    assert report["ray"]["decisions_per_s"] > 0 and report["folding"]["redis_commands_per_request"] > 0


def test_bench_batch_compares_interleaved_and_batched_and_counts_no_mismatch(tmp_path, target, tok):
    _tiny_config(tmp_path, target, tok)
    code = main(["bench", "batch", "--config", str(tmp_path / "cfg.yaml"), "--concurrency", "1,3", "--max-tokens", "12",
                 "--arm", "close:2", "--prefill-chunk", "2", "--join-every", "2", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = json.loads(next((tmp_path / "out").glob("batch-*.json")).read_text())["rows"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        (n, m) for n in (1, 3) for m in ("batched plain", "batched close:2", "batched close:2, drafts alone",
                                          "joining, whole prefill", "joining, prefill chunk 2", "joining every 2",
                                          "joining every 2, prefix cache", "interleaved plain")]
    for r in rows:
        assert r["mismatches"] == 0 and r["tokens"] > 0, r  # batched greedy outputs equal each request alone
    # three requests: batched steps run all of them at once, interleaved ones one each
    by = {r["mode"]: r for r in rows if r["concurrency"] == 3}
    assert by["batched plain"]["steps"] < by["interleaved plain"]["steps"] / 2
    # joining one a step takes more steps than starting together, chunked prefill more again
    assert by["batched plain"]["steps"] < by["joining, whole prefill"]["steps"] < by["joining, prefill chunk 2"]["steps"]
    assert by["joining, prefill chunk 2"]["step_p99_ms"] > 0
    # the model drafter drafted (its seconds are in both of its modes), together and alone
    assert by["batched close:2"]["draft_share"] > 0 and by["batched close:2, drafts alone"]["draft_share"] > 0


def test_bench_load_in_process_runs_every_mode_against_the_worker(tmp_path, target, tok):
    """--in-process: the same clients against EngineWorker in this process, no Ray or HTTP; every
    mode of the three variants, each losslessly the same tokens for the same prompts, the deciding
    ones (learned, batch-table) from their policy over what the rounds fed back."""
    _tiny_config(tmp_path, target, tok)
    code = main(["bench", "load", "--in-process", "--config", str(tmp_path / "cfg.yaml"), "--concurrency", "1,3",
                 "--variants", "interleaved,batched,table", "--fixed", "close:2", "--max-tokens", "8",
                 "--warmup", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(next((tmp_path / "out").glob("load-*.json")).read_text())
    rows = report["load"]
    modes = ["interleaved, no speculation", "batched, no speculation", "batched, fixed close:2", "batched, learned",
             "table, batch-table"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [(n, m) for n in (1, 3) for m in modes]
    assert report["how"]["in_process"] and report["overhead"] is None
    for n in (1, 3):
        level = [r for r in rows if r["concurrency"] == n]
        assert all(r["requests"] == 2 * n for r in level)
        # the same greedy tokens in every mode, and the same refusals (a prompt past the tiny target's window)
        assert len({(r["errors"], round(r["output_tokens_per_s"] * r["wall_s"])) for r in level}) == 1
    assert rows[0]["errors"] == 0 and rows[0]["output_tokens_per_s"] > 0
    fixed = next(r for r in rows if r["mode"] == "batched, fixed close:2")
    assert fixed["drafted_per_round"] > 0 and not rows[0]["drafted_per_round"]
    # the worker's forward seconds over each run: prompts and rounds, within the run's wall time (one
    # engine thread runs the forwards one after another)
    for r in rows:
        assert r["forward_s"]["prefill"] > 0 and r["forward_s"]["decode"] > 0, r
        assert sum(r["forward_s"].values()) <= r["wall_s"] and 0 < r["prefill_share"] < 1
    assert "prompts' share of forward time" in next((tmp_path / "out").glob("load-*.md")).read_text()
    # every request's rounds fed its deciding variant's statistics (those of the variant's pinned modes too)
    # one entry per answered request, + the variant's first request (unmeasured) + --warmup 1 per client at 1 and 3
    answered = {v: sum(r["requests"] - r["errors"] for r in rows if r["mode"].startswith(v + ",")) + 1 + (1 + 3)
                for v in ("batched", "table")}
    assert report["how"]["folded"] == answered
    # the deciding modes report the arm their policy chose for each answered request
    for mode in ("batched, learned", "table, batch-table"):
        for r in (r for r in rows if r["mode"] == mode):
            assert sum(r["first_arms"].values()) == r["requests"] - r["errors"], r


def test_in_process_clients_give_a_decided_request_the_features_the_ingress_gives_it(tok):
    """--in-process judges the policy without the endpoint, so a request it decides must carry the
    prompt features the ingress computes (without them every request looked the same to it)."""
    from draftpick.bench.load import _local_stream
    from draftpick.controller.local import request_context
    from draftpick.workers.inputs import encode_input

    class Worker:  # around the code under test only: what _local_stream hands the worker
        def tokenize(self, item):
            return encode_input(tok, item)

        async def generate_stream(self, req):
            self.req = req
            yield {"token_ids": [5]}
            yield {"result": {"token_ids": [5]}, "records": [], "plan": None}

    item = {"messages": [{"role": "user", "content": "def f(x):\n    return x + 1\n\nf(f(2))"}]}
    w = Worker()
    assert asyncio.run(_local_stream(w, item, 4, None, "u"))["ok"]
    ingress = request_context({"tag": "", **item}, encode_input(tok, item), 0.0).features  # as deploy.ingress does
    assert w.req.arm is None and len(w.req.features) > 1 and w.req.features == ingress
    asyncio.run(_local_stream(w, item, 4, {"drafter": "ngram", "num_speculative_tokens": 2}, "u"))
    assert str(w.req.arm) == "ngram:2"


def test_bench_load_refuses_bad_arguments_before_starting_anything(capsys):
    assert main(["bench", "load", "--warmup", "-1"]) == 2
    assert "--warmup needs a number >= 0, got -1" in capsys.readouterr().err
    # the measured and the warm-up requests each need their own prompts
    assert main(["bench", "load", "--concurrency", "32,32", "--warmup", "20"]) == 2
    assert "more distinct prompts" in capsys.readouterr().err
    assert main(["bench", "load", "--concurrency", "1,2", "--min-requests", "300"]) == 2  # 300 + 2 x 150 prompts
    assert "more distinct prompts" in capsys.readouterr().err
    assert main(["bench", "load", "--repeats", "0"]) == 2
    assert "--repeats needs a number >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "load", "--concurrency", "32", "--repeats", "8"]) == 2  # 8 x 64 new prompts
    assert "more distinct prompts" in capsys.readouterr().err
    assert main(["bench", "load", "--in-process", "--concurrency", "32", "--repeats", "8"]) == 2  # in-process too
    assert "more distinct prompts" in capsys.readouterr().err


def test_bench_load_rows_say_what_speculation_did():
    """A level's row sums its requests' speculative stats (as the responses' last chunks carry
    them) into drafted tokens per round and acceptance, and counts the arms of their first rounds;
    a failed request counts as an error and adds nothing."""
    from draftpick.bench.load import _markdown, _row

    ok = dict(ok=True, tokens=10, ttft=0.1, gaps=[0.05], seconds=1.0)
    results = [dict(ok, rounds=4, drafted=8, accepted=6, first_arm="ngram:2"),
               dict(ok, rounds=6, drafted=2, accepted=0, first_arm="chat:3"),
               dict(ok, rounds=5, drafted=0, accepted=0, first_arm="ngram:2"),
               {"ok": False, "status": 500, "rounds": 9, "drafted": 9, "accepted": 9}]
    row = _row(4, "learned", results, wall=2.0)
    assert row["errors"] == 1 and row["output_tokens_per_s"] == 15.0
    assert row["drafted_per_round"] == 10 / 15 and row["acceptance"] == 6 / 10
    assert row["first_arms"] == {"ngram:2": 2, "chat:3": 1}
    plain = _row(4, "plain", [dict(ok, rounds=3, drafted=0, accepted=0, first_arm=None)], wall=1.0)
    assert plain["acceptance"] is None and plain["first_arms"] == {}
    how = {"date": "d", "machine": "m", "target": "t", "policy": "p", "variants": ["batched"], "requests_per_client": 1,
           "max_tokens": 8}
    md = _markdown({"how": how, "load": [row, plain], "overhead": None})
    assert "| 0.67 | 0.60 | ngram:2 ×2, chat:3 ×1 |" in md and "| 0 | 0.00 | - | - |" in md
    # with --repeats, a row pools its repetitions and shows each one's tokens/s
    md = _markdown({"how": how, "load": [{**row, "repetitions_tokens_per_s": [14.0, 16.5]}], "overhead": None})
    assert "| 15.0 (14.0, 16.5) |" in md


def test_bench_load_steady_rate_counts_only_while_every_client_streams():
    """The steady window runs from the last client's first token to the first client's last; each
    request counts its tokens there by the share of its chunks inside it."""
    from draftpick.bench.load import _markdown, _row, _steady

    def req(stamps, tokens):
        return {"ok": True, "tokens": tokens, "stamps": stamps}

    # client A: two requests, 1..4 and 5..8 (one token a chunk); client B: one request, 3..6 (two a chunk)
    runs = [[req([1.0, 2.0, 3.0, 4.0], 4), req([5.0, 6.0, 7.0, 8.0], 4)], [req([3.0, 4.0, 5.0, 6.0], 8)]]
    tokens, seconds = _steady(runs)
    # window [3, 6]: A's first request 2 of 4 chunks (2 tokens), its second 2 of 4 (2), B all of its 8
    assert (tokens, seconds) == (2 + 2 + 8, 3.0)
    # a client whose last token comes before another's first: no window
    assert _steady([[req([1.0, 2.0], 2)], [req([3.0, 4.0], 2)]]) == (0.0, 0.0)
    assert _steady([[req([1.0, 2.0], 2)], [{"ok": False, "status": 500}]]) == (0.0, 0.0)  # a client with no token
    row = {**_row(2, "plain", [dict(r, ttft=0.1, gaps=[], seconds=1.0) for c in runs for r in c], wall=8.0),
           "steady_tokens_per_s": 4.0, "repetitions_steady_tokens_per_s": [4.0, None],
           "repetitions_tokens_per_s": [2.0, 2.0]}
    md = _markdown({"how": {"date": "d", "machine": "m", "target": "t", "policy": "p", "variants": ["batched"],
                            "requests_per_client": 1, "max_tokens": 8}, "load": [row], "overhead": None})
    assert "| 2.0 (2.0, 2.0) | 4.0 (4.0, -) |" in md


def test_bench_load_clients_cut_their_first_requests_so_that_requests_end_spread_out():
    """Client i of n cuts its first request to (i + 1) / n of max_tokens (the last runs them all),
    its later ones not; --no-stagger cuts none, nor does a lone client."""
    import argparse

    from draftpick.bench.load import _client, _first_tokens

    args = argparse.Namespace(max_tokens=64, no_stagger=False)
    assert [_first_tokens(args, i, 4) for i in range(4)] == [16, 32, 48, 64]
    assert _first_tokens(args, 0, 1) is None and _first_tokens(args, 0, 200) == 1
    assert _first_tokens(argparse.Namespace(max_tokens=64, no_stagger=True), 0, 4) is None
    sent = []

    async def send(variant, item, pin, user, max_tokens=None):
        sent.append((item, max_tokens))
        return {}

    asyncio.run(_client(send, "batched", ["a", "b", "c"], None, "plain", 16))
    assert sent == [("a", 16), ("b", None), ("c", None)]


def test_bench_load_deploys_its_variants_side_by_side_each_its_own_service():
    """Each variant is its own service (serve.name: its own Serve application, controller and Redis)
    with a share of the worker CPUs, so all can be deployed at once and their modes alternate."""
    from draftpick.bench.load import VARIANTS, _modes, _variant_config
    from draftpick.policies.types import Arm
    from draftpick.workers.config import load_config

    cfg = load_config(None)
    configs = {v: _variant_config(cfg, v, len(VARIANTS)) for v in VARIANTS}
    assert len({c.serve.name for c in configs.values()} | {cfg.serve.name}) == len(VARIANTS) + 1
    assert all(c.worker.num_cpus == cfg.worker.num_cpus / len(VARIANTS) for c in configs.values())
    assert not configs["interleaved"].worker.batching and configs["batched"].worker.batching
    assert configs["table"].policy.name == "batch-table" and configs["batched"].policy == cfg.policy
    modes = [m for v in VARIANTS for m in _modes(v, Arm("ngram", 3))]
    assert len({label for _, label, _ in modes}) == len(modes) == 5
