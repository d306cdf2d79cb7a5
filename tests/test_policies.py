"""Built-in policies on seeded synthetic environments with known optima."""
import numpy as np
import pytest

from draftpick.policies.registry import builtins, create
from draftpick.policies.types import Arm, Context, Rerun, RoundRecord
from synthetic import arms_of, run, ucb1_bound

T = 3000
MEANS = [0.3, 0.5, 0.45, 0.2, 0.6]


def stationary(arms, values):
    table = dict(zip(arms, values))
    return lambda t, ctx: table


@pytest.mark.parametrize("name", ["ucb1", "thompson"])
def test_stochastic_regret_is_sublinear_and_below_the_ucb1_bound(name):
    arms = arms_of(len(MEANS))
    policy = create(name, arms, {"scale": 1.0})
    _, regret = run(policy, stationary(arms, MEANS), T, seed=1)
    assert regret.sum() < ucb1_bound(MEANS, T)
    assert sublinear(regret)


def sublinear(regret) -> bool:
    """The second half of the run adds less than half the regret of the first half."""
    return regret[len(regret) // 2 :].sum() < 0.5 * regret[: len(regret) // 2].sum()


def test_uniform_choice_is_not_sublinear():
    """The growth check above can fail: a policy that never learns has linear regret."""
    arms = arms_of(len(MEANS))
    _, regret = run(create("epsilon-greedy", arms, {"scale": 1.0, "epsilon": 1.0}), stationary(arms, MEANS), T)
    assert not sublinear(regret)


def switching(arms, t_switch):
    def means(t, ctx):
        return dict(zip(arms, [0.7, 0.3, 0.4] if t < t_switch else [0.3, 0.7, 0.4]))
    return means


@pytest.mark.parametrize("name,full_info", [("exp3", False), ("hedge", True)])
def test_adversarial_switch_is_tracked(name, full_info):
    arms = arms_of(3)
    scale = 2.0 if full_info else 1.0  # hedge values tokens per round, 1 + r
    chosen, _ = run(create(name, arms, {"scale": scale}), switching(arms, 1000), 4000, seed=2, full_info=full_info)
    before = np.mean([a == arms[0] for a in chosen[500:1000]])
    after = np.mean([a == arms[1] for a in chosen[3000:]])
    assert before > 0.6 and after > 0.6


def drifting(arms):
    # the best arm degrades below a steady one at t = 3000: a stationary mean needs ~1500 more steps
    def means(t, ctx):
        return dict(zip(arms, [0.6, 0.5, 0.2] if t < 3000 else [0.3, 0.5, 0.2]))
    return means


def test_sliding_window_ucb_recovers_from_drift_and_ucb1_lags():
    arms = arms_of(3)
    sw, _ = run(create("sw-ucb", arms, {"scale": 1.0, "c": 0.5, "bucket": 10, "window": 60}), drifting(arms), 5000, seed=3)
    plain, _ = run(create("ucb1", arms, {"scale": 1.0, "c": 0.5}), drifting(arms), 5000, seed=3)
    sw_rate = np.mean([a == arms[1] for a in sw[3600:]])
    plain_rate = np.mean([a == arms[1] for a in plain[3600:]])
    assert sw_rate > 0.8 and sw_rate > plain_rate + 0.2


CODE = Context(tag="code", features=(1.0, 0.5, 0.8, 0.9, 0.5, 0.0, 0.0))
CHAT = Context(tag="chat", features=(1.0, 0.6, 0.1, 0.05, 0.1, 0.0, 0.0))


def two_contexts(arms):
    table = {"code": [0.7, 0.3, 0.5], "chat": [0.3, 0.7, 0.5]}
    return lambda t, ctx: dict(zip(arms, table[ctx.tag]))


def pick_context(t, rng):
    from dataclasses import replace

    return replace(CODE if rng.random() < 0.5 else CHAT, time=float(t))


def test_contextual_policy_learns_a_different_arm_per_context():
    arms = arms_of(3)
    chosen, regret = run(create("contextual", arms, {"scale": 2.0}), two_contexts(arms), 2000, seed=4,
                         contexts=pick_context)
    # replay the same context sequence to know which context each step had
    rng = np.random.default_rng(4)
    tags = []
    for t in range(2000):
        tags.append(pick_context(t, rng).tag)
        rng.standard_normal(3)  # run() draws one noise value per arm after the context
    last = range(1500, 2000)
    code_rate = np.mean([chosen[t] == arms[0] for t in last if tags[t] == "code"])
    chat_rate = np.mean([chosen[t] == arms[1] for t in last if tags[t] == "chat"])
    assert code_rate > 0.85 and chat_rate > 0.85
    free, free_regret = run(create("ucb1", arms, {"scale": 1.0}), two_contexts(arms), 2000, seed=4, contexts=pick_context)
    assert regret.sum() < 0.5 * free_regret.sum()  # context-free learning cannot do this


def test_full_information_hedge_beats_bandit_feedback_with_many_drafters():
    arms = arms_of(40)
    rng = np.random.default_rng(5)
    values = list(rng.uniform(0.2, 0.55, len(arms)))
    values[17] = 0.7
    env = stationary(arms, values)
    _, hedge = run(create("hedge", arms, {"scale": 2.0}), env, 800, seed=5, full_info=True)
    for bandit in ("ucb1", "exp3", "thompson"):
        _, other = run(create(bandit, arms, {"scale": 1.0}), env, 800, seed=5)
        assert hedge.sum() < 0.5 * other.sum(), bandit


@pytest.mark.parametrize("name", ["thompson", "exp3", "hedge", "epsilon-greedy"])
def test_reported_propensity_matches_choice_frequency_and_keeps_a_floor(name):
    arms = arms_of(4)
    policy = create(name, arms, {"scale": 1.0})
    stats = {}
    for a, (n, r) in zip(arms, [(20, 12), (20, 8), (5, 2), (30, 25)]):
        stats.update({f"n|{a}": n, f"r|{a}": r, f"G|{a}": r * 3, f"reach|{a.drafter}|0": n, f"hit|{a.drafter}|0": r,
                      "vs|1": 100 * 1.06, "vn|1": 100, "obs": 75})
    rng = np.random.default_rng(0)
    picks, props = {}, {}
    N = 4000
    for _ in range(N):
        c = policy.select(Context(), stats, rng)
        picks[c.arm] = picks.get(c.arm, 0) + 1
        props.setdefault(c.arm, []).append(c.propensity)
    for a in picks:
        assert picks[a] / N == pytest.approx(np.mean(props[a]), abs=0.03)
    floor = policy.cfg.epsilon if name == "epsilon-greedy" else policy.cfg.floor
    assert min(min(p) for p in props.values()) >= floor / len(arms) - 1e-12


def test_hf_heuristic_follows_transformers_rule():
    arms = [Arm("ngram", k) for k in range(1, 12)]
    p = create("hf-heuristic", arms, {})
    assert p.level == "round"
    first = p.select(Context(), {}, None).arm
    assert first == Arm("ngram", 5)
    full = RoundRecord("ngram", 5, num_drafted=5, accepted=5, emitted=6, draft_s=0, verify_s=1)
    part = RoundRecord("ngram", 5, num_drafted=5, accepted=2, emitted=3, draft_s=0, verify_s=1)
    one = RoundRecord("ngram", 1, num_drafted=1, accepted=0, emitted=1, draft_s=0, verify_s=1)
    assert p.select(Context(last=full), {}, None).arm == Arm("ngram", 7)
    assert p.select(Context(last=part), {}, None).arm == Arm("ngram", 4)
    assert p.select(Context(last=one), {}, None).arm == Arm("ngram", 1)


def test_increments_are_pure():
    arms = arms_of(3) + [Arm("none", 0)]
    rec = RoundRecord("d01", 1, num_drafted=1, accepted=1, emitted=2, draft_s=0.01, verify_s=0.05, propensity=0.5,
                      per_drafter={"d00": [1.0, 0.0], "d01": [1.0, 1.0], "d02": [0.0]}, features=[1, 0.2], context="x")
    before = rec.to_dict()
    for name in builtins():
        if name in ("confidence",):
            continue
        p = create(name, arms, {})
        assert p.increments(rec) == p.increments(rec), name
        assert rec.to_dict() == before, name


def test_every_builtin_is_registered_and_selects_a_valid_arm():
    arms = [Arm("none", 0), Arm("ngram", 2), Arm("ngram", 4), Arm("model", 3)]
    expected = {"fixed", "hf-heuristic", "epsilon-greedy", "ucb1", "sw-ucb", "thompson", "exp3", "hedge",
                "contextual", "draft-length", "confidence"}
    assert expected <= set(builtins())
    for name in expected:
        p = create(name, arms, {})
        c = p.select(Context(features=(1.0, 0.5)), {}, np.random.default_rng(0))
        assert c.arm in arms + [Arm("none", 0)] and 0 < c.propensity <= 1
    assert create("confidence", arms, {"drafter": "model"}).select(Context(), {}, None).threshold is not None


@pytest.mark.parametrize("name,config,message", [
    ("ucb1", {"c": 1, "bogus": 2}, "unknown option(s) bogus"),
    ("epsilon-greedy", {"epsilon": 0}, "epsilon must be in (0, 1]"),
    ("ucb1", {"reward": "speed"}, "reward must be one of"),
    ("fixed", {"arm": "eagle:3"}, "arm eagle:3 is not among the arms"),
    ("hf-heuristic", {"drafter": "eagle"}, "drafter 'eagle' is not among the arms"),
])
def test_bad_policy_configuration_names_the_problem(name, config, message):
    from draftpick.policies.registry import PolicyError

    with pytest.raises(PolicyError, match=f"policy '{name}': bad configuration: " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        create(name, [Arm("ngram", 2), Arm("none", 0)], config)


def test_censoring_aware_acceptance_estimate_is_unbiased():
    """Positions beyond what a round verified are censored, not rejected: the estimate stays at the truth."""
    from draftpick.policies.types import aggregate, tokens_per_round

    rng = np.random.default_rng(7)
    a, k = 0.8, 6
    recs = []
    for _ in range(4000):
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        per_pos = ([1.0] * accepted + ([0.0] if accepted < k else []))[: rng.integers(1, k + 1)]  # censored
        recs.append(RoundRecord("x", k, k, 0, 1, 0, 1, per_drafter={"x": per_pos}))
    agg = aggregate(recs)
    hazards = [h / r for h, r in zip(agg.hits["x"], agg.reach["x"])]
    assert all(abs(h - a) < 0.03 for h in hazards)
    truth = (1 - a ** (k + 1)) / (1 - a)
    assert tokens_per_round(agg.reach["x"], agg.hits["x"], k) == pytest.approx(truth, rel=0.03)
    naive = np.mean([1 + sum(np.cumprod(r.per_drafter["x"])) for r in recs])  # censored counted as rejected
    assert naive < 0.8 * truth  # what the censoring-aware estimate avoids


def test_contextual_trusts_an_arms_own_measurements_under_a_tag_and_tries_close_contenders():
    """Full-information hazards say ngram:5 beats plain decoding under tag t, but rounds where
    ngram:5 was played there measured fewer tokens per second than plain decoding did: the
    measurements win. ngram:1, never played under t, is tried once (its estimate is close), then
    judged on what it measured."""
    policy = create("contextual", [Arm("none", 0), Arm("ngram", 5), Arm("ngram", 1)],
                    {"scale": 40.0, "prior_seconds": 5.0, "optimism": 0.05})
    at = {str(a): i for i, a in enumerate(policy.arms)}
    stats = {"obs|t": 20.0, "vs|0": 5.0, "vn|0": 100.0, "vs|5": 7.0, "vn|5": 100.0, "vs|1": 6.0, "vn|1": 100.0}
    for j in range(5):  # full information: the n-gram drafter matched 60 % of judged positions
        stats[f"reach|t|ngram|{j}"], stats[f"hit|t|ngram|{j}"] = 100.0, 60.0
    played = {"none:0": (1000.0, 50.0), "ngram:5": (1100.0, 77.0)}  # tokens, seconds when played under t
    for arm, (tokens, seconds) in played.items():
        stats[f"ct|t|{arm}"], stats[f"cs|t|{arm}"], stats[f"cn|t|{arm}"] = tokens, seconds, 100.0
    estimate = policy.tagged("t", {k: v for k, v in stats.items() if not k.startswith(("ct|", "cs|t", "cn|t"))})
    tagged = policy.tagged("t", stats)
    assert estimate[at["ngram:5"]] > estimate[at["none:0"]]  # what full information alone says
    assert tagged[at["ngram:5"]] < tagged[at["none:0"]]  # 14.3 tok/s measured against 20
    ctx, rng = Context(tag="t"), np.random.default_rng(0)
    assert policy.select(ctx, stats, rng).arm == Arm("ngram", 1)  # untried and close: tried once
    stats["ct|t|ngram:1"], stats["cs|t|ngram:1"], stats["cn|t|ngram:1"] = 50.0, 5.0, 50.0  # 10 tok/s measured
    assert policy.select(ctx, stats, rng).arm == Arm("none", 0)


def test_contextual_uses_features_when_requests_carry_no_tag():
    arms = arms_of(3)
    code = Context(features=(1.0, 0.5, 0.8, 0.9, 0.5, 0.0, 0.0))
    chat = Context(features=(1.0, 0.6, 0.1, 0.05, 0.1, 0.0, 0.0))

    def contexts(t, rng):
        from dataclasses import replace

        return replace(code if rng.random() < 0.5 else chat, time=float(t))

    def means(t, ctx):
        return dict(zip(arms, [0.7, 0.3, 0.5] if ctx.features[2] > 0.5 else [0.3, 0.7, 0.5]))

    chosen, regret = run(create("contextual", arms, {"scale": 2.0}), means, 1500, seed=6, contexts=contexts,
                         full_info=True)
    assert regret[1000:].mean() < 0.05  # the best arm of each context, almost always


def test_contextual_learns_lookup_arms_per_feature_region_from_re_run_rounds_alone():
    """Untagged requests of two kinds (told apart by a feature); the n-gram drafter's re-run rounds
    say it gets 3 tokens a round at k = 4 on the first kind and 1.1 on the second. Without ever
    playing it (every round plain decoding, no position counts), `contextual` predicts both and
    picks ngram:4 for the first kind, plain decoding for the second."""
    from dataclasses import replace

    from draftpick.policies.state import add

    arms = [Arm("none", 0), Arm("ngram", 4)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0})
    stats: dict[str, float] = {}
    base = RoundRecord(drafter="none", k=0, num_drafted=0, accepted=0, emitted=1, draft_s=0.0, verify_s=0.01)
    kinds = {(1.0, 1.0): 3.0, (1.0, 0.0): 1.1}  # features (bias, repetition) -> tokens per round at k = 4
    for _ in range(30):
        for features, tpr in kinds.items():
            rounds = [60 / min(tpr, 1 + k * (tpr - 1) / 4) for k in range(1, 5)]
            add(stats, policy.increments(replace(base, features=list(features), rounds=60, emitted=60,
                                                 verify_s=0.6, counterfactual={"ngram": rounds},
                                                 counterfactual_tokens=60.0)))
    ngram = policy.arms.index(Arm("ngram", 4))
    for features, tpr in kinds.items():
        assert policy.linear(features, stats)[ngram] == pytest.approx(tpr, rel=0.05)
    rng = np.random.default_rng(0)
    assert policy.select(Context(features=(1.0, 1.0)), stats, rng).arm == Arm("ngram", 4)
    assert policy.select(Context(features=(1.0, 0.0)), stats, rng).arm == Arm("none", 0)


def test_contextual_predicts_the_tokens_per_round_the_traffic_runs_at_not_the_mean_over_requests():
    """Requests alike in their features, half of them copying (ngram:1 takes 32 rounds for 64
    tokens) and half not (64 rounds): together they run at 128 / 96 = 1.33 tokens a round, which is
    what the throughput depends on. The mean of each request's tokens per round would say 1.5. A
    prediction never passes k + 1 tokens a round, however strong the evidence and its bonus."""
    from dataclasses import replace

    from draftpick.policies.state import add

    arms = [Arm("none", 0), Arm("ngram", 1)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0})
    stats: dict[str, float] = {}
    base = RoundRecord(drafter="none", k=0, num_drafted=0, accepted=0, emitted=64, draft_s=0.0, verify_s=0.6,
                       rounds=64, features=[1.0])
    for _ in range(50):
        for rounds in (32.0, 64.0):
            add(stats, policy.increments(replace(base, counterfactual={"ngram": [rounds]}, counterfactual_tokens=64.0)))
    ngram = policy.arms.index(Arm("ngram", 1))
    assert policy.linear((1.0,), stats)[ngram] == pytest.approx(128 / 96, rel=0.01)
    bold = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 100.0})
    assert bold.linear((1.0,), stats)[ngram] <= 2.0 + 1e-9


