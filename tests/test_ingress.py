"""The OpenAI-compatible ingress over an in-process engine (tiny models): completions, chat,
streaming, errors, and decisions by the policy when a request pins no arm."""
import json

import pytest
from fastapi.testclient import TestClient

from draftpick.deploy.ingress import EngineBackend, make_app
from draftpick.policies import Arm
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.factory import build_engine
from draftpick.workers.sampling import SamplingParams
from tiny import save_models


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, target, tok):
    root = save_models(tmp_path_factory.mktemp("ingress"), target, tok)
    return DraftpickConfig.model_validate({
        "target": {"name": "tiny", "path": str(root / "target")},
        "drafters": [{"type": "ngram"}, {"type": "model", "name": "close", "path": str(root / "close")}],
        "engine": {"device": "cpu"}, "policy": {"name": "ucb1", "ks": [1, 3]}})


@pytest.fixture(scope="module")
def engine(cfg):
    return build_engine(cfg)


@pytest.fixture(scope="module")
def http(cfg, engine):
    return TestClient(make_app(EngineBackend(cfg, engine, max_tokens_limit=64)))


def test_greedy_completion_over_http_equals_the_engine(http, engine, tok):
    for arm in (Arm("ngram", 3), Arm("close", 2)):
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "the cat sat", "max_tokens": 24, "temperature": 0,
                                              "draftpick": {"drafter": arm.drafter, "num_speculative_tokens": arm.k}})
        assert r.status_code == 200, r.text
        body = r.json()
        want = engine.generate(tok("the cat sat").input_ids, SamplingParams(max_tokens=24), Arm("none", 0))
        assert body["choices"][0]["text"] == want.text and body["choices"][0]["finish_reason"] == want.finish_reason
        assert body["usage"]["completion_tokens"] == len(want.token_ids)
        assert body["metrics"]["speculative_decoding"]["num_spec_steps"] >= 1


def test_chat_and_streaming_give_the_same_text(http):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 20,
            "temperature": 0, "draftpick": {"drafter": "close", "num_speculative_tokens": 3}}
    whole = http.post("/v1/chat/completions", json=base).json()
    assert whole["object"] == "chat.completion"
    with http.stream("POST", "/v1/chat/completions", json={**base, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"] and "speculative_decoding" in chunks[-1]["metrics"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{oops", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "draftpick": {"drafter": "eagle"}}, 400, "draftpick.drafter"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_a_4xx_and_the_service_stays_healthy(http, path, body, status, param):
    r = http.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                  headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.fixture
def learning(cfg, engine, redis_server):
    """The policy deciding and learning in Redis, with its sink on the (shared) engine while the test runs."""
    from draftpick.controller.local import LocalLearning

    redis_server.flushall()
    url = f"redis://127.0.0.1:{redis_server.connection_pool.connection_kwargs['port']}/0"
    learning = LocalLearning(cfg, engine, url)
    yield learning
    engine.sinks.remove(learning.sink)
    learning.close()


def test_an_unpinned_request_is_decided_by_the_policy_and_learned(cfg, engine, learning):
    http = TestClient(make_app(EngineBackend(cfg, engine, learning, max_tokens_limit=64)))
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\n", "max_tokens": 10,
                                          "draftpick": {"context": "code"}})
    assert r.status_code == 200 and r.json()["draftpick"]["policy"] == "ucb1"
    assert r.json()["draftpick"]["context"] == "code"
    assert http.get("/health").json()["redis"] == "up"
    learning.sink.flush(10)
    assert learning.controller.fold_pending() == 1 and learning.controller.stats()["totals"]["requests"] == 1


@pytest.mark.integration
def test_draftpick_serve_answers_over_http_learns_and_shuts_down_cleanly(cfg, engine, tok, redis_server, tmp_path):
    """`draftpick serve` in a process of its own: real HTTP on loopback, a pinned request equal to
    the engine's greedy output, an unpinned one decided by the controller; SIGTERM stops it all."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import yaml

    from draftpick.controller.redis_server import free_port

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    port = free_port()
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_server.connection_pool.connection_kwargs['port']}/0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "draftpick.deploy.cli", "serve", "--config", str(tmp_path / "cfg.yaml"),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "ray address:" in line or proc.poll() is not None:
                break
        assert any("draftpick serving tiny at http://127.0.0.1:" in x for x in lines), "".join(lines)

        def post(body):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())

        pinned = post({"model": "tiny", "prompt": "the cat sat", "max_tokens": 16, "temperature": 0,
                       "draftpick": {"drafter": "close", "num_speculative_tokens": 3}})
        want = engine.generate(tok("the cat sat").input_ids, SamplingParams(max_tokens=16), Arm("none", 0))
        assert pinned["choices"][0]["text"] == want.text
        decided = post({"model": "tiny", "prompt": "x = 1\n", "max_tokens": 8, "temperature": 0})
        assert decided["draftpick"]["policy"] == "ucb1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    assert "shutting down" in out


def test_an_api_key_is_required_when_configured(cfg, engine):
    http = TestClient(make_app(EngineBackend(cfg, engine, max_tokens_limit=64, api_key="k3y")))
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 4, "draftpick": {"drafter": "ngram"}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert http.get("/health").status_code == 200  # health stays open


def test_a_burst_beyond_the_bound_gets_429_with_retry_after_and_the_rest_is_served(cfg, engine):
    from concurrent.futures import ThreadPoolExecutor

    backend = EngineBackend(cfg, engine, max_tokens_limit=64, max_queued=1)
    http = TestClient(make_app(backend))
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 60, "temperature": 0,
            "draftpick": {"drafter": "close", "num_speculative_tokens": 1}}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(6)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
    assert backend.admitted == 0 and http.post("/v1/completions", json=body).status_code == 200


def test_stats_route_shows_what_was_learned(cfg, engine, learning):
    http = TestClient(make_app(EngineBackend(cfg, engine, learning, max_tokens_limit=64)))
    for _ in range(2):
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\n", "max_tokens": 6}).status_code == 200
    learning.sink.flush(10)
    learning.controller.fold_pending()
    assert http.get("/v1/draftpick/stats").json()["totals"]["requests"] == 2
    plain = TestClient(make_app(EngineBackend(cfg, engine)))
    assert plain.get("/v1/draftpick/stats").status_code == 404
