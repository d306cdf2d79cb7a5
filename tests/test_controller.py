"""The live controller against real redis-server processes: exactly-once folding, claims of a dead
consumer's entries, persistence, shared state, outages, bad records, the embedded server."""
import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import redis

from draftpick.controller.controller import Controller
from draftpick.controller.redis_server import EmbeddedRedis, RedisUnavailable, connect, free_port
from draftpick.controller.store import GROUP
from draftpick.policies import Arm, Context, RoundRecord
from draftpick.policies.registry import create
from draftpick.policies.types import aggregate

ARMS = [Arm("none", 0)] + [Arm(d, k) for d in ("ngram", "chat") for k in (1, 2, 3)]


def record(drafter="ngram", k=3, drafted=3, accepted=2, seconds=0.05, context="", **kw):
    return RoundRecord(drafter=drafter, k=k if drafter != "none" else 0, num_drafted=drafted if drafter != "none" else 0,
                       accepted=accepted if drafter != "none" else 0,
                       emitted=(accepted if drafter != "none" else 0) + 1, draft_s=0.001, verify_s=seconds,
                       per_drafter={"ngram": [1.0, 1.0, 0.0], "chat": [1.0, 0.0]}, context=context, **kw)


def request(n=4, **kw):
    return SimpleNamespace(records=[record(**kw) for _ in range(n)], context=kw.get("context", ""), tenant="")


def controller(client, policy="hedge", options=None, consumer=None, description=None):
    pol = create(policy, ARMS, options or {})
    desc = description or {"schema": 1, "test": "controller", "policy": policy, "options": options or {}}
    return Controller(client, pol, desc, {"ngram", "chat"}, max_k=8, consumer=consumer, seed=0)


@pytest.fixture
def client(redis_server):
    redis_server.flushall()
    return redis_server


def stats_of(c):
    from draftpick.policies.state import decode

    return decode(c.client.hgetall(c.keys.stats))


def test_feedback_is_folded_exactly_once_into_what_replay_would_fold(client):
    c = controller(client)
    sink = c.sink()
    reqs = [request(accepted=a) for a in (0, 1, 2, 3, 2)]
    for r in reqs:
        sink(r)
    assert sink.flush(10)
    assert c.fold_pending() == 5
    want = {}
    for r in reqs:  # replay folds one aggregated record per request into a plain dict
        for k, v in c.policy.increments(aggregate(r.records)).items():
            want[k] = want.get(k, 0.0) + v
    got = stats_of(c)
    assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)
    assert c.fold_pending() == 0  # nothing left, nothing folded twice
    totals = c.stats()["totals"]
    assert totals["requests"] == 5 and totals["rounds"] == 20 and totals["accepted_tokens"] == 4 * 8
    assert client.xlen(c.keys.feedback) == 0  # acknowledged entries are trimmed
    sink.close()


def test_a_dead_consumers_entry_is_claimed_and_folded_once(client):
    a, b = controller(client, consumer="a"), controller(client, consumer="b")
    sink = a.sink()
    sink(request())
    sink.flush(10)
    # a reads the entry and dies before folding it: it stays pending under a
    (_, entries), = client.xreadgroup(GROUP, "a", {a.keys.feedback: ">"}, count=10)
    assert client.xpending(a.keys.feedback, GROUP)["pending"] == 1
    assert b.fold_pending(min_idle_ms=0) == 1  # b claims it (XAUTOCLAIM) and folds it
    before = stats_of(b)
    entry_id, fields = entries[0]
    assert a.fold(entry_id.decode(), fields[b"data"]) is False  # a, back late: the done mark stops a second fold
    assert stats_of(b) == before and b.stats()["totals"]["requests"] == 1
    assert client.xpending(a.keys.feedback, GROUP)["pending"] == 0
    sink.close()