def test_contextual_switches_within_a_request_when_its_own_rounds_disagree_with_the_features():
    """Learned: on requests like this one the n-gram drafter gets 1.1 tokens a round and the chat
    head 2 at k = 3, so the request starts on chat:3. Its own first rounds show the head accepting
    two of its three drafts and the n-gram drafter all three tokens each round verified (the request
    copies from its prompt): against `switch_prior` = 2 rounds of the learned estimate one round is
    not evidence enough (round 1), two are (round 2): the policy moves to ngram:3, not to ngram:8,
    whose positions past the third the rounds never judged (three accepted drafts say nothing of the
    eighth; carrying the last acceptance on, the rule before judged ngram:8 at 9 tokens a round).
    Between switch points (round 3) it keeps its own last choice, and at the next one (round 4) it
    moves back if the request's rounds agree with the features again. The prediction from the
    features comes from round 0 (carried in the choice's note), not from the features again; a
    tagged request keeps its arm; with `switch: false` the policy is request level."""
    from dataclasses import replace

    from draftpick.policies.state import add
    from draftpick.policies.types import SoFar

    arms = [Arm("none", 0), Arm("chat", 3), Arm("ngram", 3), Arm("ngram", 8)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "switch_prior": 2.0})
    assert policy.level == "round" and create("contextual", arms, {"switch": False}).level == "request"
    features = (1.0, 0.5)
    stats: dict[str, float] = {}
    learned = RoundRecord(drafter="chat", k=3, num_drafted=3, accepted=1, emitted=2, draft_s=0.0, verify_s=0.01,
                          features=list(features), per_drafter={"chat": [1.0, 0.0], "ngram": [0.1, 0.0]})
    for _ in range(200):
        add(stats, policy.increments(learned))
    rng = np.random.default_rng(0)
    start = policy.select(Context(features=features), stats, rng)
    assert start.arm == Arm("chat", 3) and start.note is not None
    copying = replace(learned, accepted=2, emitted=3, per_drafter={"chat": [1.0, 1.0, 0.0], "ngram": [1.0] * 3})
    so_far = SoFar()
    seen = [copying]
    ctx = Context(features=features, round=1, last=copying, request=so_far.update(seen), previous=start)
    one = policy.select(ctx, stats, rng)
    assert one.arm == Arm("chat", 3)  # round 1: one round is too few
    seen.append(copying)
    ctx = replace(ctx, round=2, request=so_far.update(seen), previous=one)
    assert so_far.record.rounds == 2 and so_far.record.reach["ngram"] == [2.0] * 3
    moved = policy.select(ctx, stats, rng)
    assert moved.arm == Arm("ngram", 3)
    # with a learned estimate worth less than a round, ngram:3 would win at round 1 already
    eager = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "switch_prior": 0.5})
    assert eager.select(replace(ctx, round=1, request=SoFar().update(seen[:1]), previous=start), stats, rng).arm \
        == Arm("ngram", 3)
    # the features' prediction comes with the previous choice: other features change nothing now
    assert moved.note == start.note and policy.select(replace(ctx, features=(1.0, 9.0)), stats, rng) == moved
    assert policy.select(replace(ctx, features=(1.0, 9.0), previous=None), stats, rng).note != start.note
    # round 3 is no switch point: the choice is kept (even against evidence, and where k was cut);
    # at round 4, rounds that agree with the features bring it back
    agree = SoFar().update([learned] * 3)
    assert policy.select(replace(ctx, round=3, request=agree, previous=moved), stats, rng) == moved
    assert policy.select(replace(ctx, round=4, request=agree, previous=moved), stats, rng).arm == Arm("chat", 3)
    tagged = policy.select(replace(ctx, tag="t", previous=None), {**stats, "obs|t": 1.0}, rng)
    assert tagged.arm == Arm("chat", 3)  # tagged: the arm of its last round is kept
    # without the request's rounds (or with rounds that agree with the features) it stays
    assert policy.select(replace(ctx, request=SoFar().update([learned, learned])), stats, rng).arm == Arm("chat", 3)


