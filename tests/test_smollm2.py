"""Integration: the embedded default (SmolLM2-135M-Instruct, converted by `draftpick setup`)."""
import pytest
import torch

from draftpick.workers.config import load_config
from draftpick.policies.types import Arm
from draftpick.workers.sampling import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = [
    {"prompt": "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards.\"\"\"\n"},
    {"messages": [{"role": "user", "content": "Extract the names from: Alice met Bob and Carol in Paris."}]},
]


@pytest.fixture(scope="module")
def engine():
    from draftpick.workers.factory import build_engine

    return build_engine(load_config())  # needs `draftpick setup` (run by .ci/install)


def test_default_engine_is_lossless_against_transformers_generate(engine):
    from draftpick.workers.inputs import encode_input

    for item in PROMPTS:
        ids = encode_input(engine.tokenizer, item)
        x = torch.tensor([ids])
        ref = engine.target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)
        ref = ref[0, len(ids):].tolist()
        accepted = 0
        for arm in [Arm("none", 0), Arm("ngram", 1), Arm("ngram", 3), Arm("ngram", 8), Arm("suffix", 2), Arm("suffix", 5)]:
            res = engine.generate(ids, SamplingParams(max_tokens=40), arm, tenant="it")
            assert res.token_ids == ref, arm
            accepted += res.metrics()["num_accepted_draft_tokens"]
        assert accepted > 0  # drafts were really accepted along the way


def test_shipped_feature_drafters_are_lossless_and_accepted(engine):
    """The two distilled heads of the embedded default load against its target, keep greedy
    output identical, and draft tokens it accepts."""
    from draftpick.workers.inputs import encode_input

    accepted = {"chat": 0, "code": 0}
    for item in PROMPTS:
        ids = encode_input(engine.tokenizer, item)
        ref = engine.generate(ids, SamplingParams(max_tokens=40), Arm("none", 0)).token_ids
        for name in accepted:
            res = engine.generate(ids, SamplingParams(max_tokens=40), Arm(name, 4))
            assert res.token_ids == ref, name
            accepted[name] += res.metrics()["num_accepted_draft_tokens"]
    assert all(accepted.values()), accepted  # each head's drafts were accepted on the two prompts


def test_batched_requests_on_the_default_each_get_their_greedy_output_alone(engine):
    """Six requests (code, chat, ShareGPT, HumanEval), each with its own arm, verified together one
    forward per step, joining at different steps: each output is the request's own plain greedy output."""
    from draftpick.bench.prompts import load_domain
    from draftpick.workers.inputs import encode_input

    items = PROMPTS + load_domain("sharegpt", 2) + load_domain("humaneval", 2)
    ids = [encode_input(engine.tokenizer, item)[-256:] for item in items]
    arms = [Arm("chat", 4), Arm("ngram", 3), Arm("code", 3), Arm("suffix", 5), Arm("none", 0), Arm("ngram", 8)]
    params = SamplingParams(max_tokens=40)
    alone = [engine.generate(i, params, Arm("none", 0)).token_ids for i in ids]
    gens, step = [], 0
    while len(gens) < len(ids) or any(not g.done for g in gens):
        if step < len(ids):  # one joins each step
            gens.append(engine.start(ids[step], params, arms[step]))
        assert not [e for e in engine.step_batch([g for g in gens if not g.done]) if isinstance(e, Exception)]
        step += 1
    assert [g.out for g in gens] == alone
    assert max(r.batch for g in gens for r in g.records) >= 4  # (a request may end at EOS before the last joins)


def test_shipped_heads_have_different_strengths(engine):
    """The chat head accepts more than the code head on ShareGPT prompts and the code head more than
    the chat head on HumanEval (prompts the heads were not trained on; greedy, so deterministic)."""
    from draftpick.bench.prompts import load_domain
    from draftpick.workers.inputs import encode_input

    def acceptance(domain, name):
        steps = accepted = 0
        for item in load_domain(domain, 2):
            m = engine.generate(encode_input(engine.tokenizer, item)[-512:], SamplingParams(max_tokens=48),
                                Arm(name, 4)).metrics()
            steps, accepted = steps + m["num_spec_steps"], accepted + m["num_accepted_draft_tokens"]
        return 1 + accepted / steps

    chat = {d: acceptance(d, "chat") for d in ("sharegpt", "humaneval")}
    code = {d: acceptance(d, "code") for d in ("sharegpt", "humaneval")}
    assert chat["sharegpt"] > code["sharegpt"] and code["humaneval"] > chat["humaneval"], (chat, code)


def test_info_path_loads_the_exact_target(engine):
    import json
    import subprocess

    from transformers import AutoModelForCausalLM

    info = json.loads(subprocess.run(["draftpick", "info", "--json"], capture_output=True, text=True, check=True).stdout)
    assert "none" in info["drafters"] and info["target"]["name"] == "smollm2-135m-instruct"
    from draftpick.workers.models import small_batch_linears

    loaded = AutoModelForCausalLM.from_pretrained(info["target"]["path"]).eval()
    mine = engine.target.state_dict()
    assert all(torch.equal(t, mine[name]) for name, t in loaded.state_dict().items())
    small_batch_linears(loaded)  # as the engine's CPU fp32 target computes
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        # each calibration picks its layers' products by timing, and two products sum in other orders:
        # the same weights then agree to rounding (a CI run saw 7.7e-4 on logits of about 20), not bit for bit
        torch.testing.assert_close(loaded(x).logits, engine.target(x).logits, rtol=1e-4, atol=2e-3)


def test_the_openai_client_over_http_gets_what_draftpick_generate_prints(capsys, tmp_path):
    """The embedded default behind the ingress (an in-process worker, real HTTP on loopback): the
    official client's greedy chat answer equals `draftpick generate --json` with the same arm."""
    import json
    import threading
    import time

    import openai
    import uvicorn

    from draftpick.controller.redis_server import free_port
    from draftpick.deploy.cli import main
    from draftpick.deploy.ingress import local_app
    from draftpick.workers.actor import EngineWorker

    cfg = load_config()
    messages = [{"role": "user", "content": "Name three colours."}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.jsonl"), "--max-tokens", "24", "--drafter", "chat",
                 "-k", "3", "--json"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(local_app(cfg, EngineWorker(cfg)), host="127.0.0.1", port=port,
                                          log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=cfg.target.name, messages=messages, max_tokens=24, temperature=0,
                                           extra_body={"draftpick": {"drafter": "chat", "num_speculative_tokens": 3}})
    finally:
        server.should_exit = True
    assert r.choices[0].message.content == want["text"] and r.usage.completion_tokens == len(want["token_ids"])
    assert r.model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0
