"""Distillation on tiny models: the loss falls, the drafter stays lossless, bad inputs are refused."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from draftpick.deploy.cli import main
from draftpick.policies.types import Arm
from tiny import feature_drafter, save_models, tiny_model
from draftpick.workers.config import DraftpickConfig
from draftpick.workers.drafters.model import VOCAB_FILE
from draftpick.training.distill import SEQUENCES_FILE, DistillSettings, Distiller, generate_sequences
from draftpick.workers.factory import build_engine
from draftpick.workers.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["def add(a, b):\n    return a + b\n" * 3, "the cat sat on the mat. " * 6, "x = 1\ny = 2\nz = x + y\n" * 4] * 4


@pytest.fixture(scope="module")
def target4(tok):
    return tiny_model(seed=0, layers=4)


def test_loss_decreases_over_a_few_steps(target4, tok, tmp_path):
    d = Distiller(target4, tok, TEXTS, DistillSettings(out=str(tmp_path / "d"), init="target-layers:1", steps=40,
                                                       seq_len=32, batch=4, lr=3e-3, vocab=24), progress=False)
    summary = d.run()
    assert summary["steps"] == 40
    first, last = sum(d.losses[:5]) / 5, sum(d.losses[-5:]) / 5
    assert last < 0.7 * first
    kept = json.loads((tmp_path / "d" / VOCAB_FILE).read_text())
    assert len(kept) == 24 and tok.eos_token_id in kept


def test_distilled_drafter_loads_shares_the_tokenizer_and_keeps_output_exact(target4, tok, tmp_path, capsys):
    root = tmp_path
    save_models(root, target4, tok, close_noise=None)
    code = main(["distill", "--target", str(root / "target"), "--prompts", _jsonl(root, TEXTS), "--held-out", "2",
                 "--out", str(root / "drafter"), "--init", "target-layers:2", "--steps", "30", "--seq-len", "32",
                 "--batch", "4", "--lr", "3e-3", "--vocab", "24", "--validate-tokens", "24"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["validation"]["k"] == 4 and summary["validation"]["mean_acceptance_length"] >= 1.0
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(root / "target")},
        "drafters": [{"type": "model", "name": "distilled", "path": str(root / "drafter")}],
        "engine": {"device": "cpu"}})
    engine = build_engine(cfg)
    kept = set(json.loads((root / "drafter" / VOCAB_FILE).read_text()))
    for text in ["def add(a", "the cat", "qq"]:
        ids = tok(text).input_ids
        ref = target4.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
        g = engine.start(ids, SamplingParams(max_tokens=30), Arm("distilled", 4))
        drafts = []
        orig = g.sessions["distilled"].propose

        def spy(*a, **k):
            out = orig(*a, **k)
            drafts.extend(out[0].tolist())
            return out

        g.sessions["distilled"].propose = spy
        while not g.done:
            g.step()
        assert g.result().token_ids == ref
        assert drafts and set(drafts) <= kept  # it drafts only from its reduced vocabulary


def _greedy_answer(model, tok, prompt: list[int], n: int) -> list[int]:
    """prompt + the model's own one-by-one greedy answer of up to n tokens, ended at EOS (included)."""
    ref = model.generate(torch.tensor([prompt], device=model.device), do_sample=False, max_new_tokens=n,
                         pad_token_id=tok.eos_token_id)[0].tolist()
    if tok.eos_token_id in ref[len(prompt):]:
        ref = ref[: len(prompt) + ref[len(prompt):].index(tok.eos_token_id) + 1]
    return ref


def _jsonl(root, texts):
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return str(path)