def test_two_controllers_share_one_learned_state_and_namespaces_separate(client):
    a, b = controller(client, consumer="a"), controller(client, consumer="b")
    sink = a.sink()
    for _ in range(3):
        sink(request())
    sink.flush(10)
    a.fold_pending()
    assert b.stats()["totals"]["requests"] == 3 and b.snapshot() == a.snapshot() != {}
    other = controller(client, options={"floor": 0.2})  # another policy configuration: another namespace
    assert other.keys.prefix != a.keys.prefix and other.stats()["totals"]["requests"] == 0
    sink.close()


def test_bad_records_are_rejected_and_counted_never_folded(client):
    c = controller(client)
    sink = c.sink()
    cf = {"counterfactual": {"ngram": [3.0, 2.0]}, "counterfactual_tokens": 4.0}
    good = request(**cf, counterfactual_drafted={"ngram": [2.0, 4.0]})
    bad = [request(drafter="eagle"), request(seconds=float("nan")), request(accepted=5),
           request(context="no spaces allowed"), request(draft_group=0),
           request(**cf, counterfactual_drafted={"ngram": [5.0]}),  # more rows than k x tokens
           request(counterfactual_drafted={"ngram": [1.0]})]  # rows without their rounds
    for r in bad + [good]:
        sink(r)
    sink(SimpleNamespace(records=[], context="", tenant=""))  # nothing to learn: the sink does not append it
    sink.put("not json")
    sink.put(json.dumps({"records": [], "context": "", "tenant": ""}))  # nor would the controller fold it
    sink.flush(10)
    assert c.fold_pending() == len(bad) + 3
    s = c.stats()["totals"]
    assert s["rejected_records"] == len(bad) + 2 and s["requests"] == 1


def test_stats_show_each_context_and_arm(client):
    c = controller(client)
    sink = c.sink()
    sink(request(context="code", accepted=3, seconds=0.1))
    sink(request(drafter="none", context=""))
    sink.flush(10)
    c.fold_pending()
    out = c.stats()
    rows = {(a["context"], a["drafter"], a["k"]): a for a in out["arms"]}
    assert rows[("code", "ngram", 3)]["rounds"] == 4 and rows[("code", "ngram", 3)]["mean_acceptance_length"] == 4.0
    assert rows[("", "none", 0)]["mean_acceptance_length"] == 1.0
    assert rows[("code", "ngram", 3)]["tokens_per_s"] == pytest.approx(4 / 0.101)
    assert out["totals"]["rounds"] == sum(a["rounds"] for a in out["arms"])
    c.reset()
    assert c.stats()["totals"]["requests"] == 0 and c.stats()["arms"] == []


