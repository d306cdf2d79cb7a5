"""The Ray worker actor on a tiny model saved to disk: concurrent, streamed, and still exact."""
import pytest
import ray

from draftpick.policies.types import Arm
from tiny import save_models
from draftpick.workers.actor import GenerateRequest, worker_actor
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, target, tok):
    root = save_models(tmp_path_factory.mktemp("models"), target, tok)
    return root


@pytest.fixture(scope="module")
def cfg(model_dirs):
    return DraftpickConfig.model_validate({
        "target": {"name": "tiny", "path": str(model_dirs / "target")},
        "drafters": [{"type": "ngram"}, {"type": "suffix"}, {"type": "model", "name": "close", "path": str(model_dirs / "close")}],
        "engine": {"device": "cpu"},
        "worker": {"num_cpus": 1, "torch_threads": 1},
    })


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_concurrent_streamed_requests_match_plain_greedy(ray_local, cfg, target, tok):
    from draftpick.workers.factory import build_engine

    local = build_engine(cfg)  # the same engine without Ray, as the reference
    worker = worker_actor(cfg)
    prompts = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat.", "x = 1\ny = 2\nz = "]
    arms = [Arm("close", 4), Arm("ngram", 3), Arm("suffix", 2)]
    streams = []
    for i, (p, arm) in enumerate(zip(prompts, arms)):
        ids = ray.get(worker.tokenize.remote({"prompt": p}))
        req = GenerateRequest(ids, SamplingParams(max_tokens=40, ignore_eos=True), arm, request_id=str(i))
        streams.append((ids, worker.generate_stream.options(num_returns="streaming").remote(req)))
    for ids, stream in streams:
        chunks = [ray.get(ref) for ref in stream]
        final = chunks[-1]
        streamed = [t for c in chunks[:-1] for t in c["token_ids"]]
        expected = local.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True), Arm("none", 0)).token_ids
        assert streamed == final["result"]["token_ids"] == expected
        assert len(chunks) > 5  # tokens arrived round by round, not all at the end
        assert final["result"]["metrics"]["speculative_decoding"]["num_spec_steps"] == len(final["records"])
    info = ray.get(worker.info.remote())
    assert info["in_flight"] == 0 and "close" in info["drafters"]
    assert info["prefix_cache"]["lookups"] == len(prompts)  # on by default: every request looked for its prefix


def test_requests_overlap_on_one_worker(ray_local, cfg):
    worker = worker_actor(cfg)
    ids = ray.get(worker.tokenize.remote({"prompt": "abc abc abc"}))
    reqs = [GenerateRequest(ids, SamplingParams(max_tokens=60, ignore_eos=True), Arm("ngram", 2)) for _ in range(3)]
    results = ray.get([worker.generate.remote(r) for r in reqs])
    # rounds of different requests interleave: some rounds saw more than one request in flight
    assert max(r["load"] for res in results for r in res["records"]) > 1
    assert len({tuple(res["result"]["token_ids"]) for res in results}) == 1


def test_k_above_max_k_is_refused(ray_local, cfg):
    worker = worker_actor(cfg)
    req = GenerateRequest([1, 2, 3], SamplingParams(max_tokens=4), Arm("ngram", 99))
    with pytest.raises(ray.exceptions.RayTaskError, match="exceeds engine.max_k"):
        ray.get(worker.generate.remote(req))