def test_feature_head_distils_loads_and_keeps_output_exact(target4, tok, tmp_path, capsys):
    """`--init feature` (the default): an EAGLE-like head on the target's hidden states."""
    root = tmp_path
    save_models(root, target4, tok, close_noise=None)
    d = Distiller(target4, tok, TEXTS, DistillSettings(out=str(root / "f0"), init="feature", steps=40, seq_len=32,
                                                       batch=4, lr=3e-3, vocab=24), progress=False)
    d.run()
    assert sum(d.losses[-5:]) / 5 < 0.7 * sum(d.losses[:5]) / 5
    code = main(["distill", "--target", str(root / "target"), "--prompts", _jsonl(root, TEXTS), "--held-out", "2",
                 "--out", str(root / "feat"), "--steps", "30", "--seq-len", "32", "--batch", "4", "--lr", "3e-3",
                 "--vocab", "24", "--validate-tokens", "24"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["validation"]["k"] == 4 and summary["validation"]["mean_acceptance_length"] >= 1.0
    assert not (root / "feat" / "config.json").exists()  # only the head is stored, not a model
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(root / "target")},
        "drafters": [{"type": "feature", "name": "feat", "path": str(root / "feat")}], "engine": {"device": "cpu"}})
    engine = build_engine(cfg)
    # the head's arithmetic in bf16: other drafts, the same output
    engine16 = build_engine(cfg.model_copy(update={"drafters": [cfg.drafters[0].model_copy(update={"dtype": "bf16"})]}))
    assert engine16.drafters["feat"].out_rows.dtype == torch.bfloat16
    for text in ["def add(a", "the cat", "qq"]:
        ids = tok(text).input_ids
        ref = target4.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
        assert engine.generate(ids, SamplingParams(max_tokens=30), Arm("feat", 4)).token_ids == ref
        assert engine16.generate(ids, SamplingParams(max_tokens=30), Arm("feat", 4)).token_ids == ref
    # `full_information: false`: the head costs nothing in rounds where another drafter is played
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(root / "target")}, "engine": {"device": "cpu"},
        "drafters": [{"type": "ngram"}, {"type": "feature", "name": "feat", "path": str(root / "feat"),
                                          "full_information": False}]})
    records = build_engine(cfg).generate(tok("the cat").input_ids, SamplingParams(max_tokens=20), Arm("ngram", 3)).records
    assert records and all("feat" not in r.per_drafter for r in records)
    # rerunning the finished run with --weights int4 stores the same head again, in 4 bits, still lossless
    before = (root / "feat" / "head.safetensors").stat().st_size
    assert main(["distill", "--target", str(root / "target"), "--prompts", _jsonl(root, TEXTS), "--held-out", "2",
                 "--out", str(root / "feat"), "--steps", "30", "--seq-len", "32", "--weights", "int4",
                 "--validate-tokens", "24"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 30  # nothing trained again
    assert json.loads((root / "feat" / "draftpick_feature.json").read_text())["weights"] == "int4"
    assert (root / "feat" / "head.safetensors").stat().st_size < 0.7 * before
    engine4 = build_engine(cfg.model_copy(update={"drafters": [cfg.drafters[1]]}))
    for text in ["def add(a", "the cat"]:
        ids = tok(text).input_ids
        ref = target4.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
        assert engine4.generate(ids, SamplingParams(max_tokens=30), Arm("feat", 4)).token_ids == ref


def test_feature_head_for_another_target_is_refused(target4, tok, tmp_path, capsys):
    save_models(tmp_path, target4, tok, close_noise=None)
    other = tiny_model(seed=3, layers=2, hidden=32)
    feature_drafter(other, tok, tmp_path / "other-head", steps=2)
    cfg = {"target": {"name": "t", "path": str(tmp_path / "target")},
           "drafters": [{"type": "feature", "name": "feat", "path": str(tmp_path / "other-head")}],
           "engine": {"device": "cpu"}}
    with pytest.raises(ValueError, match="was made for a target with .*hidden_size.*32"):
        build_engine(DraftpickConfig.model_validate(cfg))
    cfg["drafters"][0]["path"] = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a feature drafter directory"):
        build_engine(DraftpickConfig.model_validate(cfg))
    assert main(["distill", "--target", str(tmp_path / "target"), "--out", str(tmp_path / "o"), "--steps", "1",
                 "--prompts", _jsonl(tmp_path, TEXTS), "--init", str(tmp_path / "other-head")]) == 2
    assert "was made for a target with" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["target-layers:1", "feature"])
def test_resume_continues_from_the_checkpoint(target4, tok, tmp_path, init):
    s = dict(out=str(tmp_path / "d"), init=init, seq_len=32, batch=2, vocab=24, checkpoint_every=2)
    Distiller(target4, tok, TEXTS, DistillSettings(steps=4, **s), progress=False).run()
    again = Distiller(target4, tok, TEXTS, DistillSettings(steps=7, **s), progress=False)
    assert again.step == 4
    assert again.run()["steps"] == 7 and len(again.losses) == 3


@pytest.mark.parametrize("init", ["target-layers:1", "feature"])
def test_bf16_student_autocasts_its_products_keeps_fp32_weights_and_learns(target4, tok, tmp_path, init):
    d = Distiller(target4, tok, TEXTS, DistillSettings(out=str(tmp_path / "d"), init=init, steps=40, seq_len=32,
                                                       batch=4, lr=3e-3, vocab=24, student_dtype="bf16"),
                  progress=False)
    seen = set()
    linears = [m for m in d.student.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    for m in linears:
        m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    d.run()
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    assert sum(d.losses[-5:]) / 5 < 0.7 * sum(d.losses[:5]) / 5
    with pytest.raises(ValueError, match="--student-dtype must be fp32 or bf16"):
        DistillSettings(out=str(tmp_path / "e"), steps=1, student_dtype="fp16")


def test_bad_inputs_fail_with_clear_messages(target4, tok, tmp_path, capsys):
    save_models(tmp_path, target4, tok, close_noise=None)
    base = ["distill", "--target", str(tmp_path / "target"), "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main(base + ["--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert "neither a file nor a set" in capsys.readouterr().err
    assert main(base + ["--prompts", _jsonl(tmp_path, TEXTS), "--held-out", "100"]) == 2
    assert "need more than --held-out 100" in capsys.readouterr().err
    tiny_model(seed=1, vocab=50).save_pretrained(tmp_path / "other")  # another vocabulary
    assert main(base + ["--prompts", _jsonl(tmp_path, TEXTS), "--init", str(tmp_path / "other")]) == 2
    assert "has a vocabulary of 50 tokens but the target has" in capsys.readouterr().err
    assert main(["distill", "--target", str(tmp_path / "target"), "--out", str(tmp_path / "o"),
                 "--prompts", _jsonl(tmp_path, TEXTS)]) == 2
    assert "give --steps or --minutes" in capsys.readouterr().err
    assert main(base + ["--prompts", _jsonl(tmp_path, TEXTS), "--init", "layers:2"]) == 2
    assert "--init 'layers:2' is not a drafter directory (and not feature or target-layers:N)" in capsys.readouterr().err
    assert main(base + ["--prompts", _jsonl(tmp_path, TEXTS), "--generate", "4", "--generate-minutes", "0"]) == 2
    assert "--generate-minutes must be > 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--prompts", _jsonl(tmp_path, TEXTS), "--device", "cuda"]) == 2
        assert "cuda asked for but no GPU is visible" in capsys.readouterr().err


def test_traffic_capture_is_opt_in_and_bounded(target4, tok, tmp_path):
    save_models(tmp_path, target4, tok, close_noise=None)
    cap = tmp_path / "cap" / "traffic.jsonl"
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(tmp_path / "target")}, "drafters": [{"type": "ngram"}],
        "engine": {"device": "cpu", "capture_path": str(cap), "capture_max_bytes": 600}})
    engine = build_engine(cfg)
    outs = [engine.generate(tok(p).input_ids, SamplingParams(max_tokens=20, ignore_eos=True), Arm("ngram", 3)).token_ids
            for p in ["abc", "def", "ghi", "jkl", "mno", "pqr"]]
    lines = [json.loads(l) for l in cap.read_text().splitlines()]
    assert 0 < len(lines) < 6 and cap.stat().st_size <= 600
    assert lines[0]["token_ids"] == outs[0] and lines[0]["prompt_token_ids"] == tok("abc").input_ids
    # and distill reads captured traffic as training text
    from draftpick.training.datasets import training_items

    items = training_items(str(cap), 10, tok)
    assert items[0]["text"] == tok.decode(lines[0]["prompt_token_ids"] + lines[0]["token_ids"])


