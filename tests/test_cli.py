"""The CLI contract (`info --json`, `generate --json`) and start-up validation, on tiny models."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from draftpick.deploy.cli import main
from draftpick.workers.config import ConfigError, default_config_path, load_config
from tiny import save_models, tiny_model


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory, target, tok):
    root = save_models(tmp_path_factory.mktemp("cli"), target, tok)
    tiny_model(seed=3, vocab=50).save_pretrained(root / "othervocab")
    cfg = {
        "target": {"name": "tiny", "path": str(root / "target")},
        "drafters": [{"type": "ngram"}, {"type": "suffix"}, {"type": "model", "name": "close", "path": str(root / "close")}],
        "engine": {"device": "cpu", "default_drafter": "close", "default_k": 3},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root, cfg


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def write_cfg(root, cfg, name):
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_info_json_names_a_loadable_target_and_all_drafters(setup_dir, capsys, target):
    root, _ = setup_dir
    code, out, _ = run_cli(capsys, "info", "--config", str(root / "cfg.yaml"), "--json")
    info = json.loads(out)
    assert code == 0 and info["drafters"] == ["ngram", "suffix", "close", "none"]
    loaded = AutoModelForCausalLM.from_pretrained(info["target"]["path"]).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(x).logits, target(x).logits)


def test_generate_json_lines_in_order_with_ids_and_exact_greedy_tokens(setup_dir, capsys, target, tok):
    root, _ = setup_dir
    lines = [
        {"id": "a", "prompt": "def f(x):\n    return x\n", "ignored": 1},
        {"id": 7, "messages": [{"role": "user", "content": "say abc abc"}]},
        {"prompt": "the cat sat on the mat. the "},
    ]
    (root / "p.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    code, out, _ = run_cli(capsys, "generate", "--config", str(root / "cfg.yaml"), "--prompts", str(root / "p.jsonl"),
                           "--max-tokens", "30", "--json")
    assert code == 0
    outs = [json.loads(l) for l in out.splitlines()]
    assert [o["id"] for o in outs] == ["a", 7, None]
    assert sum(o["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"] for o in outs) > 0
    chat_ids = tok.apply_chat_template(lines[1]["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert outs[1]["prompt_token_ids"] == list(chat_ids)
    for o in outs:
        ids = o["prompt_token_ids"]
        ref = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
        assert o["token_ids"] == ref
        assert o["text"] == tok.decode(ref, skip_special_tokens=True)
        m = o["metrics"]["speculative_decoding"]
        assert m["num_spec_steps"] == len(ref) - 1 - m["num_accepted_draft_tokens"] or o["finish_reason"] == "stop"
        assert o["timing"]["generate_s"] > 0
        if m["num_spec_steps"]:
            assert m["mean_acceptance_length"] == pytest.approx(1 + m["num_accepted_draft_tokens"] / m["num_spec_steps"])
        assert sum(m["acceptance_histogram"]) == m["num_spec_steps"]
        # every emitted token is accounted for: prefill token + accepted + one per round (cut at a stop)
        assert len(o["token_ids"]) <= 1 + m["num_accepted_draft_tokens"] + m["num_spec_steps"]


def test_generate_none_drafter_counts_plain_rounds(setup_dir, capsys):
    root, _ = setup_dir
    code, out, _ = run_cli(capsys, "generate", "--config", str(root / "cfg.yaml"), "--prompt", "abc", "--drafter", "none",
                           "--max-tokens", "10", "--json")
    m = json.loads(out)["metrics"]["speculative_decoding"]
    n = len(json.loads(out)["token_ids"])
    assert code == 0 and m["num_draft_tokens"] == 0 and m["num_spec_steps"] == n - 1 and m["mean_acceptance_length"] == 1.0


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["engine"].update(dtpe="fp32"), "field `engine.dtpe`: Extra inputs are not permitted"),
    (lambda c: c["engine"].update(default_drafter="eagle"), "engine.default_drafter 'eagle' is not a configured drafter"),
    (lambda c: c["drafters"].append({"type": "ngram"}), "drafter names must be unique; repeated: ngram"),
    (lambda c: c["drafters"].append({"type": "ngram", "name": "none"}), "'none' is reserved"),
    (lambda c: c["drafters"].append({"type": "ngram", "name": "n2", "min_ngram": 4, "max_ngram": 2}), "min_ngram"),
    (lambda c: c["drafters"].append({"type": "lookahead", "name": "x"}), "field `drafters.3`"),
    (lambda c: c["engine"].update(default_k=-1), "field `engine.default_k`"),
    (lambda c: c["engine"].update(prefix_cache_blocks=-8), "field `engine.prefix_cache_blocks`"),
    (lambda c: c["drafters"].append({"type": "model", "name": "m", "path": "x", "min_confidence": 1.5}),
     "min_confidence`: Input should be less than 1"),
    (lambda c: c.pop("target"), "field `target`: Field required"),
    (lambda c: c.update(policy={"name": "nope"}), "policy: unknown policy 'nope'"),
    (lambda c: c.update(policy={"name": "ucb1", "options": {"c": 1, "gamma": 2}}), "policy: policy 'ucb1': bad configuration: unknown option(s) gamma"),
    (lambda c: c.update(policy={"name": "no_such_module:P"}), "cannot import module 'no_such_module'"),
    (lambda c: c.update(policy={"ks": [3, 99]}), "policy.ks go up to 99 > engine.max_k (16)"),
])
def test_bad_configuration_fails_at_start_up_naming_the_field(setup_dir, capsys, mutate, message):
    root, cfg = setup_dir
    bad = json.loads(json.dumps(cfg))
    mutate(bad)
    path = write_cfg(root, bad, "bad.yaml")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)
    code, out, err = run_cli(capsys, "info", "--config", path, "--json")
    assert code == 2 and message in err and out == ""


def test_drafter_with_another_vocabulary_is_refused_at_start_up(setup_dir, capsys):
    root, cfg = setup_dir
    bad = json.loads(json.dumps(cfg))
    bad["drafters"].append({"type": "model", "name": "other", "path": str(root / "othervocab")})
    code, _, err = run_cli(capsys, "generate", "--config", write_cfg(root, bad, "v.yaml"), "--prompt", "ab", "--json")
    assert code == 2 and "drafter 'other' has a vocabulary of 50 tokens but the target has" in err


def test_missing_model_path_is_a_clear_error(setup_dir, capsys):
    root, cfg = setup_dir
    bad = json.loads(json.dumps(cfg))
    bad["drafters"][2]["path"] = str(root / "nowhere")
    code, _, err = run_cli(capsys, "generate", "--config", write_cfg(root, bad, "m.yaml"), "--prompt", "ab")
    assert code == 2 and "cannot load model" in err and "nowhere" in err


@pytest.mark.parametrize("argv,message", [
    (["--drafter", "eagle"], "drafter 'eagle' is not configured"),
    (["-k", "99"], "num_speculative_tokens must be in [0, 16]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_bad_generate_arguments_are_refused(setup_dir, capsys, argv, message):
    root, _ = setup_dir
    code, _, err = run_cli(capsys, "generate", "--config", str(root / "cfg.yaml"), "--prompt", "ab", *argv)
    assert code == 2 and message in err


def test_bad_prompt_lines_name_the_line(setup_dir, capsys):
    root, _ = setup_dir
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, _, err = run_cli(capsys, "generate", "--config", str(root / "cfg.yaml"), "--prompts", str(root / "bad.jsonl"))
    assert code == 2 and "bad.jsonl:2: not valid JSON" in err
    (root / "bad2.jsonl").write_text('{"text": "no prompt"}\n')
    code, _, err = run_cli(capsys, "generate", "--config", str(root / "cfg.yaml"), "--prompts", str(root / "bad2.jsonl"))
    assert code == 2 and "bad2.jsonl:1: expected an object with `prompt` or `messages`" in err


def test_embedded_default_config_is_valid():
    cfg = load_config(default_config_path())
    assert cfg.target.path.startswith("builtin:") and {"ngram", "suffix", "chat", "code", "none"} <= set(cfg.drafter_names())
    heads = [d for d in cfg.drafters if d.type == "feature"]
    assert len(heads) == 2  # the distilled heads ship beside the config, found from any working directory
    for d in heads:
        assert (Path(d.path) / "draftpick_feature.json").is_file() and Path(d.path).is_absolute()
        assert d.full_information is False  # run only when played: loading them costs the other arms nothing


def test_console_script_is_installed():
    out = subprocess.run(["draftpick", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "bench" in out.stdout


def test_processes_loading_the_builtin_model_at_once_convert_it_once(tmp_path, monkeypatch):
    """A service's ingress and worker replicas resolve `builtin:` together on an empty home: one
    converts while the others wait, and all of them get the whole converted model. (A conversion
    stands in for the real one's 15 s: it writes its files slowly, as save_pretrained does.)"""
    import threading
    import time

    from draftpick.workers import builtin

    monkeypatch.setenv("DRAFTPICK_HOME", str(tmp_path))
    conversions = []

    def convert(gguf, out):  # the real one's steps: a fresh .tmp, files written one by one, DONE, rename
        conversions.append(out)
        tmp = out.with_name(out.name + ".tmp")
        builtin.shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            time.sleep(0.05)
            (tmp / f).write_text(f)
        (tmp / "DONE").write_text("converted\n")
        builtin.shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    monkeypatch.setattr(builtin, "convert_gguf", convert)
    monkeypatch.setattr(builtin, "find_packaged_file", lambda dist, suffix: tmp_path / "model.gguf")
    got, errors = [], []

    def load():
        try:
            got.append(builtin.ensure_builtin("smollm2-135m-instruct"))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(conversions) == 1
    assert len(got) == 4 and all(sorted(p.name for p in d.iterdir()) ==
                                 ["DONE", "config.json", "model.safetensors", "tokenizer.json"] for d in got)
