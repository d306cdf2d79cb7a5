"""record -> replay on tiny models: the simulator reproduces the engine, and the report's contract."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from draftpick.controller.replay import Replayer, load_trace, simulate, trace_drafters
from draftpick.deploy.cli import main
from draftpick.policies.types import Arm, Choice, aggregate
from tiny import VOCAB, feature_drafter, noisy_copy, save_models
from draftpick.workers.drafters.model import VOCAB_FILE
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.factory import build_engine
from draftpick.workers.record import record_file
from draftpick.workers.sampling import SamplingParams

PROMPTS = [
    {"id": "c1", "domain": "code", "tag": "code", "prompt": "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"},
    {"id": "c2", "domain": "code", "tag": "code", "prompt": "x = 1\ny = 2\nx = 1\ny = "},
    {"id": "t1", "domain": "text", "tag": "text", "prompt": "the cat sat on the mat."},
    {"id": "t2", "domain": "text", "tag": "text", "messages": [{"role": "user", "content": "hello there"}]},
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, target, tok):
    root = save_models(tmp_path_factory.mktemp("rec"), target, tok)
    # a drafter with a reduced output vocabulary (as distilled ones have): every other token id
    noisy_copy(target, 0.05).save_pretrained(root / "trimmed")
    (root / "trimmed" / VOCAB_FILE).write_text(json.dumps(list(range(0, VOCAB, 2))))
    # a feature (EAGLE-like) head: drafts beyond the first token from its own predicted features
    feature_drafter(target, tok, root / "feat", [p.get("prompt", "hello there") for p in PROMPTS])
    cfg = {"target": {"name": "tiny", "path": str(root / "target")},
           "drafters": [{"type": "ngram"}, {"type": "suffix"}, {"type": "model", "name": "close", "path": str(root / "close")},
                          {"type": "model", "name": "trimmed", "path": str(root / "trimmed")},
                          {"type": "feature", "name": "feat", "path": str(root / "feat")},
                          # the same drafters behind a confidence gate (rounds may draft nothing)
                          {"type": "model", "name": "closegate", "path": str(root / "close"), "min_confidence": 0.3},
                          {"type": "feature", "name": "featgate", "path": str(root / "feat"), "min_confidence": 0.2},
                          # measured live only in the rounds it plays
                          {"type": "feature", "name": "featidle", "path": str(root / "feat"), "full_information": False}],
           "engine": {"device": "cpu"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    config = DraftpickConfig.model_validate(cfg)
    assert record_file(build_engine(config), PROMPTS, str(root / "trace.jsonl"), max_tokens=40, k_max=6,
                       progress=False) == len(PROMPTS)
    return root, config


def test_record_through_the_cli_writes_the_same_trace_shape(recorded, tmp_path):
    root, _ = recorded
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in PROMPTS[:2]))
    assert main(["record", "--config", str(root / "cfg.yaml"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--max-tokens", "40", "--k-max", "6", "--out", str(tmp_path / "trace.jsonl")]) == 0
    cli, lib = load_trace(tmp_path / "trace.jsonl"), load_trace(root / "trace.jsonl")[:2]
    for a, b in zip(cli, lib):
        assert a.data["num_tokens"] == b.data["num_tokens"] and set(a.data["drafters"]) == set(b.data["drafters"])
        assert a.data["drafters"]["ngram"] == b.data["drafters"]["ngram"]


@pytest.mark.parametrize("arm,threshold", [(Arm("ngram", 3), None), (Arm("close", 2), None), (Arm("close", 6), None),
                                           (Arm("trimmed", 3), None), (Arm("feat", 1), None), (Arm("feat", 4), None),
                                           (Arm("feat", 6), 0.3), (Arm("none", 0), None),
                                           (Arm("closegate", 4), None), (Arm("featgate", 4), None)])
def test_simulated_rounds_equal_the_engines_rounds(recorded, tok, arm, threshold):
    root, cfg = recorded
    engine = build_engine(cfg)
    from draftpick.workers.inputs import encode_input

    stopped_early = gated = rounds = 0
    totals = [[0, 0], [0, 0]]  # simulated, live: rounds, drafted tokens
    for req, item in zip(load_trace(root / "trace.jsonl"), PROMPTS):
        res = engine.generate(encode_input(tok, item), SamplingParams(max_tokens=40), arm,
                              chooser=lambda g: Choice(arm, 1.0, threshold))
        sim, _ = simulate(req, lambda r, last: Choice(arm, 1.0, threshold), [arm])
        if arm.drafter.endswith("gate"):
            # a gate compares confidences with a cut: the trace's come from the plain run's hidden states
            # (a model drafter's: teacher-forced on the true text), the engine's from its verify forwards,
            # which differ in the last bits, so a confidence at the cut may fall on the other side
            # (past a rejected draft, a model drafter's true-text confidences run higher than on its own
            # path, so its trace overstates the drafted count there: only its rounds are compared)
            assert sum(r.emitted for r in sim) == sum(r.emitted for r in res.records)
            for i, rs in enumerate((sim, res.records)):
                totals[i][0] += len(rs)
                totals[i][1] += sum(r.num_drafted for r in rs)
        else:
            assert [(r.num_drafted, r.emitted) for r in sim] == [(r.num_drafted, r.emitted) for r in res.records]
            # accepted counts agree too, except where the last round's drafts ran past EOS
            assert [r.accepted for r in sim[:-1]] == [r.accepted for r in res.records[:-1]]
        stopped_early += sum(0 < r.num_drafted < arm.k for r in res.records[:-1])
        gated += sum(r.num_drafted == 0 for r in res.records[:-1])
        rounds += len(res.records) - 1
    if threshold is not None:
        assert stopped_early > 0  # the confidence stop was exercised
    if arm.drafter.endswith("gate"):
        assert 0 < gated < rounds  # the gate skipped some rounds, not all
        (n_sim, d_sim), (n_live, d_live) = totals
        assert abs(n_sim - n_live) <= 0.05 * n_live
        if arm.drafter == "featgate":
            assert abs(d_sim - d_live) <= 0.1 * d_live


@pytest.mark.parametrize("arm", [Arm("ngram", 3), Arm("featidle", 3), Arm("none", 0)])
def test_simulated_feedback_names_the_drafters_the_engine_measures(recorded, tok, arm):
    """A policy learns from the same drafters in replay as live: a drafter configured with
    full_information: false appears in a round's per-drafter feedback only when it is played."""
    root, cfg = recorded
    engine = build_engine(cfg)
    from draftpick.workers.inputs import encode_input

    seen = set()
    for req, item in zip(load_trace(root / "trace.jsonl"), PROMPTS):
        res = engine.generate(encode_input(tok, item), SamplingParams(max_tokens=40), arm)
        sim, _ = simulate(req, lambda r, last: Choice(arm, 1.0), [arm])
        live = [sorted(r.per_drafter) for r in res.records]
        assert [sorted(r.per_drafter) for r in sim] == live
        seen.update(n for names in live for n in names)
    assert ("featidle" in seen) == (arm.drafter == "featidle") and "ngram" in seen