def test_traffic_capture_to_a_redis_stream_is_bounded_and_readable(target4, tok, tmp_path, redis_server):
    save_models(tmp_path, target4, tok, close_noise=None)
    port = redis_server.connection_pool.connection_kwargs["port"]
    url = f"redis://127.0.0.1:{port}/0#draftpick-capture-test"
    redis_server.delete("draftpick-capture-test")
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(tmp_path / "target")}, "drafters": [{"type": "ngram"}],
        "engine": {"device": "cpu", "capture_stream": url, "capture_max_entries": 2}})
    engine = build_engine(cfg)
    outs = [engine.generate(tok(p).input_ids, SamplingParams(max_tokens=12, ignore_eos=True), Arm("ngram", 3)).token_ids
            for p in ["abc", "def", "ghi"]]
    assert redis_server.xlen("draftpick-capture-test") == 2  # the newest two are kept
    from draftpick.training.datasets import training_items

    items = training_items(url, 10, tok)
    assert [it["text"] for it in items] == [tok.decode(tok(p).input_ids + o) for p, o in zip(["def", "ghi"], outs[1:])]
    with pytest.raises(ValueError, match="capture_path or capture_stream, not both"):
        DraftpickConfig.model_validate({"target": {"name": "t", "path": "x"}, "engine": {
            "capture_stream": url, "capture_path": str(tmp_path / "c.jsonl")}})
    with pytest.raises(ValueError, match="redis://host:port/db#stream"):
        DraftpickConfig.model_validate({"target": {"name": "t", "path": "x"}, "engine": {"capture_stream": "redis://x"}})
    with pytest.raises(ValueError, match="is empty or missing"):
        training_items(f"redis://127.0.0.1:{port}/0#nothing-here", 10, tok)