def test_contextual_does_not_extrapolate_a_request_s_rounds_past_the_positions_they_judged():
    """A request whose rounds (chat:2 played) accepted both of the head's drafts every time says
    nothing about the head's third to eighth positions: the arms that far keep the learned estimate
    (here: the head's acceptance falls to 0 after two positions, so chat:8 emits no more than
    chat:2 and costs more). Weighed by the rounds judged at the first position and carrying the last
    acceptance on (the rule before), chat:8 looked like 9 tokens a round and the policy moved there."""
    from draftpick.policies.state import add
    from draftpick.policies.types import SoFar

    arms = [Arm("none", 0), Arm("chat", 2), Arm("chat", 8)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "switch_prior": 3.0})
    features = (1.0, 0.5)
    stats: dict[str, float] = {}
    learned = RoundRecord(drafter="chat", k=8, num_drafted=8, accepted=2, emitted=3, draft_s=0.001, verify_s=0.01,
                          features=list(features), per_drafter={"chat": [1.0, 1.0, 0.0]})
    for _ in range(200):
        add(stats, policy.increments(learned))
    rng = np.random.default_rng(0)
    start = policy.select(Context(features=features), stats, rng)
    assert start.arm == Arm("chat", 2)
    full = RoundRecord(drafter="chat", k=2, num_drafted=2, accepted=2, emitted=3, draft_s=0.001, verify_s=0.01,
                       features=list(features), per_drafter={"chat": [1.0, 1.0]})
    request = SoFar().update([full] * 8)
    assert request.reach["chat"] == [8.0, 8.0]
    tpr = policy.within_request(np.asarray(start.note), request)
    assert tpr[arms.index(Arm("chat", 8))] == pytest.approx(start.note[arms.index(Arm("chat", 8))])
    assert tpr[arms.index(Arm("chat", 2))] > start.note[arms.index(Arm("chat", 2))] - 1e-9
    ctx = Context(features=features, round=8, last=full, request=request, previous=start)
    assert policy.select(ctx, stats, rng).arm == Arm("chat", 2)