def test_decisions_follow_the_learned_state_and_go_on_when_redis_is_down(tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    c = controller(client, policy="ucb1")
    sink = c.sink()
    for _ in range(30):  # chat:2 is fast, everything else slow
        for arm in ARMS:
            fast = arm == Arm("chat", 2)
            sink(SimpleNamespace(records=[record(arm.drafter, arm.k, drafted=arm.k, accepted=arm.k if fast else 0,
                                                 seconds=0.01 if fast else 0.2)], context="", tenant=""))
    sink.flush(20)
    c.fold_pending()
    assert c.decide(Context()).arm == Arm("chat", 2)
    server.stop()  # Redis down: decisions continue from the last statistics, feedback stays buffered
    c.refresh_s = 0
    assert c.decide(Context()).arm == Arm("chat", 2) and c.redis_error
    sink(request())
    assert not sink.flush(1.0) and sink.status()["buffered"] == 1
    assert c.status()["redis"].startswith("down")
    server.port, server.proc = server.port, None
    server.start()  # back, from its append-only file: nothing lost
    assert sink.flush(20)
    assert c.fold_pending() == 1 and c.stats()["totals"]["requests"] == 30 * len(ARMS) + 1
    sink.close()
    server.stop()


def test_state_survives_a_killed_redis_and_a_restarted_controller(tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    client = redis.Redis.from_url(server.url)
    c = controller(client)
    sink = c.sink()
    for _ in range(4):
        sink(request())
    sink.flush(10)
    c.fold_pending()
    want = stats_of(c)
    os.kill(server.proc.pid, signal.SIGKILL)  # appendfsync always: every acknowledged write is on disk
    server.proc.wait()
    server.stop()
    server2 = EmbeddedRedis(tmp_path / "r").start()
    again = controller(redis.Redis.from_url(server2.url))  # a new controller process, same namespace
    assert stats_of(again) == want and again.stats()["totals"]["requests"] == 4
    sink.close()
    server2.stop()


def test_the_embedded_server_locks_its_directory_and_stops(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as server:
        with pytest.raises(RedisUnavailable, match="another draftpick Redis server uses"):
            EmbeddedRedis(tmp_path / "r").start()
        pid = server.proc.pid
        assert redis.Redis.from_url(server.url).config_get("appendfsync")["appendfsync"] == "always"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    EmbeddedRedis(tmp_path / "r").start().stop()  # unlocked again


def test_a_missing_redis_server_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisUnavailable, match="apt-get install redis-server"):
        EmbeddedRedis(tmp_path / "r").start()


def test_redis_url_with_a_password(tmp_path, monkeypatch):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret",
                             "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                redis.Redis(port=port, password="s3cret").ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        monkeypatch.setenv("REDIS_URL", f"redis://:s3cret@127.0.0.1:{port}/0")
        client, server = connect()
        assert server is None and client.ping()
        monkeypatch.setenv("REDIS_URL", f"redis://:wrong@127.0.0.1:{port}/0")
        with pytest.raises(RedisUnavailable, match=r"redis://\*\*\*@127.0.0.1"):
            connect()
    finally:
        proc.terminate()
        proc.wait()


def test_a_plugin_policy_learns_live_exactly_as_in_replay(client, monkeypatch):
    """The README's plug-in, by dotted path: the same records give the same statistics folded by the
    controller as by replay's fold."""
    from pathlib import Path

    from draftpick.policies.state import add

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    c = controller(client, policy="greedy_mean:GreedyMean")
    sink = c.sink()
    reqs = [request(accepted=a % 4, seconds=0.01 * (1 + a)) for a in range(12)]
    offline: dict = {}
    for r in reqs:
        sink(r)
        add(offline, c.policy.increments(aggregate(r.records)))
    sink.flush(10)
    c.fold_pending()
    live = stats_of(c)
    assert set(live) == set(offline) and all(live[k] == pytest.approx(offline[k], rel=1e-12) for k in offline)
    assert json.loads(client.hget(c.keys.meta, "description"))["policy"] == "greedy_mean:GreedyMean"


@pytest.fixture(scope="module")
def tiny_setup(target, tok, tmp_path_factory):
    """A config on disk: the tiny target, n-gram, a close model drafter and a feature head."""
    import yaml

    from tiny import feature_drafter, save_models

    root = tmp_path_factory.mktemp("learn")
    save_models(root, target, tok)
    feature_drafter(target, tok, root / "feat", steps=50)
    cfg = {"target": {"name": "tiny", "path": str(root / "target")},
           "drafters": [{"type": "ngram"}, {"type": "model", "name": "close", "path": str(root / "close")},
                        {"type": "feature", "name": "feat", "path": str(root / "feat")}],
           "engine": {"device": "cpu"}, "policy": {"name": "contextual", "ks": [1, 3]}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (root / "p.jsonl").write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "def add(a, b):\n", "id": 1}, {"prompt": "the cat sat", "tag": "chat", "id": 2}]))
    return root


