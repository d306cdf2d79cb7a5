"""The OpenAI-compatible ingress over an in-process engine (tiny models): completions, chat,
streaming, errors, and decisions by the policy when a request pins no arm."""
import json

import pytest
from fastapi.testclient import TestClient

from draftpick.deploy.ingress import local_app
from draftpick.policies import Arm
from draftpick.workers.actor import EngineWorker
from draftpick.workers.config import ServeSection
from draftpick.workers.prefix import BLOCK
from draftpick.workers.sampling import SamplingParams
from tiny import save_models, service_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, target, tok):
    return service_config(save_models(tmp_path_factory.mktemp("ingress"), target, tok))


@pytest.fixture(scope="module")
def worker(cfg):
    return EngineWorker(cfg)


@pytest.fixture(scope="module")
def engine(worker):
    return worker.engine


@pytest.fixture(scope="module")
def http(cfg, worker):
    with TestClient(local_app(cfg.model_copy(update={"serve": ServeSection(max_tokens=64)}), worker)) as client:
        yield client


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
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x " * 600, "max_tokens": 60}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "draftpick": {"drafter": "eagle"}}, 400, "draftpick.drafter"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "draftpick": {"policy": "magic"}}, 400, "draftpick.policy"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "draftpick": {"context": "no spaces"}}, 400,
     "draftpick.context"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_a_4xx_and_the_service_stays_healthy(http, path, body, status, param):
    r = http.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                  headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.fixture
def learner(cfg, redis_server):
    """A worker deciding and learning in the test's Redis (flushed first)."""
    redis_server.flushall()
    url = f"redis://127.0.0.1:{redis_server.connection_pool.connection_kwargs['port']}/0"
    worker = EngineWorker(cfg, url)
    yield worker
    worker.close()


def _folded(worker, requests: int) -> dict:
    """The learned totals once `requests` requests are folded (the test folds them: no controller actor)."""
    assert worker.sink.flush(10), f"the feedback was not appended within 10 s: {worker.sink.status()}"
    local = worker.decisions.local
    folded = local.fold_pending()
    stats = worker.stats()
    assert stats["totals"]["requests"] == requests, (  # what the stream and its group hold, if not
        f"folded {folded}, totals {stats['totals']}, stream length {local.client.xlen(local.keys.feedback)}, "
        f"groups {local.client.xinfo_groups(local.keys.feedback)}")
    return stats


def test_an_unpinned_request_is_decided_by_the_policy_and_learned(cfg, learner):
    with TestClient(local_app(cfg, learner)) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\n", "max_tokens": 10,
                                              "draftpick": {"context": "code"}})
        assert r.status_code == 200 and r.json()["draftpick"]["policy"] == "ucb1"
        assert r.json()["draftpick"]["context"] == "code"
        health = http.get("/health").json()
        assert health["redis"] == "up" and health["controller"].startswith("down")  # no actor: decided locally
        assert health["status"] == "degraded"
    _folded(learner, 1)


def test_an_api_key_is_required_from_the_configuration_or_the_environment(cfg, worker, monkeypatch):
    monkeypatch.setenv("MY_KEY", "k3y")
    keyed = cfg.model_copy(update={"serve": ServeSection(api_key="env:MY_KEY")})
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 4, "draftpick": {"drafter": "ngram"}}
    with TestClient(local_app(keyed, worker)) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert http.get("/v1/draftpick/stats").status_code == 401 and http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200  # health stays open
    monkeypatch.setenv("DRAFTPICK_API_KEY", "other")
    with TestClient(local_app(cfg, worker)) as http:
        assert http.post("/v1/completions", json=body).status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer other"}).status_code == 200
    monkeypatch.delenv("MY_KEY")
    from draftpick.workers.config import ConfigError
    with pytest.raises(ConfigError, match="serve.api_key: environment variable MY_KEY"):
        local_app(keyed, worker)