def test_contextual_judges_a_lookup_arm_by_the_request_s_rounds_re_run():
    """Learned: requests like this one save 70 % of their rounds with ngram:8 (3.3 tokens a round)
    and 30 % with ngram:1, so at its costs this one starts on ngram:8. Playing ngram:1 its rounds
    never judge the n-gram drafter's positions past the second, so without the re-run it keeps the
    learned ngram:8 (as a request did at 16 clients, at half that). Its 32 tokens so far re-run
    (Context.rerun) give each arm's share saved on them: shrunk against `rerun_prior` tokens of the
    learned share, ngram:8 falls to 1.86 tokens a round and the policy moves to ngram:1."""
    from dataclasses import replace

    from draftpick.policies.state import add
    from draftpick.policies.types import SoFar

    arms = [Arm("none", 0), Arm("ngram", 1), Arm("ngram", 8)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "rerun_prior": 16.0})
    features = (1.0, 0.5)
    learned_rounds = [64 * (0.7 - 0.4 * (k - 1) / 7) for k in range(1, 9)]  # saves 30 % (k = 1) .. 70 % (k = 8)
    stats: dict[str, float] = {}
    for _ in range(50):
        for arm, verify in ((Arm("none", 0), 0.010), (Arm("ngram", 1), 0.011), (Arm("ngram", 8), 0.016)):
            add(stats, policy.increments(RoundRecord(
                drafter=arm.drafter, k=arm.k, num_drafted=arm.k, accepted=0, emitted=1, draft_s=0.0,
                verify_s=verify, features=list(features), per_drafter={"ngram": [0.0]},
                counterfactual={"ngram": learned_rounds}, counterfactual_tokens=64.0)))
    rng = np.random.default_rng(0)
    start = policy.select(Context(features=features), stats, rng)
    assert start.arm == Arm("ngram", 8)
    played = RoundRecord(drafter="ngram", k=1, num_drafted=1, accepted=1, emitted=2, draft_s=0.0, verify_s=0.011,
                         features=list(features), per_drafter={"ngram": [1.0, 0.0]})
    ctx = Context(features=features, round=4, last=played, request=SoFar().update([played] * 4), previous=start)
    assert policy.select(ctx, stats, rng).arm == Arm("ngram", 8)  # not re-run: the learned estimate stands
    rerun = Rerun({"ngram": [22.0, 21.5, 21.0, 21.0, 21.0, 21.0, 21.0, 21.0]}, 32.0,
                  {"ngram": [22.0, 43.0, 63.0, 84.0, 105.0, 126.0, 147.0, 168.0]})  # k rows a round, as measured
    tpr = policy.within_request(np.asarray(start.note), ctx.request, rerun)
    one, eight = policy.arms.index(Arm("ngram", 1)), policy.arms.index(Arm("ngram", 8))
    for i, k in ((one, 1), (eight, 8)):
        prior_saved = 1 - 1 / start.note[i]
        assert prior_saved == pytest.approx(1 - learned_rounds[k - 1] / 64, abs=1e-3)
        want = (32 * (1 - rerun.rounds["ngram"][k - 1] / 32) + 16 * prior_saved) / (32 + 16)
        assert tpr[i] == pytest.approx(1 / (1 - want))
    assert tpr[eight] == pytest.approx(1.86, abs=0.01)
    assert policy.select(replace(ctx, rerun=lambda: rerun), stats, rng).arm == Arm("ngram", 1)
    assert policy.select(replace(ctx, rerun=lambda: None), stats, rng).arm == Arm("ngram", 8)  # none offered


