"""The Ray Serve application end to end, each in processes of its own (tiny models): `draftpick
serve` and `serve run deploy/serve.yaml`, reached over real HTTP with the official `openai` client.
No REDIS_URL: the controller actor starts the embedded Redis. Checked: output, learning, metrics,
429 under a burst, a disconnect cancelling its generation, loopback only, clean shutdown."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from draftpick.controller.redis_server import free_port
from draftpick.policies import Arm
from draftpick.workers.factory import build_engine
from draftpick.workers.inputs import encode_input
from draftpick.workers.sampling import SamplingParams
from tiny import save_models, service_config

pytestmark = pytest.mark.integration
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = "hello world"  # the tiny target's greedy answer runs 278 tokens before its EOS


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, target, tok):
    return service_config(save_models(tmp_path_factory.mktemp("serve"), target, tok),
                          worker={"num_cpus": 1, "max_concurrency": 1}, serve={"max_queued": 1, "max_tokens": 1000})


@pytest.fixture(scope="module")
def engine(cfg):
    return build_engine(cfg)


class Service:
    """A service process: its output lines (read in a thread) and its whole process tree."""

    def __init__(self, argv, env, ready, timeout: float = 240):
        """ready: a line of output that says so, or a function that returns True once it is."""
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.seen = set()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        is_ready = ready if callable(ready) else lambda: any(ready in x for x in self.lines)
        while not is_ready():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def tree(self) -> list[psutil.Process]:
        """The process and everything it started (Ray's processes included); remembered for the end."""
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        self.seen.update(procs)
        return procs

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> float:
        """Signal the process; the seconds until it and every process it started are gone."""
        self.tree()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        _, alive = psutil.wait_procs(list(self.seen), timeout=max(1.0, timeout - (time.monotonic() - t0)))
        for p in alive:
            p.kill()
        assert not alive, f"left running: {[p.pid for p in alive]}\n{self.output()}"
        return time.monotonic() - t0


def assert_loopback_only(service: Service) -> None:
    """Every socket of the service's processes listens on, and connects to, loopback only."""
    bad = []
    for p in service.tree():
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.laddr and c.laddr.ip not in LOOPBACK:
                bad.append((p.name(), c.status, c.laddr))
            if c.raddr and c.raddr.ip not in LOOPBACK:
                bad.append((p.name(), c.status, c.raddr))
    assert not bad, bad


def env_for(tmp_path) -> dict:
    env = {**os.environ, "DRAFTPICK_HOME": str(tmp_path / "home")}  # the embedded Redis keeps its data here
    for var in ("RAY_ADDRESS", "REDIS_URL", "DRAFTPICK_API_KEY"):
        env.pop(var, None)
    return env


def test_draftpick_serve_end_to_end(cfg, engine, tok, tmp_path):
    import httpx2 as httpx
    import openai

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    port = free_port()
    service = Service([sys.executable, "-m", "draftpick.deploy.cli", "serve", "--config", str(tmp_path / "cfg.yaml"),
                       "--port", str(port)], env_for(tmp_path), ready="ray address:")
    url = f"http://127.0.0.1:{port}"
    try:
        assert f"draftpick serving tiny at {url}/v1" in service.output()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        # greedy output through HTTP equals the target's own, for a pinned arm, in chat and streaming
        messages = [{"role": "user", "content": "the cat sat"}]
        want = engine.generate(encode_input(tok, {"messages": messages}), SamplingParams(max_tokens=16), Arm("none", 0))
        pin = {"draftpick": {"drafter": "close", "num_speculative_tokens": 3}}
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                              extra_body=pin)
        assert chat.choices[0].message.content == want.text
        assert chat.model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"] >= 1
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body=pin))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
        # unpinned: decided by the controller actor, learned in the embedded Redis
        decided = client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=8, temperature=0)
        assert decided.model_extra["draftpick"]["policy"] == "ucb1"
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok" and health["controller"] == "up" and health["redis"] == "up", health
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="tiny", prompt="x", max_tokens=5000)
        assert_loopback_only(service)

        # a client that hangs up cancels its generation; its rounds still feed back. The prompt's
        # greedy answer is long (hundreds of rounds at k = 1): answered whole first, for the comparison
        long = {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 900, "temperature": 0,
                "draftpick": {"drafter": "close", "num_speculative_tokens": 1}}
        whole = httpx.post(url + "/v1/completions", json=long, timeout=120).json()
        full_rounds = whole["metrics"]["speculative_decoding"]["num_spec_steps"]
        assert full_rounds >= 100, whole
        before = _wait_stats(url, 4)["totals"]
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)
        after = _wait_stats(url, 5)["totals"]
        assert 1 <= after["rounds"] - before["rounds"] < full_rounds / 2
        assert httpx.get(url + "/health").json()["in_flight"] == 0

        # a burst beyond the bound (1 running + 1 queued) gets 429s; the admitted ones are answered
        burst = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 200, "temperature": 0,
                 "draftpick": {"drafter": "close", "num_speculative_tokens": 1}}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=burst, timeout=120).status_code,
                                  range(6)))
        assert set(codes) == {200, 429}, codes

        metrics = httpx.get(url + "/metrics").text
        assert 'draftpick:spec_decode_num_draft_tokens_total{drafter="close"}' in metrics
        assert 'draftpick:request_errors_total{status="429"}' in metrics
        assert "draftpick:feedback_lag_entries" in metrics

        # SIGTERM while a stream is in flight: the stream ends normally, then everything stops
        streamed, started = [], threading.Event()

        def long_stream():
            with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    started.set()
                    if line:
                        streamed.append(line)

        reader = threading.Thread(target=long_stream)
        reader.start()
        assert started.wait(60)
    finally:
        seconds = service.stop(signal.SIGTERM)
    reader.join(60)
    assert service.proc.returncode == 0, service.output()
    assert "shutting down" in service.output() and seconds < 60
    events = [json.loads(x[6:]) for x in streamed if x.startswith("data: {")]
    assert streamed[-1] == "data: [DONE]", streamed[-3:]  # drained, not cut
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]


