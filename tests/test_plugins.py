"""Third-party policies: by dotted path, by entry point; bad plug-ins fail at start-up, clearly.
Statistics and records round-trip exactly through their Redis / JSON forms (real Redis)."""
import json
from pathlib import Path

import numpy as np
import pytest

from draftpick.policies.registry import PolicyError, create
from draftpick.policies.state import decode, encode
from draftpick.policies.types import Arm, Context, RoundRecord
from synthetic import arms_of, run

EXAMPLES = Path(__file__).parent.parent / "examples"
ARMS = [Arm("ngram", 2), Arm("none", 0)]


@pytest.fixture
def on_path(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_dotted_path_plugin_from_outside_the_package_learns(on_path):
    arms = arms_of(3)
    policy = create("greedy_mean:GreedyMean", arms, {"scale": 1.0})
    chosen, _ = run(policy, lambda t, ctx: dict(zip(arms, [0.2, 0.8, 0.5])), 300, noise=0.0)
    assert chosen[-1] == arms[1]


def test_entry_point_plugin(on_path):
    dist = on_path / "greedy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greedy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[draftpick.policies]\ngreedy-mean = greedy_mean:GreedyMean\n")
    policy = create("greedy-mean", ARMS, {})
    assert policy.select(Context(), {}, np.random.default_rng(0)).arm in ARMS


@pytest.mark.parametrize("source,spec,message", [
    ("class P:\n    def __init__(self, arms): self.arms = arms\n    def select(self, c, s, r): pass\n",
     "bad1:P", "does not follow the protocol: missing method(s) increments"),
    ("raise RuntimeError('boom')\n", "bad2:P", "cannot import module 'bad2': boom"),
    ("X = 1\n", "bad3:P", "module 'bad3' has no attribute 'P'"),
    ("class P:\n    def __init__(self, arms, lr): pass\n", "bad4:P", "bad configuration"),
    ("class P:\n    level = 'token'\n    def __init__(self, arms): self.arms = arms\n"
     "    def select(self, c, s, r): pass\n    def increments(self, r): return {}\n", "bad5:P", "level must be"),
])
def test_bad_plugins_fail_at_start_up_with_a_clear_message(on_path, source, spec, message):
    (on_path / f"{spec.split(':')[0]}.py").write_text(source)
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create(spec, ARMS, {})


def test_bad_entry_point_names_it(on_path):
    dist = on_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[draftpick.policies]\nbroken = no_such_module:P\n")
    with pytest.raises(PolicyError, match="entry point 'no_such_module:P' failed to load"):
        create("broken", ARMS, {})


@pytest.mark.parametrize("name", ["ucb1", "hedge", "contextual", "exp3"])
def test_policy_state_round_trips_through_redis_exactly(redis_server, name):
    arms = arms_of(4)
    policy = create(name, arms, {"scale": 1.0})
    stats = {}
    # learn a little, keeping the statistics
    rng = np.random.default_rng(0)
    for t in range(200):
        c = policy.select(Context(features=(1.0, 0.3 * (t % 3)), tag="t%d" % (t % 2), time=float(t)), stats, rng)
        rec = RoundRecord(c.arm.drafter, c.arm.k, 1, 1, 1 + rng.random(), 0.0, 1.06, propensity=c.propensity,
                          features=[1.0, 0.3 * (t % 3)], context="t%d" % (t % 2), time=float(t),
                          per_drafter={a.drafter: [rng.random(), rng.random()] for a in arms})
        for k, v in policy.increments(rec).items():
            stats[k] = stats.get(k, 0.0) + v
    key = f"draftpick:test:{name}"
    redis_server.delete(key)
    redis_server.hset(key, mapping=encode(stats))
    back = decode(redis_server.hgetall(key))
    assert back == stats  # bit for bit
    # and the policy decides the same from either
    a = [policy.select(Context(features=(1.0, 0.3), time=200.0), stats, np.random.default_rng(9)) for _ in range(5)]
    b = [policy.select(Context(features=(1.0, 0.3), time=200.0), back, np.random.default_rng(9)) for _ in range(5)]
    assert a == b


def test_round_record_round_trips_through_json_exactly():
    rec = RoundRecord("ngram", 3, 3, 2, 3, 0.000123, 0.0456789, 0.01, 0.3333333333333333, [1, 1, 0],
                      {"suffix": [1.0, 0.25]}, 2, "tenant-a", "code", [1.0, 0.1], 0.7, 12.5, 0.4, 1, {"ngram:3": 3.0})
    assert RoundRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