def test_batch_table_picks_k_by_requests_in_flight_and_checks_its_table():
    arms = [Arm("none", 0)] + [Arm("ngram", k) for k in (1, 2, 3)] + [Arm("model", 3)]
    p = create("batch-table", arms, {"drafter": "ngram", "table": {"1": 3, "4": 1, "12": 0}})
    picks = [p.select(Context(load=n), {}, None).arm for n in (1, 3, 4, 11, 12, 40)]
    assert picks == [Arm("ngram", 3)] * 2 + [Arm("ngram", 1)] * 2 + [Arm("none", 0)] * 2
    assert create("batch-table", arms, {"drafter": "model", "table": {1: 3, 8: 0}}).select(Context(load=2), {}, None).arm == Arm("model", 3)
    with pytest.raises(ValueError, match="ngram:5"):
        create("batch-table", arms, {"drafter": "ngram", "table": {1: 5}})
    with pytest.raises(ValueError, match="start at 1"):
        create("batch-table", arms, {"table": {2: 1}})
    with pytest.raises(ValueError, match="table must map"):
        create("batch-table", arms, {"table": {"one": "x"}})


def _batched_rounds(batch: int, k: int, verify_s: float, n: int = 40) -> list[RoundRecord]:
    """Rounds of ngram:k (or plain) at one batch size: ngram's drafts accepted at the first two
    positions out of three (about 1.7 tokens per round at k = 3), verify seconds as measured there."""
    drafter = "ngram" if k else "none"
    return [RoundRecord(drafter, k, num_drafted=k, accepted=min(k, 1), emitted=min(k, 1) + 1, draft_s=0.0,
                        verify_s=verify_s, per_drafter={"ngram": [1.0, 1.0, 0.0] if i % 2 else [1.0, 0.0]},
                        features=[1.0], batch=batch) for i in range(n)]