def test_a_burst_beyond_the_bound_gets_429_with_retry_after_and_the_rest_is_served(cfg, worker):
    from concurrent.futures import ThreadPoolExecutor

    app = local_app(cfg, worker, max_admitted=1)
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 60, "temperature": 0,
            "draftpick": {"drafter": "close", "num_speculative_tokens": 1}}
    with TestClient(app) as http, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(6)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
        assert app.state.ingress.admitted == 0 and http.post("/v1/completions", json=body).status_code == 200


def test_stats_and_metrics_reflect_the_traffic(cfg, learner, worker):
    with TestClient(local_app(cfg, learner)) as http:
        bodies = [http.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\nx = 1\n", "max_tokens": 12,
                                                    "temperature": 0, **pin}).json()
                  for pin in ({}, {"draftpick": {"drafter": "ngram", "num_speculative_tokens": 3}})]
        stats = _folded(learner, 2)
        assert http.get("/v1/draftpick/stats").json() == stats
        text = http.get("/metrics").text
    spec = bodies[1]["metrics"]["speculative_decoding"]
    ngram = _sample(text, 'draftpick:spec_decode_num_accepted_tokens_total{drafter="ngram"}')
    # the decided request may also have played ngram: the pinned one is a lower bound
    assert ngram >= spec["num_accepted_draft_tokens"] > 0
    drafted = sum(_sample(text, f'draftpick:spec_decode_num_draft_tokens_total{{drafter="{d}"}}') for d in ("ngram", "close"))
    assert drafted == sum(b["metrics"]["speculative_decoding"]["num_draft_tokens"] for b in bodies)
    arm = bodies[0]["draftpick"]["arm"]
    assert _sample(text, f'draftpick:controller_decisions_total{{arm="{arm}",policy="ucb1"}}') == 1
    assert _sample(text, "draftpick:time_to_first_token_seconds_count") == 2
    assert _sample(text, "draftpick:generation_tokens_total") == sum(b["usage"]["completion_tokens"] for b in bodies)
    assert _sample(text, "draftpick:feedback_lag_entries") == 0 and 'state="appended"' in text
    # the same prompt twice: the second found the first's whole blocks in the prefix cache, all but its last token
    n = bodies[0]["usage"]["prompt_tokens"]
    assert _sample(text, "draftpick:prefix_cache_queries") == 2 * n
    assert _sample(text, "draftpick:prefix_cache_hits") == (n - 1) // BLOCK * BLOCK > 0
    # the worker's forward seconds by phase, as it counts them (every request prefilled and ran rounds)
    seconds = learner.engine.forward_s
    for phase in ("prefill", "decode"):
        scraped = _sample(text, f'draftpick:forward_seconds{{phase="{phase}"}}')
        assert scraped == pytest.approx(seconds[phase]) and scraped > 0
    with TestClient(local_app(cfg, worker)) as plain:
        assert plain.get("/v1/draftpick/stats").status_code == 404