def test_generated_answers_are_the_targets_greedy_output_and_resume(target4, tok, tmp_path):
    """--generate's data: batched, left-padded answers equal the target's own greedy output one by one."""
    prompts = [tok(t).input_ids for t in ["def add(a", "the cat sat on", "x = 1\ny", "qq", "the"]]
    path = tmp_path / SEQUENCES_FILE
    seqs = generate_sequences(target4, tok, prompts, path, 12, batch=2, progress=False)
    assert len(seqs) == len(prompts)
    for p, seq in zip(sorted(prompts, key=len), seqs):
        assert seq == _greedy_answer(target4, tok, p, 12)
    lines = path.read_text().splitlines()
    assert [json.loads(l)["prompt_token_ids"] for l in lines] == sorted(prompts, key=len)
    path.write_text(lines[0] + "\n")  # interrupted after the first answer: the rest is generated again
    assert generate_sequences(target4, tok, prompts, path, 12, batch=2, progress=False) == seqs
    assert path.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="holds answers to other prompts"):
        generate_sequences(target4, tok, [tok("zz").input_ids], path, 12, progress=False)


def test_teacher_cache_skips_the_teachers_forward_on_later_passes(target4, tok, tmp_path):
    rows = []
    hook = target4.model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    try:
        runs = {}
        for gb in (1.0, 0.0):
            rows.clear()
            d = Distiller(target4, tok, TEXTS, DistillSettings(out=str(tmp_path / f"d{gb}"), steps=1, seq_len=32,
                                                               batch=1, vocab=24, teacher_cache_gb=gb), progress=False)
            windows = len(d.stream) // 32  # windows in one pass over the text
            d.s = DistillSettings(out=d.s.out, steps=3 * windows, seq_len=32, batch=1, vocab=24,
                                  teacher_cache_gb=gb)
            d.run()
            runs[gb] = (sum(rows), d.losses)
    finally:
        hook.remove()
    assert runs[1.0][0] == windows  # three passes, the teacher ran once per window
    assert runs[0.0][0] == 3 * windows  # no cache: every pass runs it
    assert runs[1.0][1] == pytest.approx(runs[0.0][1], rel=2e-2)  # the fp16 cache trains the same