@pytest.mark.parametrize("name", ["contextual", "hedge"])
def test_learned_policies_draft_alone_and_stop_drafting_in_a_full_batch(name):
    """Costs as batched verification makes them (policies.costs): alone a k = 3 round costs 1.2 plain
    rounds, in a batch of 16 (its share of the forward: a / 16 + b rows) about 3; speculation that pays alone
    does not there. The policy learns the costs per load level and picks k accordingly."""
    from draftpick.policies.costs import load_level
    from draftpick.policies.state import add

    assert [load_level(b) for b in (1, 2, 3, 4, 7, 8, 16, 33)] == [0, 1, 1, 2, 2, 3, 4, 5]
    arms = [Arm("none", 0), Arm("ngram", 3)]
    p = create(name, arms, {"floor": 0.0} if name == "hedge" else {})
    stats: dict = {}
    for rec in (_batched_rounds(1, 0, 0.050) + _batched_rounds(1, 3, 0.060)
                + _batched_rounds(16, 0, 0.010) + _batched_rounds(16, 3, 0.030)):
        add(stats, p.increments(rec))
    rng = np.random.default_rng(0)
    alone = [p.select(Context(features=(1.0,), load=1), stats, rng).arm for _ in range(20)]
    full = [p.select(Context(features=(1.0,), load=16), stats, rng).arm for _ in range(20)]
    assert alone.count(Arm("ngram", 3)) >= 18 and full.count(Arm("none", 0)) >= 18


def _head_and_ngram_rounds(a: float, b: float) -> list[RoundRecord]:
    """Rounds in a batch of 16: a head's k = 2 (2.5 tokens a round) drafting alone and in groups of 8,
    a drafted token costing a / m + b seconds in a group of m; ngram's k = 1 (1.5 tokens a round),
    drafting for free."""
    out = []
    for group in (1, 8):
        for i in range(40):
            hits = [1.0, 1.0] if i % 2 else [1.0, 0.0]
            out.append(RoundRecord("head", 2, num_drafted=2, accepted=int(sum(hits)), emitted=int(sum(hits)) + 1,
                                   draft_s=2 * (a / group + b), verify_s=0.030, per_drafter={"head": hits},
                                   features=[1.0], batch=16, draft_group=group))
    for i in range(80):
        hit = float(i % 2)
        out.append(RoundRecord("ngram", 1, num_drafted=1, accepted=int(hit), emitted=int(hit) + 1, draft_s=0.0,
                               verify_s=0.024, per_drafter={"ngram": [hit]}, features=[1.0], batch=16))
    return out


def test_a_drafter_that_drafts_requests_together_costs_what_the_group_it_would_join_makes_it():
    """A head drafts the rounds of several requests in one call, its seconds shared by their tokens
    (RoundRecord.draft_group), so a drafted token costs a / m + b in a group of m. policies.costs fits
    that line, and prices a head's round at the group it would join now (Context.drafting): alone, the
    head's 2.5 tokens a round at 57 ms lose to ngram's 1.5 at 24 ms (and to plain decoding's 1 at
    about 18 ms); with 7 others drafting on it (36 ms) they win. A mean over the rounds measured
    would price it the same either way."""
    from draftpick.policies.costs import draft_rate, round_costs
    from draftpick.policies.state import add

    a, b = 0.012, 0.0015
    arms = [Arm("none", 0), Arm("ngram", 1), Arm("head", 2)]
    for name in ("contextual", "hedge"):
        p = create(name, arms, {"floor": 0.0} if name == "hedge" else {})
        stats: dict = {}
        for rec in _head_and_ngram_rounds(a, b):
            add(stats, p.increments(rec))
        assert draft_rate(stats, "head", 0) == pytest.approx(a + b) and draft_rate(stats, "ngram", 0) is None
        assert draft_rate(stats, "head", 7) == pytest.approx(a / 8 + b)
        alone = round_costs(stats, p.arms, load=16)
        shared = round_costs(stats, p.arms, load=16, drafting={"head": 7, "ngram": 3})
        head, ngram = p.arms.index(Arm("head", 2)), p.arms.index(Arm("ngram", 1))
        assert alone[head] - shared[head] == pytest.approx(2 * (a - a / 8)) and alone[ngram] == shared[ngram]
        if name == "hedge":  # random draws weighted by its estimates: their best arm flips
            best = [p.arms[int(np.argmax(p.estimates(stats, 16, d)))] for d in ({}, {"head": 7})]
        else:
            best = [p.select(Context(features=(1.0,), load=16, drafting=d), stats, None).arm for d in ({}, {"head": 7})]
        assert best == [Arm("ngram", 1), Arm("head", 2)], name