def _wait_stats(url: str, requests: int, timeout: float = 30) -> dict:
    """The learned stats once `requests` requests are folded."""
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/v1/draftpick/stats").json()
        if stats["totals"].get("requests", 0) >= requests or time.monotonic() > deadline:
            assert stats["totals"].get("requests", 0) == requests, stats["totals"]
            return stats
        time.sleep(0.2)


def _up(port: int, route: str = "") -> bool:
    import httpx2 as httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}{route}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_run_of_the_serve_config(engine, tok, tmp_path):
    """Ray's own CLI: `serve run` of deploy/serve.yaml, pointed at a configuration by its args. The
    worker and serve sections are the defaults: 32 concurrent streams, each pinned to its own arm,
    are all answered (no 429), batched, each with its greedy output alone. A second service (its own
    serve.name and policy) runs beside it in the same Serve instance at /other, and each learns only
    from its own requests, in its own controller and embedded Redis."""
    import httpx2 as httpx

    cfg = service_config(save_models(tmp_path, engine.target, tok), worker={"num_cpus": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    conf = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    port = free_port()
    conf["http_options"]["port"] = port
    conf["applications"][0]["args"]["config"] = str(tmp_path / "cfg.yaml")
    other = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"name": "other"}),
                                   "policy": cfg.policy.model_copy(update={"name": "thompson"})})
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other.model_dump(mode="json")))
    conf["applications"].append({**conf["applications"][0], "name": "other", "route_prefix": "/other",
                                 "args": {"config": str(tmp_path / "other.yaml")}})
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(conf))
    env = {**env_for(tmp_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local Ray on loopback
    serve = Path(sys.executable).with_name("serve")
    service = Service([str(serve), "run", str(tmp_path / "serve.yaml")], env,
                      ready=lambda: _up(port) and _up(port, "/other"))
    prompts = ["the cat sat", "x = 1\ny = 2\n", "def add(a, b):\n", "hello there", "import os\n", "the mat"]
    pins = [{"drafter": "none"}, {"drafter": "ngram", "num_speculative_tokens": 3},
            {"drafter": "close", "num_speculative_tokens": 2}, {"drafter": "ngram", "num_speculative_tokens": 8}]

    def stream(i):
        body = {"model": "tiny", "prompt": prompts[i % len(prompts)], "max_tokens": 40, "temperature": 0,
                "stream": True, "draftpick": pins[i % len(pins)]}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            return r.status_code, "".join(e["choices"][0]["text"] for e in events)

    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(stream, range(32)))
        learnable = 0  # requests with a round to learn from (one that ends at its first token has none)
        for i, (status, text) in enumerate(answers):
            want = engine.generate(tok(prompts[i % len(prompts)]).input_ids, SamplingParams(max_tokens=40), Arm("none", 0))
            assert status == 200 and text == want.text, (i, status)
            learnable += bool(want.records)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["redis"] == "up"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        rounds = _sample(metrics, "draftpick:round_batch_size_count")
        alone = _sample(metrics, 'draftpick:round_batch_size_bucket{le="1.0"}')
        assert rounds > 0 and alone < rounds / 2, (alone, rounds)  # most rounds shared their forward
        # the other service: requests its policy decides, learned there alone
        other_learnable = 0
        for prompt in prompts:
            r = httpx.post(f"http://127.0.0.1:{port}/other/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200 and r.json()["draftpick"]["policy"] == "thompson", r.text
            other_learnable += bool(engine.generate(tok(prompt).input_ids, SamplingParams(max_tokens=12)).records)
        want = {"": learnable, "/other": other_learnable}
        stats = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = {route: httpx.get(f"http://127.0.0.1:{port}{route}/v1/draftpick/stats", timeout=30).json()
                     for route in want}
            if all(stats[route]["totals"].get("requests") == n for route, n in want.items()):
                break
            time.sleep(0.5)
        assert {route: stats[route]["totals"].get("requests") for route in want} == want
        assert stats[""]["policy"] == "ucb1" and stats["/other"]["policy"] == "thompson"
        assert stats[""]["namespace"] != stats["/other"]["namespace"]
        assert sorted(p.name for p in (tmp_path / "home").iterdir() if p.name.startswith("redis")) == \
            ["redis", "redis-other"]  # each service's embedded Redis in its own directory
    finally:
        service.stop(signal.SIGINT)


def _sample(metrics: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))