def test_fingerprints_are_stable_across_loads_and_change_with_the_weights(tiny_setup):
    from draftpick.controller.controller import describe
    from draftpick.workers.config import load_config
    from draftpick.workers.factory import build_engine

    cfg = load_config(tiny_setup / "cfg.yaml")
    a, b = describe(cfg, build_engine(cfg)), describe(cfg, build_engine(cfg))
    assert a == b
    other = cfg.model_copy(update={"drafters": [d.model_copy(update={"path": str(tiny_setup / "target")})
                                                if d.name == "close" else d for d in cfg.drafters]})
    c = describe(other, build_engine(other))
    assert c["drafters"]["close"]["fingerprint"] != a["drafters"]["close"]["fingerprint"]
    assert c["drafters"]["feat"] == a["drafters"]["feat"] and c["target"] == a["target"]


def test_generate_without_a_pinned_arm_learns_and_stats_show_it(tiny_setup, client, monkeypatch, capsys):
    """Each run decides with the policy over the learned state, feeds its rounds back and folds them
    before it exits; `stats` then counts them (rounds = the sum of num_spec_steps)."""
    from draftpick.deploy.cli import main

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0")
    base = ["--config", str(tiny_setup / "cfg.yaml")]
    steps = 0
    for _ in range(2):
        assert main(["generate", *base, "--prompts", str(tiny_setup / "p.jsonl"), "--max-tokens", "20", "--json"]) == 0
        outs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [o["id"] for o in outs] == [1, 2] and all(o["draftpick"]["policy"] == "contextual" for o in outs)
        assert outs[1]["draftpick"]["context"] == "chat"
        steps += sum(o["metrics"]["speculative_decoding"]["num_spec_steps"] for o in outs)
    assert main(["stats", *base, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["totals"]["requests"] == 4 and stats["totals"]["rounds"] == steps
    assert {a["context"] for a in stats["arms"]} == {"", "chat"}
    assert main(["stats", *base, "--reset", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["requests"] == 0
    # a pinned arm is served as before, without Redis
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["generate", *base, "--prompt", "ab", "--drafter", "ngram", "--json"]) == 0
    assert "draftpick" not in json.loads(capsys.readouterr().out)
    assert main(["generate", *base, "--prompt", "ab", "--json"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_loopback():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_controller_actor_decides_folds_restarts_and_workers_fall_back(ray_loopback, client):
    """Named and detached in the `draftpick` namespace; restarted by Ray after a crash with its state
    from Redis; when it is gone, a worker's DecisionClient decides with the same policy itself."""
    import ray

    from draftpick.controller.actor import NAME, NAMESPACE, DecisionClient, start_controller, stop_controller
    from draftpick.workers.config import DraftpickConfig

    cfg = DraftpickConfig.model_validate({"target": {"name": "t", "path": "unused"},
                                          "drafters": [{"type": "ngram"}, {"type": "ngram", "name": "chat"}],
                                          "policy": {"name": "ucb1", "ks": [1, 2, 3]}})
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    desc = {"schema": 1, "test": "actor"}
    actor = start_controller(cfg, desc, url)
    worker = DecisionClient(cfg, desc, url, timeout_s=5)
    assert ray.get_actor(NAME, namespace=NAMESPACE)._actor_id == actor._actor_id
    sink = worker.local.sink()
    for arm in cfg.arms():
        fast = arm == Arm("chat", 2)
        sink(SimpleNamespace(records=[record(arm.drafter, arm.k, drafted=arm.k, accepted=arm.k if fast else 0,
                                             seconds=0.01 if fast else 0.2)], context="", tenant=""))
    sink.flush(10)
    deadline = time.monotonic() + 20
    while ray.get(actor.stats.remote())["totals"]["requests"] < len(cfg.arms()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(actor.stats.remote())["totals"]["requests"] == len(cfg.arms())  # folded in the background
    plan = worker.decide(Context())
    assert worker.fallbacks == 0 and plan.arm == worker.local.decide(Context()).arm
    assert asyncio.run(worker.decide_async(Context())).arm == plan.arm and worker.fallbacks == 0  # the worker's path
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts it, and it resumes from Redis
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            assert ray.get(actor.stats.remote(), timeout=5)["totals"]["requests"] == len(cfg.arms())
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    else:
        pytest.fail("the controller actor was not restarted")
    assert stop_controller()
    plan = worker.decide(Context())  # gone: the worker decides itself, with the same policy and state
    assert worker.fallbacks == 1 and plan.arm == worker.local.decide(Context()).arm
    assert asyncio.run(worker.decide_async(Context())).arm == plan.arm and worker.fallbacks == 2
    assert worker.status()["controller"].startswith("down")
    sink.close()


def test_a_learning_worker_decides_through_the_controller_and_feeds_back(ray_loopback, client, tiny_setup):
    """The worker actor with a Redis URL: requests without an arm are decided by the controller
    actor, their rounds reach the stream, and the actor folds them."""
    import ray

    from draftpick.controller.actor import start_controller, stop_controller
    from draftpick.workers.actor import GenerateRequest, worker_actor
    from draftpick.workers.config import load_config
    from draftpick.workers.sampling import SamplingParams

    cfg = load_config(tiny_setup / "cfg.yaml")
    cfg = cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"num_cpus": 1, "torch_threads": 1})})
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    worker = worker_actor(cfg, url)
    desc = ray.get(worker.__ray_call__.remote(lambda w: w.description))
    controller = start_controller(cfg, desc, url)
    try:
        outs = ray.get([worker.generate.remote(GenerateRequest([3, 4, 5, 3, 4], SamplingParams(max_tokens=12), None,
                                                               context=c)) for c in ("", "code", "code")])
        assert all(o["plan"]["policy"] == "contextual" for o in outs)
        steps = sum(o["result"]["metrics"]["speculative_decoding"]["num_spec_steps"] for o in outs)
        deadline = time.monotonic() + 20
        while ray.get(controller.stats.remote())["totals"]["requests"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        totals = ray.get(controller.stats.remote())["totals"]
        assert totals["requests"] == 3 and totals["rounds"] == steps
        assert ray.get(worker.info.remote())["feedback"]["appended"] == 3
    finally:
        stop_controller()
        ray.kill(worker)


def contextual_after_one_request(client):
    """A `contextual` controller whose statistics hold one folded request (features 1.0, 0.5)."""
    c = controller(client, "contextual")
    sink = c.sink()
    sink(request(6, features=[1.0, 0.5]))
    assert sink.flush(10) and c.fold_pending() == 1
    sink.close()
    return c


def test_a_round_level_plan_chooses_each_round_from_the_requests_rounds_so_far(client, monkeypatch):
    """`contextual` is round level: the engine's chooser asks it before every round with the
    request's rounds so far (aggregated), the load now and the other requests drafting with each
    drafter, over the controller's latest snapshot of the statistics when the round comes: a
    request folded while this one runs changes its later choices."""
    c = contextual_after_one_request(client)
    ctx = Context(features=(1.0, 0.5))
    plan = c.decide(ctx)
    assert plan.level == "round"
    rounds = [record(drafter="chat", k=3, features=[1.0, 0.5]), record(drafter="chat", k=3, features=[1.0, 0.5])]
    g = SimpleNamespace(records=rounds, load=lambda: 3, co_drafting=lambda: {"chat": 2}, rerun=lambda: None)
    want = c.policy.select(Context(features=(1.0, 0.5), round=2, last=rounds[-1], request=aggregate(rounds), load=3,
                                   drafting={"chat": 2}), stats_of(c), None)
    seen = []
    select = c.policy.select
    monkeypatch.setattr(c.policy, "select", lambda context, stats, *a: seen.append((context.drafting, stats))
                        or select(context, stats, *a))
    choose = c.chooser(plan, ctx)
    assert choose(g) == want
    assert seen == [({"chat": 2}, stats_of(c))]
    # the next round is asked with the chooser's previous choice (its note carries the features'
    # prediction) and the round as played, k cut by the engine (to fit the batch or the tokens left);
    # round 3 is no switch point: the arm chosen at round 2 is kept, its k uncut
    cut = record(drafter=want.arm.drafter, k=1, drafted=1, accepted=1, features=[1.0, 0.5])
    played = rounds + [cut]
    then = c.policy.select(Context(features=(1.0, 0.5), round=3, last=cut, request=aggregate(played), load=3,
                                   previous=want), stats_of(c), None)
    g = SimpleNamespace(records=played, load=lambda: 3, co_drafting=dict, rerun=lambda: None)
    assert want.note is not None and choose(g) == then
    assert then.arm == want.arm and want.arm.k > 1
    # another request folded, and a decision (or a new request's chooser) reads the statistics again:
    # this request's next round chooses from them
    before = stats_of(c)
    sink = c.sink()
    sink(request(6, features=[1.0, 0.5]))
    assert sink.flush(10) and c.fold_pending() == 1
    sink.close()
    c.decide(ctx)
    assert stats_of(c) != before
    choose(SimpleNamespace(records=played + [cut], load=lambda: 3, co_drafting=dict, rerun=lambda: None))
    assert seen[-1][1] == stats_of(c)


def test_a_round_level_plan_carries_its_prediction_to_the_workers_first_round(client, monkeypatch):
    """The decision's prediction from the features (its note) comes with the plan, so the worker's
    chooser does not run the regressions again before the request's first round (on the engine
    thread, every step waits for it), and chooses there as the decision did."""
    c = contextual_after_one_request(client)
    ctx = Context(features=(1.0, 0.5))
    plan = c.decide(ctx)
    assert plan.note is not None
    calls = []
    linear = c.policy.linear
    monkeypatch.setattr(c.policy, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    choose = c.chooser(plan, ctx)
    first = choose(SimpleNamespace(records=[], load=lambda: 1, co_drafting=dict, rerun=lambda: None))
    assert calls == [] and first.arm == plan.arm and first.note == plan.note
    # a plan without a note (as an older controller sends) still chooses, running the regressions
    bare = c.chooser(replace(plan, note=None), ctx)(
        SimpleNamespace(records=[], load=lambda: 1, co_drafting=dict, rerun=lambda: None))
    assert calls == [1] and bare == first


def test_done_marks_are_bounded(client, monkeypatch):
    from draftpick.controller import controller as module

    monkeypatch.setattr(module, "DONE_LIMIT", 3)
    c = controller(client)
    sink = c.sink()
    for _ in range(5):
        sink(request())
    sink.flush(10)
    assert c.fold_pending() == 5 and client.zcard(c.keys.done) == 3


def test_the_controller_actor_outlives_the_process_that_started_it(ray_loopback, client):
    """Started from inside another actor (as a Serve replica would), the controller survives when
    that actor dies: it is detached, not owned."""
    import ray

    from draftpick.controller.actor import NAME, NAMESPACE, stop_controller
    from draftpick.workers.config import DraftpickConfig

    cfg = DraftpickConfig.model_validate({"target": {"name": "t", "path": "unused"}, "drafters": [{"type": "ngram"}],
                                          "policy": {"name": "ucb1", "ks": [1, 2]}})
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"

    @ray.remote(num_cpus=0)
    class Starter:
        def start(self, cfg, url):
            from draftpick.controller.actor import start_controller

            return ray.get(start_controller(cfg, {"schema": 1, "test": "owner"}, url).status.remote())["redis"]

    starter = Starter.remote()
    assert ray.get(starter.start.remote(cfg, url)) == "up"
    ray.kill(starter)
    time.sleep(1.0)
    try:
        assert ray.get(ray.get_actor(NAME, namespace=NAMESPACE).status.remote(), timeout=10)["redis"] == "up"
    finally:
        assert stop_controller()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # stopped for good: no restart
        try:
            ray.get_actor(NAME, namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the controller actor was not stopped")