def test_a_drafter_never_seen_drafting_is_priced_like_the_dearest_seen():
    """Before its first round, a drafter's drafting has no measured cost. Priced at 0, an unmeasured
    head looked free and was tried in a full batch, where it drafts alone at a head's price; it is
    now priced per token like the dearest drafter seen (here the chat head, 3 ms a token, beside
    n-gram's 0), until its own rounds are measured."""
    from draftpick.policies.costs import round_costs
    from draftpick.policies.state import add

    arms = [Arm("ngram", 2), Arm("chat", 2), Arm("code", 2)]
    p = create("contextual", arms, {})
    stats: dict = {}
    for drafter, draft_s in (("chat", 0.006), ("ngram", 0.0)):
        for _ in range(40):
            add(stats, p.increments(RoundRecord(drafter, 2, num_drafted=2, accepted=1, emitted=2, draft_s=draft_s,
                                                verify_s=0.010, per_drafter={drafter: [1.0, 0.0]}, features=[1.0],
                                                batch=16)))
    cost = dict(zip(p.arms, round_costs(stats, p.arms, load=16)))
    assert cost[Arm("code", 2)] == pytest.approx(cost[Arm("chat", 2)], rel=0.01)
    assert cost[Arm("code", 2)] - cost[Arm("ngram", 2)] == pytest.approx(2 * 0.003, rel=0.01)


LINEAR_ROUNDS = tuple((arm, rows, 6 + 2 * rows) for arm, rows in ((Arm("none", 0), 0), (Arm("ngram", 1), 1),
                                                                  (Arm("ngram", 3), 3)))


def _rounds_at_16(policy, features, rounds=LINEAR_ROUNDS, **counterfactual) -> dict[str, float]:
    """The policy's statistics after 100 times `rounds` at 16 in flight, each (arm, rows drafted, verify
    ms) accepting nothing (by default none:0, ngram:1 and ngram:3 drafting 0, 1 and 3 rows at 6 ms + 2 ms
    a row); each round carries the given counterfactual of a 64-token request."""
    from draftpick.policies.state import add

    stats: dict[str, float] = {}
    for _ in range(100):
        for arm, rows, ms in rounds:
            add(stats, policy.increments(RoundRecord(
                drafter=arm.drafter, k=arm.k, num_drafted=rows, accepted=0, emitted=1, draft_s=0.0,
                verify_s=ms / 1000, features=list(features), per_drafter={"ngram": [0.0]}, batch=16,
                counterfactual_tokens=64.0, **counterfactual)))
    return stats


def test_a_lookup_arm_is_priced_at_the_rows_it_drafts_for_the_request():
    """A lookup drafter drafts only where the request matches, so ngram:1's round on a request that
    rarely copies costs about a plain round. Rounds at 16 in flight cost 6 ms + 2 ms a drafted row;
    ngram:1 was measured where it drafted every round (8 ms), saving 20 % of the rounds: at that price
    a request starts on plain decoding. Its 32 tokens so far re-run say ngram:1 saves 19 % of its
    rounds drafting 8 rows in 26 rounds: priced at those rows (policies.costs.row_line, shrunk by the
    tokens so far against `rerun_prior`) it moves to ngram:1. Re-run rounds that drafted every round
    leave it on plain decoding (as at 16 clients, where a third of the learned rounds went to plain
    decoding, docs/results.md)."""
    from dataclasses import replace

    from draftpick.policies.costs import round_costs, row_line
    from draftpick.policies.types import SoFar

    arms = [Arm("none", 0), Arm("ngram", 1), Arm("ngram", 3)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "rerun_prior": 16.0})
    features = (1.0,)
    stats = _rounds_at_16(policy, features, counterfactual={"ngram": [51.2, 50.0, 49.6]})
    assert row_line(stats, "L|4") == pytest.approx((0.006, 0.002))
    rng = np.random.default_rng(0)
    start = policy.select(Context(features=features, load=16), stats, rng)
    assert start.arm == Arm("none", 0)
    played = RoundRecord(drafter="none", k=0, num_drafted=0, accepted=0, emitted=1, draft_s=0.0, verify_s=0.006,
                         features=list(features), per_drafter={"ngram": [0.0]}, batch=16)
    ctx = Context(features=features, load=16, round=4, last=played, request=SoFar().update([played] * 4),
                  previous=start)
    rare = Rerun({"ngram": [26.0, 25.5, 25.5]}, 32.0, {"ngram": [8.0, 14.0, 26.0]})
    every = Rerun(rare.rounds, 32.0, {"ngram": [26.0, 51.0, 76.5]})
    one = policy.arms.index(Arm("ngram", 1))
    w = 32 / (32 + 16)
    plain = round_costs(stats, policy.arms, 5.0, load=16)
    priced = round_costs(stats, policy.arms, 5.0, load=16, rows=policy.rerun_rows(rare))
    assert priced[one] == pytest.approx((1 - w) * plain[one] + w * (0.006 + 0.002 * 8 / 26))
    assert plain[one] == pytest.approx(0.008, rel=0.01)
    assert policy.select(replace(ctx, rerun=lambda: rare), stats, rng).arm == Arm("ngram", 1)
    assert policy.select(replace(ctx, rerun=lambda: every), stats, rng).arm == Arm("none", 0)