def _sample(text: str, name: str) -> float:
    """A sample's value in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def served(cfg, learner):
    """The app over a learning worker behind a real HTTP server on loopback (uvicorn in a thread)."""
    import threading
    import time

    import uvicorn

    from draftpick.controller.redis_server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(local_app(cfg, learner), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_official_openai_client_gets_the_targets_greedy_output_and_the_stats(served, learner, tok):
    import openai

    from draftpick.workers.inputs import encode_input

    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    pin = {"draftpick": {"drafter": "close", "num_speculative_tokens": 2}}
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, extra_body=pin)
    want = learner.engine.generate(encode_input(tok, {"messages": messages}), SamplingParams(max_tokens=16))
    assert chat.choices[0].message.content == want.text and chat.usage.completion_tokens == len(want.token_ids)
    assert chat.model_extra["metrics"]["speculative_decoding"]["num_spec_steps"] >= 1
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=pin)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"] >= 1
    completion = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0)
    assert completion.model_extra["draftpick"]["policy"] == "ucb1"  # unpinned: the policy decided
    with pytest.raises(openai.BadRequestError, match="`n` is not supported"):
        client.completions.create(model="tiny", prompt="x", n=2)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_client_that_disconnects_cancels_its_generation_and_its_rounds_feed_back(served, learner):
    import time

    import httpx2 as httpx

    results = []
    learner.engine.add_sink(results.append)
    try:
        # the tiny target's greedy answer to this prompt runs 278 tokens (173 rounds) before its EOS
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 800, "temperature": 0, "stream": True,
                "draftpick": {"drafter": "close", "num_speculative_tokens": 1}}
        with httpx.stream("POST", served + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)  # the first rounds, then hang up
        deadline = time.monotonic() + 30
        while not results and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        learner.engine.sinks.remove(results.append)
    (res,) = results
    assert res.finish_reason == "abort" and 0 < len(res.token_ids) < 278
    assert learner.in_flight == 0
    stats = _folded(learner, 1)
    assert stats["totals"]["rounds"] == len(res.records) >= 1


def test_with_redis_down_the_service_answers_degraded_and_its_feedback_waits(cfg, tmp_path):
    """Redis goes away: /health stays 200 and says `degraded`, requests are still decided (from the
    worker's snapshot) and answered, and their feedback waits in the sink until Redis is back."""
    from draftpick.controller.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis").start()
    worker = EngineWorker(cfg, server.url)
    try:
        with TestClient(local_app(cfg, worker)) as http:
            server.stop()
            health = http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "degraded"
            assert health.json()["redis"].startswith("down")
            # greedy: a sampled answer ends at its first token about 1 time in 100 (EOS drawn at the prefill),
            # and a request without a round has no feedback to wait with
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x = 1\n", "max_tokens": 6,
                                                   "temperature": 0})
            assert r.status_code == 200 and r.json()["draftpick"]["policy"] == "ucb1"
            assert r.json()["usage"]["completion_tokens"] > 1  # it ran rounds: its feedback is in the sink
            assert worker.sink.status()["appended"] == 0
            server = EmbeddedRedis(tmp_path / "redis", port=server.port).start()  # back, same address and data
            _folded(worker, 1)
            assert http.get("/health").json()["status"] == "degraded"  # no controller actor in this test
    finally:
        worker.close()
        server.stop()


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_streamed_text_decoded_incrementally_equals_the_whole_decode(tok, which):
    """Chunks of any size, multi-byte characters split across tokens: the incremental text is the
    whole output's decode (a partial character held back until complete)."""
    import random

    from draftpick.deploy.ingress import IncrementalDecoder

    if which == "smollm2":
        from draftpick.workers.config import load_config
        from draftpick.workers.models import load_tokenizer

        cfg = load_config()
        tok = load_tokenizer(cfg.target.path, cfg.target.gguf_file)  # needs `draftpick setup` (.ci/install)
        text = "Grüße aus Köln 🚀 — naïve café, 日本語のテキスト.\n  def f(x):\n\treturn x ** 2  # ok"
    else:
        text = "def add(a, b):\n    return a + b\n the cat sat"
    ids = tok(text, add_special_tokens=False).input_ids
    full = tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    for _ in range(20):
        d, i, seen = IncrementalDecoder(tok), 0, []
        while i < len(ids):
            n = rng.randint(1, 4)
            seen.append(d.add(ids[i: i + n]))
            i += n
        assert seen[-1] == full
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows
        assert not any("\ufffd" in s for s in seen)
    assert IncrementalDecoder(tok).add(ids, stop_at=5) == full[:5]


def test_the_openai_user_is_the_tenant_and_is_bounded(cfg, worker, http):
    """`user` scopes the suffix drafter's index (GenerateRequest.tenant); a huge one is a 400."""
    from draftpick.deploy.ingress import Ingress, LocalBackend
    from draftpick.deploy.openai_protocol import parse

    ingress = Ingress(cfg, LocalBackend(worker), worker.engine.tokenizer)
    ingress._limits = worker.limits()
    for body, tenant in (({"user": "alice"}, "alice"), ({}, ""),
                         ({"user": "bob", "draftpick": {"drafter": "ngram", "num_speculative_tokens": 2}}, "bob")):
        req = parse({"model": "tiny", "prompt": "the cat", "max_tokens": 4, **body}, "completion", "tiny",
                    cfg.drafter_names(), cfg.engine.max_k, 64)
        assert ingress.generate_request(req, "r").tenant == tenant
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "user": "u" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