def test_replay_restricted_to_some_drafters(recorded, capsys, tmp_path):
    root, _ = recorded
    out = tmp_path / "o.json"
    assert main(["replay", str(root / "trace.jsonl"), "--policies", "ucb1", "--drafters", "ngram,suffix",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert {a.split(":")[0] for a in rep["arms"]} == {"none", "ngram", "suffix"}
    full = Replayer(load_trace(root / "trace.jsonl")).oracle()
    assert rep["fixed_arms"] == {a: v for a, v in full["fixed"].items() if a in rep["arms"]}
    assert main(["replay", str(root / "trace.jsonl"), "--policies", "ucb1", "--drafters", "ngram,nope",
                 "--json", str(out)]) == 2
    assert "nope not in the trace" in capsys.readouterr().err


def test_suffix_trace_sees_only_earlier_outputs(recorded, tok):
    """A fresh engine serving the requests in the recorded order drafts exactly what the trace says:
    the trace must not let a request's suffix lookups see its own output."""
    root, cfg = recorded
    engine = build_engine(cfg)
    from draftpick.workers.inputs import encode_input

    for req, item in zip(load_trace(root / "trace.jsonl"), PROMPTS):
        res = engine.generate(encode_input(tok, item), SamplingParams(max_tokens=40), Arm("suffix", 3))
        sim, _ = simulate(req, lambda r, last: Choice(Arm("suffix", 3), 1.0), [])
        assert [(r.num_drafted, r.emitted) for r in sim] == [(r.num_drafted, r.emitted) for r in res.records]
        assert [r.accepted for r in sim[:-1]] == [r.accepted for r in res.records[:-1]]


def test_replay_json_contract_and_consistency(recorded, capsys):
    root, _ = recorded
    out = root / "out.json"
    code = main(["replay", str(root / "trace.jsonl"), "--policies", "fixed,ucb1,thompson,hedge,contextual,hf-heuristic",
                 "--repeat", "20", "--seed", "3", "--json", str(out), "--plot", str(root / "out.png")])
    assert code == 0
    rep = json.loads(out.read_text())
    oracle, best = rep["oracle"]["tokens_per_s"], rep["best_fixed"]
    assert oracle >= best["tokens_per_s"] == max(rep["fixed_arms"].values())
    for name, p in rep["policies"].items():
        assert {"tokens_per_s", "regret_vs_oracle", "regret_vs_best_fixed"} <= set(p)
        assert p["tokens_per_s"] <= oracle * (1 + 1e-9) and p["regret_vs_oracle"] >= -1e-9
    # `fixed` plays the best fixed arm: exactly its throughput, zero regret against it
    assert rep["policies"]["fixed"]["tokens_per_s"] == pytest.approx(best["tokens_per_s"], rel=1e-12)
    assert rep["policies"]["fixed"]["regret_vs_best_fixed"] == pytest.approx(0, abs=1e-9)
    assert (root / "out.png").stat().st_size > 10_000
    # the per-request table: the oracle's seconds are each request's minimum, `fixed` plays one arm
    rp = Replayer(load_trace(root / "trace.jsonl"))
    secs = rp.table()
    fixed_rows = rep["policies"]["fixed"]["per_request"]
    assert [r["oracle_s"] for r in fixed_rows] == pytest.approx(list(secs.min(1)))
    assert all(r["policy_s"] == pytest.approx(r["best_fixed_s"]) and list(r["played"]) == [best["arm"]]
               for r in fixed_rows)
    assert sum(sum(r["played"].values()) for r in rep["policies"]["contextual"]["per_request"]) == 10 * len(fixed_rows)
    assert main(["replay", str(root / "trace.jsonl"), "--policies", "contextual", "--json", str(out),
                 "--per-request"]) == 0
    assert "contextual, per request" in capsys.readouterr().err


def test_oracle_is_per_request_minimum(recorded):
    root, _ = recorded
    rp = Replayer(load_trace(root / "trace.jsonl"))
    secs = rp.table()
    tokens = sum(r.n for r in rp.reqs)
    assert rp.oracle()["oracle"]["tokens_per_s"] == pytest.approx(tokens / secs.min(1).sum())


def test_bad_trace_and_policy_are_clear_errors(recorded, capsys, tmp_path):
    root, _ = recorded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"num_tokens": 3}\n')
    assert main(["replay", str(bad), "--policies", "ucb1", "--json", str(tmp_path / "o.json")]) == 2
    assert "lacks" in capsys.readouterr().err
    assert main(["replay", str(root / "trace.jsonl"), "--policies", "nope", "--json", str(tmp_path / "o.json")]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    for ks, message in (("2,x", "--ks must be comma-separated"), ("0,2", "draft lengths must be >= 1")):
        assert main(["replay", str(root / "trace.jsonl"), "--policies", "fixed", "--ks", ks,
                     "--json", str(tmp_path / "o.json")]) == 2
        assert message in capsys.readouterr().err
    assert main(["replay", str(root / "trace.jsonl"), "--policies", "fixed", "--ks", "2,4",
                 "--json", str(tmp_path / "o.json")]) == 0
    assert set(json.loads((tmp_path / "o.json").read_text())["arms"]) == {"none:0"} | {
        f"{d}:{k}" for d in trace_drafters(load_trace(root / "trace.jsonl")) for k in (2, 4)}


PLUGIN_WITHOUT_SCALE = '''
from draftpick.policies import Arm, Choice


class FirstArm:
    """A plug-in written from the README's contract: its constructor takes the arms and its own option only."""
    name = "first-arm"
    level = "request"

    def __init__(self, arms, index=0):
        self.arms = list(arms)
        self.index = index

    def select(self, context, stats, rng):
        return Choice(self.arms[self.index], 1.0)

    def increments(self, record):
        return {"n": 1.0}
'''


def test_a_plugin_gets_only_the_options_it_declares(recorded, tmp_path, monkeypatch):
    """Replay offers its reward scale; a plug-in that does not take `scale` is built without it, and
    one whose constructor names it (examples/greedy_mean.py) receives it."""
    from draftpick.controller.replay import replay

    (tmp_path / "first_arm.py").write_text(PLUGIN_WITHOUT_SCALE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    root, _ = recorded
    out, _ = replay(str(root / "trace.jsonl"), ["first_arm:FirstArm", "greedy_mean:GreedyMean"], repeat=2,
                    configs={"first_arm:FirstArm": {"index": 1}})
    assert set(out["policies"]) == {"first_arm:FirstArm", "greedy_mean:GreedyMean"}
    first = out["policies"]["first_arm:FirstArm"]
    assert first["tokens_per_s"] == pytest.approx(out["fixed_arms"][out["arms"][1]], rel=1e-9)


def _clustered_request(n: int = 201, k_max: int = 8) -> dict:
    """A request whose drafter `copy` matches everything in the first half (a copied passage) and
    nothing in the second: where rounds start decides what a drafter seems worth."""
    half = (n - 1) // 2
    matched = [k_max] * half + [0] * (n - 1 - half)
    return {"num_tokens": n, "max_tokens": n, "k_max": k_max, "prefill_s": 0.0, "verify_s": [0.01] * (k_max + 1),
            "draft_s_per_token": {"copy": 0.0}, "tag": "", "features": [],
            "drafters": {"copy": {"proposed": [k_max] * (n - 1), "matched": matched, "full_information": True}}}


def test_re_run_rounds_make_the_estimate_of_a_never_played_lookup_arm_exact():
    """Played `copy:2`, rounds start every 3 tokens in the copied half and every token after it, so
    reach / hit counts see `copy` accept at the first position in 34 of 132 rounds and take every
    later position as accepted: `copy:8` looks like 1 + 8 x 34 / 132 = 3.1 tokens a round. Its own
    rounds skim the copied half in 9-token strides and crawl the rest: 200 / 104 = 1.9. Re-running
    its rounds along the output (the counterfactual) gives the truth without playing it."""
    from draftpick.controller.replay import estimate_bias
    from draftpick.workers.trace import TraceRequest

    arms = [Arm("none", 0), Arm("copy", 2), Arm("copy", 8)]
    old = estimate_bias(Replayer([TraceRequest(_clustered_request())], arms, counterfactual=False), arms[1:2])
    new = estimate_bias(Replayer([TraceRequest(_clustered_request())], arms), arms[1:2])
    before, after = old["copy:2"]["copy:8"], new["copy:2"]["copy:8"]
    assert before["true"] == after["true"] == pytest.approx(200 / (12 + 92))  # rounds at 1, 10, .., 100, 109 .. 200
    assert before["estimated"] == pytest.approx(1 + 8 * 34 / 132) and before["bias"] > 0.5
    assert after["bias"] == pytest.approx(0.0, abs=1e-9)


def test_the_engines_counterfactual_rounds_are_the_rounds_the_arm_takes_when_played(recorded, target, tok):
    """Played another arm, the engine re-runs each lookup drafter along the output: its rounds for
    (drafter, k) equal what playing (drafter, k) takes, greedy and seeded (each generation its own
    tenant, so the suffix index is the same); replay's counterfactual of a recorded request agrees."""
    from draftpick.workers.drafters.model import ModelDrafter
    from draftpick.workers.drafters.ngram import NgramDrafter
    from draftpick.workers.drafters.suffix import SuffixDrafter
    from draftpick.workers.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, tok, {"ngram": NgramDrafter(), "suffix": SuffixDrafter(),
                                             "close": ModelDrafter("close", noisy_copy(target, 0.05))})
    tenants = iter(range(1000))
    for p in PROMPTS[:2]:
        ids = tok(p["prompt"]).input_ids
        for params in (SamplingParams(max_tokens=40), SamplingParams(max_tokens=40, temperature=0.8, seed=3)):
            cf = engine.generate(ids, params, Arm("close", 2), tenant=str(next(tenants))).records[-1].counterfactual
            assert set(cf) == {"ngram", "suffix"}
            for drafter in ("ngram", "suffix"):
                for k in (1, 4):
                    played = engine.generate(ids, params, Arm(drafter, k), tenant=str(next(tenants)))
                    assert cf[drafter][k - 1] == len(played.records), (drafter, k, params)
    sampled = engine.generate(tok(PROMPTS[0]["prompt"]).input_ids, SamplingParams(max_tokens=20, temperature=0.8),
                              Arm("ngram", 2))
    assert sampled.records[-1].counterfactual == {}  # unseeded: the output depends on the arm

    root, _ = recorded
    replayed = Replayer(load_trace(str(root / "trace.jsonl"))).fixed(0, Arm("none", 0))[0]
    live = engine.generate(tok(PROMPTS[0]["prompt"]).input_ids, SamplingParams(max_tokens=40), Arm("none", 0),
                           tenant=str(next(tenants)))
    k_max = len(replayed.counterfactual["ngram"])
    assert replayed.counterfactual["ngram"] == live.records[-1].counterfactual["ngram"][:k_max]
    assert replayed.counterfactual_drafted["ngram"] == live.records[-1].counterfactual_drafted["ngram"][:k_max]


def test_a_requests_rounds_so_far_re_run_are_the_rounds_its_arm_took_so_far(recorded, target, tok):
    """Generation.rerun (live) and replay's re-run (Context.rerun) before each round: the rounds each
    lookup arm would have taken over the tokens so far. Playing (drafter, k), its own entry is exactly
    the rounds played so far, the played rounds' ends being the re-run's; at the end it is the
    request's counterfactual. Unseeded sampling offers none (the output depends on the arm)."""
    from draftpick.controller.feedback import check_record
    from draftpick.policies.types import Context, RoundRecord
    from draftpick.workers.drafters.ngram import NgramDrafter
    from draftpick.workers.drafters.suffix import SuffixDrafter
    from draftpick.workers.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, tok, {"ngram": NgramDrafter(), "suffix": SuffixDrafter()})
    for p, (drafter, k) in zip(PROMPTS[:2], (("ngram", 2), ("suffix", 3))):
        seen = []

        def chooser(g, arm=Arm(drafter, k)):
            seen.append((len(g.records), g.rerun()))
            return Choice(arm, 1.0)

        g = engine.start(tok(p["prompt"]).input_ids, SamplingParams(max_tokens=40), Arm(drafter, k), chooser=chooser)
        result = g.run()
        assert len(seen) == len(result.records) > 3 and seen[0][1] is None  # before round 0: only the prefill's token
        for played, (rounds, tokens, drafted) in seen[1:]:
            assert set(rounds) == {"ngram", "suffix"} and rounds[drafter][k - 1] == played
            # and the rows they drafted are the rows its rounds drafted
            assert drafted[drafter][k - 1] == sum(r.num_drafted for r in result.records[:played])
        assert sum(r.num_drafted for r in result.records) > 0
        assert sum(r.emitted for r in result.records[:-1]) == seen[-1][1].tokens
        rerun = g.rerun()
        assert rerun.rounds == result.records[-1].counterfactual
        assert rerun.drafted == result.records[-1].counterfactual_drafted
        assert aggregate(result.records).counterfactual_drafted[drafter][k - 1] == sum(
            r.num_drafted for r in result.records)  # the request's feedback carries the rows its arm drafted
        for r in result.records:  # and the controller accepts it
            check_record(RoundRecord.from_dict(json.loads(json.dumps(r.to_dict()))), set(engine.drafters),
                         engine.counterfactual_k)
    sampled = engine.start(tok(PROMPTS[0]["prompt"]).input_ids, SamplingParams(max_tokens=8, temperature=0.8),
                           Arm("ngram", 2))
    sampled.run()
    assert sampled.rerun() is None

    class Played:  # a round-level policy playing ngram:2, keeping what replay offers it before each round
        level, name, seen = "round", "played", []

        def select(self, ctx: Context, stats, rng):
            self.seen.append((ctx.round, ctx.rerun(), ctx.request.num_drafted if ctx.request else 0))
            return Choice(Arm("ngram", 2), 1.0)

        def increments(self, record):
            return {}

    root, _ = recorded
    rp = Replayer(load_trace(str(root / "trace.jsonl")))
    policy = Played()
    rp.run(policy)
    assert len(policy.seen) > 3
    for r, rerun, drafted in policy.seen:
        assert (rerun is None) if r == 0 else (rerun.rounds["ngram"][1] == r and rerun.drafted["ngram"][1] == drafted)
    assert any(drafted for _, _, drafted in policy.seen)


def test_replay_at_a_load_uses_the_recorded_batched_costs_and_the_policies_see_it(recorded, tmp_path):
    from draftpick.controller.replay import at_load, replay
    from draftpick.workers.trace import TraceError

    root, _ = recorded
    reqs = load_trace(root / "trace.jsonl")
    table = reqs[0].data["batch_verify_s"]
    assert sorted(map(int, table)) == [1, 2, 4, 8, 16, 32] and all(len(v) == 7 for v in table.values())
    assert table["16"][0] < table["1"][0]  # a request's share of a batch of 16 costs less than a forward alone
    at16 = at_load(reqs, 16)
    for r, r16 in zip(reqs, at16):
        assert r16.data["verify_s"] == pytest.approx([v * a / b for v, a, b in zip(r.data["verify_s"], table["16"], table["1"])])
    # the feature heads and model drafters draft requests together: their cost per drafted token at
    # each batch size; at a load, theirs is scaled by it and the lookup drafters' kept
    drafts = reqs[0].data["batch_draft_s"]
    assert set(drafts) == {"feat", "featgate", "featidle", "close", "closegate", "trimmed"}
    assert all(sorted(map(int, c)) == [1, 2, 4, 8, 16, 32] and min(c.values()) > 0 for c in drafts.values())
    for r, r16 in zip(reqs, at16):
        cost, cost16 = r.data["draft_s_per_token"], r16.data["draft_s_per_token"]
        for name in ("feat", "close"):
            assert cost16[name] == pytest.approx(cost[name] * drafts[name]["16"] / drafts[name]["1"])
        assert cost16["ngram"] == cost["ngram"] and cost16["suffix"] == cost["suffix"]
    at12 = at_load(reqs, 12)[0].data["draft_s_per_token"]["feat"] / reqs[0].data["draft_s_per_token"]["feat"]
    assert at12 == pytest.approx((drafts["feat"]["8"] + drafts["feat"]["16"]) / 2 / drafts["feat"]["1"])
    out, _ = replay(str(root / "trace.jsonl"), ["batch-table", "contextual"], repeat=3, load=16)
    # the static table drafts nothing from 16 in flight: exactly plain decoding at that load
    assert out["load"] == 16 and out["policies"]["batch-table"]["tokens_per_s"] == pytest.approx(out["fixed_arms"]["none:0"])
    recs, _ = simulate(at16[0], lambda r, last: Choice(Arm("ngram", 2), 1.0), Replayer(at16).arms)
    assert {(r.batch, r.load) for r in recs} == {(16, 16)}
    with pytest.raises(TraceError, match="--load 64 needs"):
        at_load(reqs, 64)


def test_a_policy_that_switches_within_the_request_stays_lossless_and_replays_exactly(recorded, tok):
    """`contextual` revisits its choice at rounds 1, 2, 4, 8, .. from the request's own rounds (issue 19's
    length and drafter within the request). Live (the engine asking it before every round, as the
    controller's round chooser, `round_chooser`, does) and in replay (the same learned statistics) it takes the same
    rounds; the output equals plain greedy decoding; and some request changed its arm midway."""
    from draftpick.controller.controller import round_chooser
    from draftpick.policies.registry import create
    from draftpick.policies.state import add
    from draftpick.policies.types import Context
    from draftpick.workers.inputs import encode_input

    root, cfg = recorded
    engine = build_engine(cfg)
    reqs = load_trace(root / "trace.jsonl")
    for r in reqs:
        r.data["tag"] = ""
    keep = ("ngram", "suffix", "close", "feat")
    rp = Replayer(reqs, [a for a in Replayer(reqs).arms if a.drafter in keep + ("none",)])
    # a learned estimate worth one round of the request's (16 by default): these 40-token requests switch
    policy = create("contextual", rp.arms, {"switch_prior": 1.0})
    assert policy.level == "round"
    stats: dict[str, float] = {}
    for i in range(len(reqs)):  # learned from every request played plain, then from each played on ngram:2
        for arm in (Arm("none", 0), Arm("ngram", 2)):
            add(stats, policy.increments(rp.fixed(i, arm)[0]))
    switched = 0
    for i, (req, item) in enumerate(zip(reqs, PROMPTS)):
        ctx = Context(features=tuple(req.data["features"]))
        ids = encode_input(tok, item)
        live = engine.generate(ids, SamplingParams(max_tokens=40), Arm("none", 0),
                               chooser=round_chooser(policy, ctx, lambda: stats, np.random.default_rng(0)))
        sim, _, _ = rp._per_round(policy, i, ctx, dict(stats), np.random.default_rng(0), 0.0)
        assert [(r.drafter, r.k, r.num_drafted, r.emitted) for r in sim] == \
               [(r.drafter, r.k, r.num_drafted, r.emitted) for r in live.records]
        # the played drafter is judged on its own draft alone, as live (not on the trace's longer proposal)
        assert [r.per_drafter.get(r.drafter) for r in sim[:-1]] == [r.per_drafter.get(r.drafter) for r in live.records[:-1]]
        assert live.token_ids == engine.generate(ids, SamplingParams(max_tokens=40), Arm("none", 0)).token_ids
        switched += len({(r.drafter, r.k) for r in live.records[:-1]}) > 1
    assert switched > 0