def test_a_lookup_arm_is_priced_at_what_rounds_of_its_rows_cost():
    """At 16 in flight a round costs 8 ms, 10 ms with 1 drafted row, 12 ms with 2, but 36 ms with 8 (a row
    costs more while long drafts are played): a line in rows over those rounds prices a row near 3.6 ms.
    A request whose re-run says ngram:1 drafts 1 row in half its rounds and saves 5 rounds in 32: at the
    line's price ngram:1 loses to plain decoding, at what its one-row rounds cost (2 ms more) it wins;
    ngram:8, drafting 8 rows in a fifth of its rounds, is priced at a fifth of the 8-row rounds' 28 ms
    more."""
    from draftpick.policies.costs import round_costs, row_line

    arms = [Arm("none", 0), Arm("ngram", 1), Arm("ngram", 8)]
    policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0, "rerun_prior": 16.0})
    features = (1.0,)
    stats = _rounds_at_16(policy, features, rounds=((Arm("none", 0), 0, 8), (Arm("ngram", 1), 1, 10),
                                                    (Arm("ngram", 1), 0, 8), (Arm("ngram", 8), 2, 12),
                                                    (Arm("ngram", 8), 8, 36)))
    c, r = row_line(stats, "L|4")
    assert r > 0.0035  # the line: 3.6 ms a row
    plain, one, eight = (policy.arms.index(a) for a in arms)
    rerun = Rerun({"ngram": [27.0] + [30.0] * 7}, 32.0, {"ngram": [13.5] + [48.0] * 7})  # 1 row a 2nd round; 8 a 5th
    rows = policy.rerun_rows(rerun)
    prior = 5.0
    costs = round_costs(stats, policy.arms, prior, load=16, rows={i: (x, 1.0) for i, (x, _) in rows.items()})
    c0 = (0.8 + 0.8 + prior * c) / (200 + prior)  # the 0-row rounds, shrunk toward the line
    c8 = (3.6 + prior * (c + 8 * r)) / (100 + prior)
    assert costs[plain] == pytest.approx(c0)
    assert costs[one] == pytest.approx(c0 + 0.5 * ((1.0 + prior * (c + r)) / (100 + prior) - c0))
    assert costs[one] - costs[plain] == pytest.approx(0.001, rel=0.05)  # half of its rounds at 2 ms more
    assert costs[eight] == pytest.approx(c0 + (c8 - c0) * 1.6 / 8)
    tpr = 32 / 27
    assert tpr / (c0 + r * 0.5) < 1 / c0 < tpr / costs[one]  # the line sent it to plain decoding, this does not


def test_a_lookup_arm_is_priced_at_the_rows_its_savings_imply():
    """A lookup drafter drafts only where the request matches, so its rows go with the rounds it saves:
    an arm drafts about 1 / (its acceptance where it drafts) rows per round saved, whatever the request.
    Rounds at 16 in flight cost 6 ms + 2 ms a drafted row; ngram:1 was measured drafting every round
    (8 ms) and is predicted to save 4 of 64 rounds. Priced at its measured rounds it loses to plain
    decoding (1.07 / 8 ms against 1 / 6 ms); priced at the rows its savings imply (2 rows a round saved:
    0.13 rows a round, 6.27 ms) it wins, as it should wherever a saved round (6 ms) is worth more than
    the rows drafted for it. Drafting 4 rows a round saved (8 ms of rows for 6 ms saved), it loses."""
    from draftpick.policies.costs import round_costs

    arms = [Arm("none", 0), Arm("ngram", 1), Arm("ngram", 3)]
    features = (1.0,)
    for per_saved, wins in ((2.0, True), (4.0, False)):
        policy = create("contextual", arms, {"alpha": 0.0, "cf_alpha": 0.0})
        one, plain = policy.arms.index(Arm("ngram", 1)), policy.arms.index(Arm("none", 0))
        stats = _rounds_at_16(policy, features, counterfactual={"ngram": [60.0, 59.0, 58.0]},
                              counterfactual_drafted={"ngram": [4.0 * per_saved, 10.0, 30.0]})
        assert policy.drafted_per_saved(stats)[one] == pytest.approx(per_saved)
        tpr = policy.linear(features, stats)
        assert tpr[one] == pytest.approx(64 / 60, rel=0.01)
        measured = round_costs(stats, policy.arms, 5.0, load=16)
        assert tpr[one] / measured[one] < 1 / measured[plain]  # at its measured price ngram:1 loses
        priced = round_costs(stats, policy.arms, 5.0, load=16, rows=policy.lookup_rows(tpr, None, stats))
        assert priced[one] == pytest.approx(0.006 + 0.002 * per_saved * (tpr[one] - 1))
        assert priced[plain] == pytest.approx(0.006)  # plain decoding: the same line, no rows
        chosen = policy.select(Context(features=features, load=16), stats, np.random.default_rng(0)).arm
        assert chosen == (Arm("ngram", 1) if wins else Arm("none", 0)), per_saved