def test_answers_only_loss_prompt_context_and_widening_a_continued_vocabulary(target4, tok, tmp_path):
    """--loss-on answers (EAGLE's loss mask): prompts are read as context, only answer tokens are learnt."""
    from draftpick.training.datasets import training_items
    from draftpick.training.distill import _kl

    digits = set(tok("0123456789+-*/()=").input_ids) | {tok.eos_token_id}  # answers use only these, prompts never
    pairs = [(tok(p).input_ids, tok(a).input_ids) for p, a in
             [("what is one plus two", "1+2=3"), ("four times five less six", "(4*5)-6=14"),
              ("eight over two", "8/2=4"), ("seven nines less nothing", "7*9-0=63")] * 6]
    cap = tmp_path / "traffic.jsonl"
    cap.write_text("\n".join(json.dumps({"prompt_token_ids": p, "token_ids": a}) for p, a in pairs))
    items = training_items(str(cap), 100, tok)  # captured traffic keeps its prompt / answer split
    assert [it["split"] for it in items] == pairs
    d = Distiller(target4, tok, [it["split"] for it in items],
                  DistillSettings(out=str(tmp_path / "a"), steps=60, seq_len=16, batch=4, lr=3e-3, vocab=16,
                                  unroll=2, loss_on="answers"), progress=False)
    assert set(d.kept) <= digits  # the reduced vocabulary is counted on the answers
    for _ in range(5):
        x, starts = d.batch()
        w = d.weights(starts)
        nxt = [[int(t) in digits for t in row[1:]] for row in x]
        assert w[:, :-1].tolist() == [[float(a) for a in r] for r in nxt]  # learnt where an answer token follows
        assert 0 < w.sum() < w.numel()
    d.pos = 0
    d.run()
    assert sum(d.losses[-5:]) < 0.7 * sum(d.losses[:5])
    # the weighted KL is the mean over the weighted positions; what the others hold does not count
    s_logits, t_logp = torch.randn(2, 5, 7), torch.log_softmax(torch.randn(2, 5, 7), -1)
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 1, 0, 1]])
    noisy = torch.where(mask[..., None] > 0, s_logits, s_logits + 50 * torch.randn(2, 5, 7))
    assert _kl(noisy, t_logp, mask) == pytest.approx(_kl(s_logits[mask > 0], t_logp[mask > 0]).item(), rel=1e-5)
    assert _kl(s_logits, t_logp, torch.ones(2, 5)) == pytest.approx(_kl(s_logits, t_logp).item(), rel=1e-6)
    with pytest.raises(ValueError, match="--loss-on answers needs prompt \\+ answer items"):
        Distiller(target4, tok, TEXTS, DistillSettings(out=str(tmp_path / "b"), steps=1, seq_len=16, vocab=16,
                                                       loss_on="answers"), progress=False)
    with pytest.raises(ValueError, match="--loss-on must be all or answers"):
        DistillSettings(out=str(tmp_path / "c"), steps=1, loss_on="prompts")
    # --prompt-context N keeps the last N prompt tokens of each item: fewer teacher tokens, the same answers
    short = Distiller(target4, tok, pairs, DistillSettings(out=str(tmp_path / "s"), steps=1, seq_len=16, vocab=16,
                                                         loss_on="answers", prompt_context=3), progress=False)
    assert short.stream == [t for p, a in pairs for t in p[-3:] + a + [tok.eos_token_id]]
    # continuing a drafter keeps its vocabulary; --vocab widens it with the most frequent tokens it lacks
    kept = d.kept
    wide = Distiller(target4, tok, pairs, DistillSettings(out=str(tmp_path / "w"), init=str(tmp_path / "a"), steps=2,
                                                        seq_len=16, vocab=24), progress=False)
    assert set(kept) < set(wide.kept) and len(wide.kept) == 24
    wide.run()
    assert json.loads((tmp_path / "w" / "draftpick_feature.json").read_text())["kept"] == wide.kept
    same = Distiller(target4, tok, pairs, DistillSettings(out=str(tmp_path / "k"), init=str(tmp_path / "a"), steps=1,
                                                        seq_len=16), progress=False)
    assert same.kept == kept
    with pytest.raises(ValueError, match="only widens"):
        Distiller(target4, tok, pairs, DistillSettings(out=str(tmp_path / "n"), init=str(tmp_path / "w"), steps=1,
                                                       seq_len=16, vocab=20), progress=False)


def test_distill_generate_trains_on_the_targets_answers(target4, tok, tmp_path, capsys):
    save_models(tmp_path, target4, tok, close_noise=None)
    code = main(["distill", "--target", str(tmp_path / "target"), "--prompts", _jsonl(tmp_path, TEXTS), "--held-out", "2",
                 "--out", str(tmp_path / "g"), "--generate", "10", "--generate-batch", "4", "--steps", "3",
                 "--seq-len", "16", "--batch", "2", "--vocab", "24", "--validate-tokens", "8"])
    assert code == 0
    lines = [json.loads(l) for l in (tmp_path / "g" / SEQUENCES_FILE).read_text().splitlines()]
    assert len(lines) == len(TEXTS) - 2 and all(0 < len(d["token_ids"]) <= 10 for d in lines)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["validation"]["mean_acceptance_length"] >= 1.0
    assert main(["distill", "--target", str(tmp_path / "target"), "--prompts", _jsonl(tmp_path, TEXTS), "--out",
                 str(tmp_path / "h"), "--generate", "-1", "--steps", "1"]) == 2
    assert "--generate must be >= 0" in capsys.readouterr().err


