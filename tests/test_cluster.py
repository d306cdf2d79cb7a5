"""The cluster rehearsal: two hosts made of two network namespaces on this machine (a veth pair,
addresses of their own), `ray start --head` in one, `ray start --address` in the other, with token
authentication as Ray 2.60 requires; `serve deploy` of deploy/serve.yaml; requests answered with
worker replicas placed on both nodes, learning in the controller's embedded Redis across the
"network"; then `serve shutdown`, `ray stop`, the namespaces removed. Needs root (`ip netns`);
skipped where namespaces cannot be made."""
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import save_models, service_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
HEAD, WORK = "dp-head", "dp-work"
HEAD_IP, WORK_IP = "10.213.7.1", "10.213.7.2"
GCS_PORT, HTTP_PORT = 6380, 8000


def _sh(*argv, check=True, timeout=180, **kw):
    return subprocess.run(argv, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = "dp-probe"
    ok = _sh("ip", "netns", "add", probe, check=False).returncode == 0
    _sh("ip", "netns", "del", probe, check=False)
    return ok


@pytest.fixture
def two_hosts():
    if not _can_make_namespaces():
        pytest.skip("network namespaces need root and iproute2 (`ip netns`)")
    for ns in (HEAD, WORK):
        _sh("ip", "netns", "del", ns, check=False)
    _sh("ip", "netns", "add", HEAD)
    _sh("ip", "netns", "add", WORK)
    try:
        _sh("ip", "link", "add", "dp-veth-h", "type", "veth", "peer", "name", "dp-veth-w")
        for ns, dev, ip in ((HEAD, "dp-veth-h", HEAD_IP), (WORK, "dp-veth-w", WORK_IP)):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield
    finally:
        for ns in (HEAD, WORK):
            _sh("ip", "netns", "del", ns, check=False)


def test_two_host_cluster_with_ray_start_and_serve_deploy(two_hosts, target, tok, tmp_path):
    cfg = service_config(save_models(tmp_path, target, tok), worker={"num_cpus": 1, "replicas": 2})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    conf = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    conf["applications"][0]["args"]["config"] = str(tmp_path / "cfg.yaml")  # every node reads the same path
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(conf))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "DRAFTPICK_HOME": str(tmp_path / "home")}
    for var in ("RAY_ADDRESS", "REDIS_URL", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(var, None)

    def on(ns, *argv, **kw):
        return _sh("ip", "netns", "exec", ns, *argv, env=env, **kw)

    try:
        on(HEAD, str(bin_dir / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={GCS_PORT}",
           "--num-cpus=1", "--dashboard-host=127.0.0.1", "--disable-usage-stats")
        on(WORK, str(bin_dir / "ray"), "start", f"--address={HEAD_IP}:{GCS_PORT}", f"--node-ip-address={WORK_IP}",
           "--num-cpus=1", "--disable-usage-stats")
        on(HEAD, str(bin_dir / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", "http://127.0.0.1:8265")
        probe = on(HEAD, sys.executable, "-c", _PROBE, str(GCS_PORT), HEAD_IP, str(HTTP_PORT), timeout=420)
        result = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        on(HEAD, str(bin_dir / "serve"), "shutdown", "-y", "--address", "http://127.0.0.1:8265", check=False)
        for ns in (WORK, HEAD):
            on(ns, str(bin_dir / "ray"), "stop", "--force", check=False)
    assert result["worker_nodes"] == sorted([HEAD_IP, WORK_IP]), result
    assert result["answered"] == result["sent"] > 0 and result["texts"] == 1, result
    assert result["learned_requests"] == result["sent"], result


# runs inside the head namespace: waits for the app, sends requests, reports where the workers run
_PROBE = r'''
import json, sys, time
import httpx2 as httpx
import ray
from ray.util.state import list_actors, list_nodes
gcs, head_ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
url = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 360
while True:
    try:
        if httpx.get(url + "/health", timeout=5).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    assert time.monotonic() < deadline, "the app did not come up"
    time.sleep(1)
body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
texts, answered, sent = set(), 0, 8
for i in range(sent):
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    if r.status_code == 200:
        answered += 1
        texts.add(r.json()["choices"][0]["text"])
deadline = time.monotonic() + 60
while True:
    learned = httpx.get(url + "/v1/draftpick/stats", timeout=30).json()["totals"].get("requests", 0)
    if learned >= sent or time.monotonic() > deadline:
        break
    time.sleep(0.5)
ray.init(address=f"{head_ip}:{gcs}", logging_level="ERROR")
ips = {n.node_id: n.node_ip for n in list_nodes()}
workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
           if a.class_name.endswith("DraftpickWorker")]
print(json.dumps({"worker_nodes": sorted(ips[a.node_id] for a in workers), "answered": answered, "sent": sent,
                  "texts": len(texts), "learned_requests": learned}))
'''