def test_generate_minutes_stops_answering_and_a_later_run_resumes(target4, tok, tmp_path):
    prompts = [tok(t).input_ids for t in ["def add(a", "the cat sat on", "x = 1\ny", "qq"]]
    path = tmp_path / SEQUENCES_FILE
    assert generate_sequences(target4, tok, prompts, path, 6, batch=2, progress=False, minutes=1e-9) == []
    assert not path.read_text()  # stopped before the first batch: nothing half-written
    full = generate_sequences(target4, tok, prompts, path, 6, batch=2, progress=False)
    assert len(full) == len(prompts) and len(path.read_text().splitlines()) == len(prompts)


def test_the_gpu_script_distils_both_heads_and_passes_further_distill_arguments_on(target4, tok, tmp_path):
    save_models(tmp_path, target4, tok, close_noise=None)
    for name in ("chat", "code"):
        (tmp_path / name).mkdir()
    chat, code = _jsonl(tmp_path / "chat", TEXTS[1::3]), _jsonl(tmp_path / "code", TEXTS[0::3])
    out = tmp_path / "heads"
    # the defaults say --batch 64, int8 weights and 1 minute of training: the arguments after TRAIN_MIN win
    run = subprocess.run(["bash", str(REPO / "deploy" / "distill-gpu.sh"), str(tmp_path / "target"), chat, code, str(out),
                          "1", "1", "--steps", "2", "--seq-len", "16", "--batch", "2", "--vocab", "24",
                          "--loss-on", "answers", "--weights", "int4"],
                         cwd=REPO, env={**os.environ, "DEVICE": "cpu", "GENERATE": "6"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + "".join(f.read_text() for f in out.glob("*.log"))
    for name, prompts in [("chat", TEXTS[1::3]), ("code", TEXTS[0::3])]:
        summary = json.loads((out / f"{name}.log").read_text().strip().splitlines()[-1])
        assert summary["steps"] == 2
        assert json.loads((out / name / "draftpick_feature.json").read_text())["weights"] == "int4"
        assert len((out / name / SEQUENCES_FILE).read_text().splitlines()) == len(prompts)  # the target answered each
    usage = subprocess.run(["bash", str(REPO / "deploy" / "distill-gpu.sh"), "only-a-target"], capture_output=True, text=True)
    assert usage.returncode == 2 and "DISTILL_ARGS" in usage.stderr


def test_stdlib_defs_prompt_with_a_signature_and_docstring_and_train_on_the_function():
    import ast

    from draftpick.training.datasets import training_items

    items = training_items("stdlib-defs", 300)
    assert len(items) == 300
    for it in items:
        prompt, text = it["input"]["prompt"], it["text"]
        assert text.startswith(prompt) and len(text) > len(prompt)
        ast.parse(text)  # a whole, valid piece of code
        assert prompt.rstrip().endswith(('"', "'"))  # ends on the docstring: the model writes the body


def test_sharegpt_turns_prompt_with_the_conversation_so_far_and_skip_the_benchmarks_conversations():
    from draftpick.bench.prompts import load_domain
    from draftpick.training.datasets import training_items

    items = training_items("sharegpt-turns", 200)
    assert len(items) == 200
    bench_first_turns = {p["messages"][0]["content"] for p in load_domain("sharegpt", 200)}
    for it in items:
        msgs = it["input"]["messages"]
        assert len(msgs) >= 3 and len(msgs) % 2 == 1
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"]
        assert it["text"].startswith("\n".join(m["content"] for m in msgs))
        assert msgs[0]["content"] not in bench_first_turns  # the benchmarks' conversations are held out
    # a conversation yields its turns in order: a later item extends an earlier one
    assert any(b["input"]["messages"][: len(a["input"]["messages"])] == a["input"]["messages"]
               for a, b in zip(items, items[1:]))


def test_training_sets_written_as_jsonl_read_back_as_the_same_items(tmp_path, capsys):
    from draftpick.training.datasets import training_items, training_lines
    from draftpick.workers.inputs import write_jsonl

    out = tmp_path / "items.jsonl"
    write_jsonl(out, training_lines("sharegpt-turns,stdlib-defs", 30))
    items = training_items(str(out), 1000)
    assert len(items) == 60 and items == training_items("sharegpt-turns,stdlib-defs", 30)
    assert main(["prompts", "--training", "sharegpt-turns", "--max-items", "5", "--out", str(out)]) == 0
    assert training_items(str(out), 1000) == training_items("sharegpt-turns", 5)
    assert main(["prompts", "--training", "sharegpt,nope", "--out", str(out)]) == 2
    assert "unknown set 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_distill_on_cuda_matches_the_cpu_path_and_loads_on_cpu(target4, tok, tmp_path):
    """--device cuda: answers equal the target's own greedy output there, the loss falls, and the head
    trained there loads on the CPU and keeps the CPU engine's output exact."""
    cuda = tiny_model(seed=0, layers=4).to("cuda")
    prompts = [tok(t).input_ids for t in ["def add(a", "the cat sat on", "x = 1\ny", "qq", "the"]]
    seqs = generate_sequences(cuda, tok, prompts, tmp_path / SEQUENCES_FILE, 12, batch=2, progress=False)
    for p, seq in zip(sorted(prompts, key=len), seqs):
        assert seq == _greedy_answer(cuda, tok, p, 12)
    s = dict(out=str(tmp_path / "f"), seq_len=32, batch=4, lr=3e-3, vocab=24, device="cuda", checkpoint_every=20)
    d = Distiller(cuda, tok, TEXTS, DistillSettings(steps=40, teacher_dtype="bf16", **s), progress=False)
    d.run()
    assert sum(d.losses[-5:]) / 5 < 0.7 * sum(d.losses[:5]) / 5
    assert Distiller(cuda, tok, TEXTS, DistillSettings(steps=41, **s), progress=False).run()["steps"] == 41  # resumes
    with pytest.raises(ValueError, match="the target is on cpu"):
        Distiller(target4, tok, TEXTS, DistillSettings(steps=1, **s), progress=False)
    save_models(tmp_path, target4, tok, close_noise=None)
    cfg = DraftpickConfig.model_validate({
        "target": {"name": "t", "path": str(tmp_path / "target")},
        "drafters": [{"type": "feature", "name": "feat", "path": str(tmp_path / "f")}], "engine": {"device": "cpu"}})
    engine = build_engine(cfg)
    for text in ["def add(a", "the cat", "qq"]:
        ids = tok(text).input_ids
        ref = target4.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=30)[0, len(ids):].tolist()
        assert engine.generate(ids, SamplingParams(max_tokens=30), Arm("feat", 4)).token_ids == ref


def test_head_dtype_auto_is_bf16_only_where_it_is_native(monkeypatch):
    from draftpick.workers.drafters.feature import drafter as feature

    assert feature.head_dtype("fp32", "cuda") == torch.float32 and feature.head_dtype("bf16", "cpu") == torch.bfloat16
    assert feature.head_dtype("auto", "cuda") == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(feature, "native_bf16_cpu", lambda: native)
        assert feature.head_dtype("auto", "cpu") == want


def _noisy_head(target):
    """A feature head for `target` whose weights are moved off the target's (what storage must keep)."""
    from draftpick.workers.drafters.feature import FeatureHead

    head = FeatureHead.from_target(target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


def test_heads_are_stored_as_int8_rows_and_earlier_bf16_heads_still_load(target4, tok, tmp_path):
    """int8 storage: half the bytes of bf16, every weight within half a step of its row's scale."""
    from draftpick.workers.drafters.feature import HEAD_FILE, load_head, save_head

    head = _noisy_head(target4)
    save_head(tmp_path / "q", head, [0, 1, 2], target4)
    save_head(tmp_path / "b", head, [0, 1, 2], target4, weights="bf16")
    q_size, b_size = ((tmp_path / d / "head.safetensors").stat().st_size for d in "qb")
    assert q_size < 0.6 * b_size
    want = head.trained_state()
    loaded, kept = load_head(tmp_path / "q", target4)
    assert kept == [0, 1, 2]
    for k, v in loaded.trained_state().items():
        w = want[k].detach()
        if w.dim() == 2:
            step = w.abs().amax(1, keepdim=True) / 127
            assert ((v - w).abs() <= step / 2 + 1e-6).all(), k
        else:
            assert torch.allclose(v, w, rtol=1e-2, atol=1e-3), k
    meta = json.loads((tmp_path / "b" / HEAD_FILE).read_text())
    meta["format"] = 1  # what earlier versions wrote: bf16 weights, no "weights" field
    del meta["weights"]
    (tmp_path / "b" / HEAD_FILE).write_text(json.dumps(meta))
    old, _ = load_head(tmp_path / "b", target4)
    for k, v in old.trained_state().items():
        assert torch.allclose(v, want[k].detach(), rtol=1e-2, atol=1e-3), k
    meta["format"] = 9
    (tmp_path / "b" / HEAD_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 9, this version reads 1 and 2"):
        load_head(tmp_path / "b", target4)


def test_heads_stored_as_int4_groups_are_within_half_a_step_of_each_weight(target4, tmp_path):
    """int4 storage: 4-bit codes in groups of 64 with a scale and minimum each, ~0.56 of int8's bytes."""
    from draftpick.workers.drafters.feature.storage import GROUP, load_head, save_head

    head = _noisy_head(target4)  # hidden size 64: every matrix splits into groups of 64
    save_head(tmp_path / "q8", head, [0, 1, 2], target4)
    save_head(tmp_path / "q4", head, [0, 1, 2], target4, weights="int4")
    sizes = [(tmp_path / d / "head.safetensors").stat().st_size for d in ("q8", "q4")]
    assert sizes[1] < 0.65 * sizes[0]
    loaded, kept = load_head(tmp_path / "q4", target4)
    assert kept == [0, 1, 2] and json.loads((tmp_path / "q4" / "draftpick_feature.json").read_text())["weights"] == "int4"
    want = head.trained_state()
    quantised = 0
    for k, v in loaded.trained_state().items():
        w = want[k].detach()
        if w.dim() == 2:
            assert w.shape[1] % GROUP == 0, k
            g = w.reshape(w.shape[0], -1, GROUP)
            step = ((g.amax(-1) - g.amin(-1)) / 15)[..., None]
            err = (v.reshape(g.shape) - g).abs()
            assert (err <= 0.52 * step + 1e-3 * g.amin(-1).abs()[..., None] + 1e-6).all(), k
            assert not torch.equal(v, w)  # really stored in 4 bits
            quantised += 1
        else:
            assert torch.allclose(v, w, rtol=1e-2, atol=1e-3), k
    assert quantised >= 7  # fc and the layer's seven projections
    with pytest.raises(ValueError, match="weights must be one of int8, int4, bf16"):
        save_head(tmp_path / "x", head, [0], target4, weights="int2")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_lean_head_step_computes_what_the_transformers_layer_computes(target4, dtype, tol):
    """Drafting runs the head's layer without transformers (workers.drafters.lean): same features,
    fed in chunks and one at a time, with speculative entries rolled back between."""
    from draftpick.workers.drafters.feature import FeatureDrafter, FeatureHead
    from draftpick.workers.models import rollback

    torch.manual_seed(3)
    head = FeatureHead.from_target(target4)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    drafter = FeatureDrafter("f", head, target4, list(range(10)), dtype=dtype)
    assert drafter.lean is not None and type(drafter.new_cache()).__name__ == "LeanCache"
    slow = FeatureDrafter("g", head, target4, list(range(10)), dtype=dtype)
    slow.lean = None  # the transformers path, on the same weights
    d = target4.config.hidden_size
    feats, tokens = torch.randn(40, d), torch.randint(1, 30, (40,)).tolist()
    caches = [drafter.new_cache(), slow.new_cache()]
    outs = [[], []]
    # a prompt chunk, single steps, a speculative run rolled back, then a chunk after it
    plan = [(0, 17, False), (17, 18, False), (18, 19, False), (19, 24, True), (19, 20, False), (20, 31, False), (31, 40, False)]
    for start, end, speculative in plan:
        for i, (dr, cache) in enumerate(zip((drafter, slow), caches)):
            out = dr.step(cache, feats[start:end], tokens[start:end])
            assert out.shape == (end - start, d) and out.dtype == dtype
            if speculative:
                rollback(cache, start)
            else:
                outs[i].append(out.float())
    lean, ref = torch.cat(outs[0]), torch.cat(outs[1])
    assert lean.shape == (40, d) and ref.abs().mean() > 0.1
    assert (lean - ref).abs().max() <= tol * ref.abs().max(), (lean - ref).abs().max()
