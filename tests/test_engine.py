"""The engine on tiny real models: greedy equality, sampling distribution, KV rollback, sync, stops."""
import copy

import numpy as np
import pytest
import torch

from draftpick.policies.types import Arm
from tiny import VOCAB, chi2_pvalue, feature_drafter, noisy_copy, tiny_model, tiny_sliding_model
from draftpick.workers.batched import batched_forward
from draftpick.workers.drafters.feature import FeatureDrafter
from draftpick.workers.drafters.model import ModelDrafter
from draftpick.workers.drafters.ngram import NgramDrafter
from draftpick.workers.drafters.suffix import SuffixDrafter
from draftpick.workers.engine import SpeculativeEngine
from draftpick.workers.models import forward, mkl_packing, new_cache
from draftpick.workers.sampling import SamplingParams, probs_from_logits

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "the cat sat on the mat. the cat", "x = 1\ny = 2\n"]


@pytest.fixture(scope="module")
def engine(target, tok, tmp_path_factory):
    # the feature head is distilled on the target's own text after these prompts (tests/tiny.py)
    head = feature_drafter(target, tok, tmp_path_factory.mktemp("feature") / "head",
                           PROMPTS + [tok.decode(sampling_context(target, tok))])
    drafters = {
        "ngram": NgramDrafter(),
        "suffix": SuffixDrafter(),
        "close": ModelDrafter("close", noisy_copy(target, 0.05)),  # agrees often
        "far": ModelDrafter("far", tiny_model(seed=7)),  # an unrelated model
        "feat": FeatureDrafter.load("feat", str(head), target),  # drafts from the target's hidden states
        # the same drafters behind a confidence gate: they draft only while their top-1 probability reaches
        # 0.12, which in the sampling test below skips some first tokens and not others
        "featgate": FeatureDrafter.load("featgate", str(head), target, min_confidence=0.12),
        "closegate": ModelDrafter("closegate", noisy_copy(target, 0.05), min_confidence=0.12),
    }
    return SpeculativeEngine(target, tok, drafters, verify_pad_multiple=4)  # padded verification (the CPU default but for fp32)


def sampling_context(target, tok):
    """The target's own greedy text, then its start again: the n-gram drafter proposes what followed."""
    base = tok("ab").input_ids
    return base + hf_greedy(target, base, 30) + base


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("drafter", ["none", "ngram", "suffix", "close", "far", "feat", "featgate", "closegate"])
def test_greedy_output_equals_transformers_generate(engine, target, tok, drafter):
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ref = hf_greedy(target, ids, 48)
        for k in ([0] if drafter == "none" else [1, 2, 3, 5, 8]):
            res = engine.generate(ids, SamplingParams(max_tokens=48), Arm(drafter, k))
            assert res.token_ids == ref, (drafter, k, prompt)


def test_small_batch_linears_compute_what_linear_computes_on_the_kernel_each_layer_chose(monkeypatch):
    from draftpick.workers import models

    torch.manual_seed(0)
    wide, narrow = torch.nn.Linear(64, models.WIDE_LAYER), torch.nn.Linear(64, 96)
    other = torch.nn.Linear(64, 96).to(torch.bfloat16)
    model = torch.nn.Sequential(wide, narrow, other)
    ref = {m: (m.weight.detach().clone(), m.bias.detach().clone()) for m in (wide, narrow)}
    assert models.small_batch_linears(model) == 2 and "forward" not in vars(other)  # bf16 is left alone
    assert set(wide.kernels[1:]) <= {"linear", "w_xt", "x_wt", "packed"}
    assert set(narrow.kernels[1:]) <= {"linear", "w_xt", "packed"}
    calls = []
    stock = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or stock(*a))
    assert hasattr(wide, "weight_t") == ("x_wt" in wide.kernels) and not hasattr(narrow, "weight_t")
    assert hasattr(narrow, "weight_packed") == ("packed" in narrow.kernels)
    wide.register_buffer("weight_t", wide.weight.detach().t().contiguous(), persistent=False)
    packed = models.mkl_packing() and all(models._pack(layer) for layer in (wide, narrow))
    for layer in (wide, narrow):
        paths = ("linear", "w_xt", "x_wt" if layer is wide else "w_xt", "packed" if packed else "linear")
        layer.kernels = tuple(paths[r % 4] for r in range(models.FEW_ROWS + 1))  # every path, whatever was chosen
        for rows in range(1, models.FEW_ROWS + 3):
            for shape in ((rows, 64), (1, rows, 64)):
                x = torch.randn(*shape)
                calls.clear()
                with torch.inference_mode():
                    y = layer(x)
                assert y.shape == (*shape[:-1], layer.out_features)
                torch.testing.assert_close(y, stock(x, *ref[layer]), rtol=1e-5, atol=1e-5)
                stock_path = rows > models.FEW_ROWS or layer.kernels[rows] == "linear"
                assert bool(calls) == stock_path, (layer.out_features, rows)  # the other paths ran
        calls.clear()
        layer(torch.randn(2, 64))  # gradients on (training): `linear`, which autograd knows
        assert calls


def test_a_deep_copy_of_a_model_with_small_batch_linears_is_plain_and_computes_with_its_own_weights():
    """A deep copy (tests' noisy copies of a target) leaves out the layers' packed and transposed
    copies of W and their kernels: MKL's packed tensor cannot be copied, and the copy's weights may
    change, which those copies would not follow."""
    import copy

    from draftpick.workers import models

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, models.WIDE_LAYER), torch.nn.Linear(models.WIDE_LAYER, 96))
    assert models.small_batch_linears(model) == 2
    wide, narrow = model
    wide.register_buffer("weight_t", wide.weight.detach().t().contiguous(), persistent=False)
    packed = models.mkl_packing() and models._pack(narrow)
    wide.kernels = ("x_wt",) * (models.FEW_ROWS + 1)  # every copy of W read, whatever was chosen
    narrow.kernels = ("packed" if packed else "w_xt",) * (models.FEW_ROWS + 1)
    twin = copy.deepcopy(model)
    for layer in twin:
        assert type(layer) is torch.nn.Linear and not {"kernels", "forward", "weight_packed"} & set(vars(layer))
        assert "weight_t" not in layer._buffers and set(layer.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        stock = torch.nn.functional.linear
        want = stock(stock(x, twin[0].weight, twin[0].bias), twin[1].weight, twin[1].bias)
        torch.testing.assert_close(twin(x), want)
        assert not torch.allclose(model(x), want)  # the original keeps its own weights and kernels
    assert wide.kernels[1] == "x_wt" and hasattr(narrow, "weight_packed") == packed


def test_calibration_keeps_the_fastest_product_per_row_count(monkeypatch):
    """Each row count takes the kernel the clock found fastest over the layers of a shape; counts
    between the timed ones take the choice of the count below."""
    from draftpick.workers import models

    now = [0.0]
    cost = {"linear": lambda r: 10.0, "w_xt": lambda r: 5.0 if r <= 3 else 20.0, "x_wt": lambda r: 8.0 if r >= 8 else 30.0}
    ran = []

    def kernel(name):
        def run(x, mod):
            ran.append((name, x.shape[0]))
            now[0] += cost[name](x.shape[0]) + (3.0 if len(ran) == 1 else 0.0)  # a slow first call: the warm-up
        return run
    monkeypatch.setattr(models, "KERNELS", {k: kernel(k) for k in cost})
    layers = [torch.nn.Linear(8, 4) for _ in range(3)]
    chosen = models.calibrate(layers, ["linear", "w_xt", "x_wt"], repeats=2, timer=lambda: now[0])
    assert len(chosen) == models.FEW_ROWS + 1
    rest = models.FEW_ROWS - 7  # row counts 8 .. FEW_ROWS
    assert chosen[1:4] == ("w_xt",) * 3 and chosen[4:8] == ("linear",) * 4 and chosen[8:] == ("x_wt",) * rest
    assert {r for _, r in ran} == set(models.CALIBRATED_ROWS)  # only those counts are timed, each over every layer
    assert len(ran) == 3 * len(models.CALIBRATED_ROWS) * 3 * len(layers)  # warm-up + 2 repeats, 3 kernels
    assert models.calibrate(layers, ["linear", "w_xt"], repeats=1, timer=lambda: now[0])[8:] == ("linear",) * rest


@pytest.mark.skipif(not mkl_packing(), reason="this PyTorch has no MKL packing")
def test_the_packed_product_rounds_each_row_the_same_whatever_the_row_count():
    """MKL's product on a packed weight (a small_batch_linears path) gives each row the same bits
    alone as among others, and the bits of `linear` from 16 rows on; `linear` alone does not
    (it multiplies fewer rows on another path)."""
    from draftpick.workers import models

    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536, bias=False)
    assert models._pack(layer)
    x = torch.randn(40, 576)
    with torch.inference_mode():
        together = models.KERNELS["packed"](x, layer)
        assert torch.equal(together, torch.nn.functional.linear(x, layer.weight))
        for rows in (1, 2, 5, 15, 16, 33):
            assert torch.equal(models.KERNELS["packed"](x[-rows:], layer), together[-rows:]), rows


def test_greedy_output_with_small_batch_linears_equals_transformers_generate(target, tok, monkeypatch):
    """The engine's CPU fp32 default changes how the target's linear layers multiply a few rows: greedy
    output, speculative or not, still equals transformers' greedy generate on the stock model, on
    every product a machine may choose (each row count here takes another)."""
    from draftpick.workers import models

    monkeypatch.setattr(models, "WIDE_LAYER", target.config.vocab_size)  # the tiny output layer takes the wide path
    fast = copy.deepcopy(target)
    linears = [m for m in fast.modules() if type(m) is torch.nn.Linear]
    assert models.small_batch_linears(fast) == len(linears)
    assert hasattr(fast.lm_head, "weight_t") == ("x_wt" in fast.lm_head.kernels)
    fast.lm_head.register_buffer("weight_t", fast.lm_head.weight.detach().t().contiguous(), persistent=False)
    packed = models.mkl_packing() and all(models._pack(m) for m in linears)
    for m in linears:
        paths = ("x_wt" if m is fast.lm_head else "w_xt", "w_xt", "linear", "packed" if packed else "linear")
        m.kernels = tuple(paths[r % 4] for r in range(models.FEW_ROWS + 1))
    engine = SpeculativeEngine(fast, tok, {"ngram": NgramDrafter(), "close": ModelDrafter("close", noisy_copy(target, 0.05))})
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ref = hf_greedy(target, ids, 48)
        assert hf_greedy(fast, ids, 48) == ref
        for arm in [Arm("none", 0)] + [Arm(d, k) for d in ("ngram", "close") for k in (1, 2, 3, 5, 8)]:
            assert engine.generate(ids, SamplingParams(max_tokens=48), arm).token_ids == ref, (arm, prompt)


@pytest.mark.parametrize("small_batch", [True, False])
def test_small_batch_linears_is_the_cpu_default_and_can_be_turned_off(target, tok, tmp_path, small_batch):
    from tiny import save_models
    from draftpick.workers.config import DraftpickConfig
    from draftpick.workers.factory import build_engine

    root = save_models(tmp_path, target, tok)
    cfg = {"target": {"name": "tiny", "path": str(root / "target")},
           "drafters": [{"type": "model", "name": "close", "path": str(root / "close")}],
           "engine": {"device": "cpu", **({} if small_batch else {"small_batch_linears": False})}}
    engine = build_engine(DraftpickConfig.model_validate(cfg))
    for model in (engine.target, engine.drafters["close"].model):
        changed = ["forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear]
        assert changed and all(c == small_batch for c in changed)
    assert engine.verify_pad_multiple == (1 if small_batch else 4)


def test_close_drafter_is_accepted_and_far_one_mostly_not(engine, tok):
    ids = tok(PROMPTS[0]).input_ids
    close = engine.generate(ids, SamplingParams(max_tokens=48), Arm("close", 4)).metrics()
    far = engine.generate(ids, SamplingParams(max_tokens=48), Arm("far", 4)).metrics()
    assert close["mean_acceptance_length"] > 2.0
    assert far["draft_acceptance_rate"] < close["draft_acceptance_rate"]


def test_kv_caches_hold_exactly_the_verified_tokens_after_each_round(engine, target, tok):
    ids = tok(PROMPTS[0]).input_ids
    g = engine.start(ids, SamplingParams(max_tokens=40), Arm("close", 5))
    rejected_rounds = 0
    while not g.done:
        g.step()
        if g.done:
            break
        # target cache: every verified token but the pending last one
        assert g.cache.get_seq_length() == len(g.ids) - 1
        # and it is the same cache a fresh prefill would give: next-token logits agree
        fresh = new_cache(target)
        expected = forward(target, fresh, g.ids)[-1]
        probe = forward(target, g.cache, [g.ids[-1]])[-1]
        g.cache.crop(-1)
        torch.testing.assert_close(probe, expected, rtol=1e-4, atol=1e-4)
        # drafter cache: a prefix of the verified tokens, never a rejected draft
        s = g.sessions["close"]
        assert s.fed == g.ids[: len(s.fed)] and s.cache.get_seq_length() == len(s.fed)
        if g.records:
            rejected_rounds += g.records[-1].accepted < g.records[-1].num_drafted
    assert rejected_rounds > 0  # the rollback path was exercised


def test_full_information_matches_each_drafters_own_predictions(engine, tok):
    """per_drafter[far][j] is 1 exactly where `far`, fed the verified prefix, predicts token j."""
    ids = tok(PROMPTS[0]).input_ids
    res = engine.generate(ids, SamplingParams(max_tokens=40), Arm("close", 3))
    far = engine.drafters["far"].model
    seq = res.prompt_token_ids + res.token_ids
    preds = forward(far, new_cache(far), seq).argmax(-1).tolist()  # preds[i] predicts seq[i + 1]
    pos = len(ids) + 1  # the first round verifies the token after the prefill token
    for i, r in enumerate(res.records):
        got = r.per_drafter["far"]
        if i < len(res.records) - 1:
            assert len(got) == r.accepted + 1 == r.emitted  # measured on every token the round verified
            assert r.per_drafter["close"] == r.accepted_per_pos  # the chosen one: its realised acceptance
        else:  # a stop may cut the last round: it counts only what it emitted, measures all it verified
            assert len(got) >= r.emitted and r.accepted <= r.emitted
        m = min(len(got), len(seq) - pos)
        want = [float(preds[pos + j - 1] == seq[pos + j]) for j in range(m)]
        assert got[:m] == want
        pos += r.emitted


def test_feature_drafter_drafts_from_the_targets_hidden_states(engine, target, tok):
    """The engine keeps the target's hidden states of the verified tokens; the feature drafter's
    draft at each round (k = 1) and its full-information acceptance when another drafter plays
    both equal the head run teacher-forced on the final sequence."""
    feat = engine.drafters["feat"]
    ids = tok(PROMPTS[0]).input_ids
    g = engine.start(ids, SamplingParams(max_tokens=40), Arm("feat", 1))
    while not g.done:
        g.step()
        if not g.done:
            fresh = forward(target, new_cache(target), g.ids[:-1], hidden=True)[1]
            torch.testing.assert_close(g.target_features.rows, fresh, rtol=1e-4, atol=1e-4)
    for arm in (Arm("feat", 1), Arm("close", 1)):
        res = engine.generate(ids, SamplingParams(max_tokens=40), arm)
        seq = res.prompt_token_ids + res.token_ids
        with torch.no_grad():
            f = target.model(input_ids=torch.tensor([seq])).last_hidden_state
            emb = target.get_input_embeddings()(torch.tensor([seq])).float()
            drafts = feat.logits(feat.head(f[:, :-1], emb[:, 1:])[0]).argmax(-1).tolist()  # [j] drafts seq[j + 2]
        pos, hits = len(ids) + 1, 0
        for r in res.records[:-1]:
            want = float(drafts[pos - 2] == seq[pos])
            assert r.per_drafter["feat"][0] == want
            hits += want
            pos += r.emitted
        assert hits > 0  # the head was trained: some drafts are right


def test_full_information_can_be_switched_off(target, tok):
    eng = SpeculativeEngine(target, tok, {"far": ModelDrafter("far", tiny_model(seed=7)), "ngram": NgramDrafter()}, full_information=False)
    res = eng.generate(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=30), Arm("ngram", 3))
    assert all("far" not in r.per_drafter for r in res.records)
    assert res.token_ids == hf_greedy(target, tok(PROMPTS[0]).input_ids, 30)
    # or for one drafter: it is measured only when played, the others still every round
    eng = SpeculativeEngine(target, tok, {"far": ModelDrafter("far", tiny_model(seed=7)), "ngram": NgramDrafter()},
                            played_only={"far"})
    res = eng.generate(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=30), Arm("ngram", 3))
    assert all("far" not in r.per_drafter for r in res.records)
    res = eng.generate(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=30), Arm("far", 3))
    assert all("far" in r.per_drafter and "ngram" in r.per_drafter for r in res.records)
    assert res.token_ids == hf_greedy(target, tok(PROMPTS[0]).input_ids, 30)


def exact_law(target, ids, params) -> dict:
    """The exact law of the next three tokens (t1, t2, t3) under the target with the params' warp."""
    law = {}
    p1 = probs_from_logits(forward(target, new_cache(target), ids)[-1], params)
    for a in p1.nonzero().flatten().tolist():
        p2 = probs_from_logits(forward(target, new_cache(target), ids + [a])[-1], params)
        for b in p2.nonzero().flatten().tolist():
            p3 = probs_from_logits(forward(target, new_cache(target), ids + [a, b])[-1], params)
            for c in p3.nonzero().flatten().tolist():
                law[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    return law


def gate_between(target, drafter, ids, first: dict[int, float]) -> float:
    """A min_confidence that lets the drafter draft after first tokens of at least 0.3 of the mass
    (`first`: token -> probability) and skips after at least 0.04: the sampling test then sees both.
    Chosen from the drafter's own top-1 probabilities there, since a distilled head's confidence
    depends on the machine that trained it."""
    conf = {}
    for a in first:
        if isinstance(drafter, FeatureDrafter):
            _, hidden = forward(target, new_cache(target), ids + [a], hidden=True)
            conf[a] = drafter.trace(ids, [a, a], 1, hidden=hidden)[0]["draft_confidence"][0][0]
        else:
            conf[a] = float(forward(drafter.model, new_cache(drafter.model), ids + [a])[-1].softmax(-1).max())
    for gate in sorted(set(conf.values()), reverse=True):
        above = sum(p for a, p in first.items() if conf[a] >= gate)
        if above >= 0.3:
            assert 1 - above >= 0.04, f"the drafter's confidences {conf} cannot split {first}"
            return gate
    raise AssertionError("unreachable: the lowest confidence keeps all the mass")


@pytest.mark.parametrize("drafter", ["ngram", "close", "feat", "featgate", "closegate"])
def test_sampled_output_follows_target_distribution(engine, target, tok, drafter):
    """Unseeded requests (the standard rule, min(1, p / q)): three sampled tokens, the last two from
    one speculative round, vs the exact target law."""
    ids = sampling_context(target, tok)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    law = exact_law(target, ids, params)
    keys = list(law)
    counts = np.zeros(len(keys))
    n = 2000
    drafted = accepted = skipped = 0
    d = engine.drafters[drafter]
    if drafter.endswith("gate"):  # a gate between the drafter's confidences after the possible first tokens
        d = copy.copy(d)
        d.min_confidence = gate_between(target, d, ids, {a: sum(p for k, p in law.items() if k[0] == a)
                                                         for a in {k[0] for k in keys}})
    alone = SpeculativeEngine(target, tok, {drafter: d})  # no other drafter to sync
    for i in range(n):
        res = alone.generate(ids, params, Arm(drafter, 2), rng_seed=i)
        counts[keys.index(tuple(res.token_ids))] += 1
        drafted += res.records[0].num_drafted > 0
        accepted += res.records[0].accepted > 0
        skipped += res.records[0].num_drafted == 0
    assert drafted > n / 4 and accepted > n / 20  # speculation really happened
    if drafter.endswith("gate"):
        assert skipped > n / 50  # the gate skipped rounds (it reads the distribution after the sampled first token)
    assert chi2_pvalue(counts, [law[k] for k in keys]) > 1e-3


def test_seeded_output_follows_target_distribution_over_seeds(engine, target, tok):
    """Seeded requests (Gumbel-max with position-keyed noise): over seeds, the target's law. With
    the next test (the same output whatever the arm), this holds for every drafter and k."""
    ids = sampling_context(target, tok)
    law = exact_law(target, ids, SamplingParams(max_tokens=3, temperature=1.0, top_k=3))
    keys = list(law)
    counts = np.zeros(len(keys))
    plain = SpeculativeEngine(target, tok)
    for seed in range(2000):
        res = plain.generate(ids, SamplingParams(max_tokens=3, temperature=1.0, top_k=3, seed=seed, ignore_eos=True))
        counts[keys.index(tuple(res.token_ids))] += 1
    assert chi2_pvalue(counts, [law[k] for k in keys]) > 1e-3


SEEDED_ARMS = [Arm("none", 0), Arm("ngram", 3), Arm("suffix", 4), Arm("suffix", 4), Arm("close", 2), Arm("close", 6),
               Arm("far", 3), Arm("feat", 4), Arm("featgate", 3), Arm("closegate", 5)]


@pytest.mark.parametrize("warp", [{"temperature": 0.8, "top_p": 0.9}, {"temperature": 1.3, "top_k": 6, "top_p": 0.95}])
def test_a_seeded_request_gets_the_same_output_whatever_drafter_k_or_repetition(engine, tok, warp):
    """The output of a seeded request is a function of (prompt, parameters, seed): every arm, and the
    same arm twice (the suffix index grows in between), give the same tokens; drafts are still accepted."""
    outputs, accepted = set(), 0
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        for seed in range(4):
            params = SamplingParams(max_tokens=24, seed=seed, ignore_eos=True, **warp)
            results = [engine.generate(ids, params, arm) for arm in SEEDED_ARMS]
            assert len({tuple(r.token_ids) for r in results}) == 1, (prompt, seed)
            outputs.add(tuple(results[0].token_ids))
            accepted += sum(r.accepted for res in results for r in res.records)
    assert len(outputs) > 8  # seeds do change the output
    assert accepted > 0


def test_seeds_up_to_2_64_work_and_the_seed_is_checked(engine, tok):
    ids = tok(PROMPTS[2]).input_ids
    for seed in (0, 2**63, 2**64 - 1):
        params = SamplingParams(max_tokens=5, temperature=1.0, seed=seed)
        assert engine.generate(ids, params, Arm("close", 3)).token_ids == engine.generate(ids, params).token_ids
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            SamplingParams(temperature=1.0, seed=bad)


@pytest.mark.parametrize("arm", [Arm("none", 0), Arm("ngram", 8), Arm("close", 8)])
def test_max_tokens_ends_at_the_exact_token(engine, tok, arm):
    for n in (1, 2, 7):
        res = engine.generate(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=n, ignore_eos=True), arm)
        assert len(res.token_ids) == n and res.finish_reason == "length"


def test_eos_ends_generation_at_the_eos_token(engine, target, tok):
    # find a prompt whose greedy continuation reaches EOS (id 0) within 200 tokens
    for prompt in ["a", "b", "c", "d", "e", "ab", "zz", "q."]:
        ref = hf_greedy(target, tok(prompt).input_ids, 200)
        if 0 in ref:
            break
    else:
        pytest.skip("no tiny prompt reaches EOS")
    for arm in [Arm("none", 0), Arm("close", 5), Arm("suffix", 4)]:
        res = engine.generate(tok(prompt).input_ids, SamplingParams(max_tokens=200), arm)
        assert res.token_ids == ref[: ref.index(0) + 1] and res.finish_reason == "stop"


def test_stop_string_ends_at_the_token_that_completes_it(engine, tok):
    ids = tok(PROMPTS[0]).input_ids
    plain = engine.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True), Arm("none", 0))
    stop = plain.text[10:12]  # a two-character string that occurs in the plain output
    first = plain.text.find(stop)
    for arm in [Arm("none", 0), Arm("close", 6), Arm("ngram", 5)]:
        res = engine.generate(ids, SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True), arm)
        assert res.finish_reason == "stop"
        assert res.text == plain.text[:first]
        assert res.token_ids == plain.token_ids[: first + len(stop)]  # one char per token here


def test_unknown_drafter_and_empty_prompt_are_refused(engine):
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        engine.start([1, 2], SamplingParams(), Arm("nope", 2))
    with pytest.raises(ValueError, match="empty"):
        engine.start([], SamplingParams(), Arm("none", 0))


def test_confidence_threshold_stops_drafting_early_and_stays_exact(engine, target, tok):
    from draftpick.policies.types import Choice

    ids = tok(PROMPTS[0]).input_ids
    ref = hf_greedy(target, ids, 40)
    drafted = {}
    for thr in (None, 0.5, 0.99):
        res = engine.generate(ids, SamplingParams(max_tokens=40), Arm("close", 8),
                              chooser=lambda g, t=thr: Choice(Arm("close", 8), 1.0, threshold=t))
        assert res.token_ids == ref
        assert all(r.threshold == thr for r in res.records)
        drafted[thr] = sum(r.num_drafted for r in res.records) / len(res.records)
    assert drafted[0.99] < drafted[0.5] <= drafted[None]
    assert drafted[0.99] >= 1  # the first token is always drafted


def test_confidence_gate_skips_unconfident_rounds_and_stays_exact(engine, target, tok):
    """min_confidence: a round whose first position is below it drafts nothing (plain decoding);
    a draft ends before its first unconfident position; the output does not change."""
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ref = hf_greedy(target, ids, 48)
        free = engine.generate(ids, SamplingParams(max_tokens=48), Arm("feat", 4))
        gate = engine.generate(ids, SamplingParams(max_tokens=48), Arm("featgate", 4))
        assert free.token_ids == gate.token_ids == ref
        assert all(r.num_drafted == 4 for r in free.records[:-1])
        assert any(r.num_drafted == 0 for r in gate.records) and any(r.num_drafted > 0 for r in gate.records)
        skipped = [r for r in gate.records if r.num_drafted == 0]
        assert all(r.emitted == 1 and r.per_drafter["featgate"] == [0.0] for r in skipped)


def test_round_chooser_can_switch_drafter_and_k_every_round(engine, target, tok):
    from draftpick.policies.types import Choice

    ids = tok(PROMPTS[0]).input_ids
    cycle = [Arm("close", 3), Arm("ngram", 2), Arm("none", 0), Arm("suffix", 5), Arm("far", 1)]
    res = engine.generate(ids, SamplingParams(max_tokens=48), Arm("none", 0),
                          chooser=lambda g: Choice(cycle[len(g.records) % len(cycle)], 0.5))
    assert res.token_ids == hf_greedy(target, ids, 48)
    assert [r.drafter for r in res.records[:5]] == [a.drafter for a in cycle]
    assert all(r.propensity == 0.5 for r in res.records)


def test_padded_verify_forward_gives_the_same_logits_and_cache(target, tok):
    from draftpick.workers.models import rollback, verify_forward

    ids = tok(PROMPTS[0]).input_ids
    for n in (2, 3, 5, 6, 7):
        a, b = new_cache(target), new_cache(target)
        forward(target, a, ids[:-n])
        forward(target, b, ids[:-n])
        plain = verify_forward(target, a, ids[-n:], 1)
        padded = verify_forward(target, b, ids[-n:], 4)
        assert padded.shape == plain.shape == (n, target.config.vocab_size)
        torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
        assert b.get_seq_length() == len(ids) + (-n) % 4  # the padding went into the cache...
        rollback(b, len(ids))  # ...and is cropped like rejected drafts
        torch.testing.assert_close(forward(target, b, [1])[-1], forward(target, a, [1])[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["pooled", "growing"])
def test_the_cache_gives_transformers_own_logits_and_writes_in_place(target, tok, monkeypatch, kind):
    """new_cache's full-attention layers write in place (no copy of the cache per step): in the
    model's pool where it can be batched, else in spare room of their own. Through prefills, single
    and multi-token steps, rollbacks of rejected drafts and growth past their room, the logits are
    bit for bit those of transformers' own DynamicCache with buffers of their own, and with the pool
    for a request alone; from the pool, whose rows attend in one product in a batched forward, they
    are within float rounding (the same argmax)."""
    from transformers import DynamicCache

    from draftpick.workers import batched, models
    from draftpick.workers.models import GrowingLayer, PooledLayer, rollback

    if kind == "growing":
        monkeypatch.setattr(batched, "batchable", lambda model: False)  # new_cache keeps buffers of its own
    monkeypatch.setattr(models, "POOL_POSITIONS", 10_000)

    def stock():
        cache = DynamicCache(config=target.config)
        cache.activate_past_recording()
        return cache

    gen = torch.Generator().manual_seed(0)
    prompts = [tok(p).input_ids for p in PROMPTS[:3]]
    ours, theirs = [new_cache(target) for _ in prompts], [stock() for _ in prompts]
    layer_type = PooledLayer if kind == "pooled" else GrowingLayer
    assert all(type(layer) is layer_type for c in ours for layer in c.layers)
    lengths = [len(p) for p in prompts]
    for caches in (ours, theirs):
        for c, p in zip(caches, prompts):
            forward(target, c, p)
    moved = 0
    for step in range(300):  # far past the first buffer's room (prompt + 128): it grows several times
        news = [torch.randint(1, VOCAB, (1 + (step + i) % 4,), generator=gen).tolist() for i in range(len(prompts))]
        before = [c.layers[0].keys.data_ptr() for c in ours]
        if step % 2 == 0:  # alone
            got = [forward(target, c, t) for c, t in zip(ours, news)]
            want = [forward(target, c, t) for c, t in zip(theirs, news)]
        else:  # batched
            got = [lg for lg, _ in batched_forward(target, ours, news)]
            want = [lg for lg, _ in batched_forward(target, theirs, news)]
        for a, b in zip(got, want):
            if kind == "growing" or step == 0:  # (after a batched step the pooled caches hold other roundings)
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
                assert torch.equal(a.argmax(-1), b.argmax(-1))
        moved += sum(c.layers[0].keys.data_ptr() != p for c, p in zip(ours, before))
        for i, (a, b) in enumerate(zip(ours, theirs)):  # keep the first row, as a round that rejected its drafts
            lengths[i] += 1
            rollback(a, lengths[i])
            rollback(b, lengths[i])
            assert a.get_seq_length() == lengths[i]
            torch.testing.assert_close(a.layers[-1].keys, b.layers[-1].keys, rtol=1e-4, atol=1e-4)
            if kind == "growing":
                assert torch.equal(a.layers[-1].keys, b.layers[-1].keys)
    assert 0 < moved < 20  # written in place, a new buffer only now and then


def test_the_pool_gives_slots_back_copies_and_lets_long_requests_go(target, tok, monkeypatch):
    """A cache takes a slot at its first use; a collected cache's slot is taken by the next; a deep
    copy gets a slot and positions of its own; a request growing past POOL_POSITIONS leaves the pool for buffers of its own; through all
    of it a batched forward gives each request what it gets alone."""
    import gc

    from draftpick.workers import models
    from draftpick.workers.models import KVPool

    monkeypatch.setattr(models, "POOL_POSITIONS", 40)
    pool = KVPool.of(target)
    ids = tok(PROMPTS[0]).input_ids[:20]
    a = new_cache(target)
    free = len(pool.free)
    assert a.layers[0].slot._index is None and len(pool.free) == free  # nothing taken before its first use
    slot = a.layers[0].slot.index
    del a
    gc.collect()
    b = new_cache(target)
    assert b.layers[0].slot.index == slot  # given back, taken again
    forward(target, b, ids)
    c = copy.deepcopy(b)
    assert c.layers[0].slot.index != slot and c.get_seq_length() == b.get_seq_length() == len(ids)
    assert all(torch.equal(x.keys, y.keys) for x, y in zip(b.layers, c.layers))
    fresh = [new_cache(target) for _ in range(pool.slots + 1)]  # more than the pool holds: it grows
    assert len({f.layers[0].slot.index for f in fresh} | {slot, c.layers[0].slot.index}) == len(fresh) + 2
    assert pool.slots >= len(fresh) + 2
    for f in fresh[:2]:
        forward(target, f, ids[:5])
    gen = torch.Generator().manual_seed(1)
    caches, alone = [b, c, *fresh[:2]], [copy.deepcopy(x) for x in (b, c, *fresh[:2])]
    for step in range(12):  # b and c grow past 40 positions and leave the pool; the others stay
        news = [torch.randint(1, VOCAB, (2,), generator=gen).tolist() for _ in caches]
        got = [lg for lg, _ in batched_forward(target, caches, news)]
        want = [forward(target, x, t) for x, t in zip(alone, news)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert b.layers[0].slot is None and c.layers[0].slot is None and fresh[0].layers[0].slot is not None
    assert b.get_seq_length() == len(ids) + 24 and fresh[0].get_seq_length() == 5 + 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_engine_on_cuda_is_exact_and_samples_with_the_requests_seed(engine, target, tok):
    """The engine with the target and its drafters on a GPU: greedy output equals the GPU target's
    own generate for every drafter; sampling draws from the request's (CPU) generator."""
    gpu = copy.deepcopy(target).to("cuda")
    drafters = {"ngram": NgramDrafter(), "close": ModelDrafter("close", copy.deepcopy(engine.drafters["close"].model).to("cuda")),
                "feat": FeatureDrafter(
                    "feat", copy.deepcopy(engine.drafters["feat"].head).float(), gpu,
                    engine.drafters["feat"].kept.tolist())}
    eng = SpeculativeEngine(gpu, tok, drafters)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ref = gpu.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
        for arm in (Arm("none", 0), Arm("ngram", 3), Arm("close", 4), Arm("feat", 4)):
            assert eng.generate(ids, SamplingParams(max_tokens=40), arm).token_ids == ref, (arm, prompt)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=5)
    plain = eng.generate(tok(PROMPTS[1]).input_ids, params, Arm("none", 0)).token_ids
    for arm in (Arm("close", 3), Arm("feat", 3)):
        a = eng.generate(tok(PROMPTS[1]).input_ids, params, arm)
        assert a.token_ids == plain  # a seeded request: the same output whatever the arm, on the GPU too
        assert len(a.token_ids) == 30 or a.finish_reason == "stop"


def test_sliding_window_targets_roll_back_rejected_drafts(tok):
    """A Mistral-style target (every layer a sliding window of 8) with rejected drafts well past the
    window: model, feature and n-gram drafters keep greedy output exact (transformers' sliding
    layers refuse to crop once full unless they record their past, which new_cache asks)."""
    from draftpick.workers.drafters.feature import FeatureHead

    target = tiny_sliding_model(seed=0, window=8)
    head = FeatureHead.from_target(target)  # untrained: it drafts, and is mostly wrong
    drafters = {"ngram": NgramDrafter(), "close": ModelDrafter("close", noisy_copy(target, 0.05)),
                "far": ModelDrafter("far", tiny_sliding_model(seed=3, window=8)),
                "feat": FeatureDrafter("feat", head, target, list(range(VOCAB)))}
    engine = SpeculativeEngine(target, tok, drafters)
    ids = tok(PROMPTS[1]).input_ids  # 31 tokens: the window is full from the prefill on
    ref = hf_greedy(target, ids, 40)
    for name in drafters:
        res = engine.generate(ids, SamplingParams(max_tokens=40), Arm(name, 4))
        assert res.token_ids == ref, name
        assert sum(r.accepted < r.num_drafted for r in res.records) > 0, name  # rollbacks happened


def test_prompts_the_target_cannot_run_are_refused_at_the_boundary(engine, tok):
    with pytest.raises(ValueError, match=r"prompt token id 47 is outside the target's vocabulary \[0, 47\)"):
        engine.start([1, 47], SamplingParams(), Arm("none", 0))
    with pytest.raises(ValueError, match="prompt token id -1"):
        engine.start([-1, 2], SamplingParams(), Arm("none", 0))
    window = engine.target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the target's context window of {window} tokens"):
        engine.start([1] * (window - 10), SamplingParams(max_tokens=11), Arm("none", 0))
    engine.start([1] * (window - 10), SamplingParams(max_tokens=10), Arm("none", 0))  # just fits


def test_a_stop_string_at_the_start_of_the_output_ends_it_there(engine, tok):
    ids = tok(PROMPTS[0]).input_ids
    plain = engine.generate(ids, SamplingParams(max_tokens=20, ignore_eos=True), Arm("none", 0))
    stop = plain.text[:2]  # the output's first two characters
    for arm in [Arm("none", 0), Arm("close", 4)]:
        res = engine.generate(ids, SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True), arm)
        assert res.finish_reason == "stop" and res.text == "" and res.token_ids == plain.token_ids[:2]


def test_a_round_cut_short_by_a_stop_counts_only_what_it_emitted(engine, tok):
    """A stop inside a round's accepted drafts: accepted counts the emitted drafts only, so the
    metrics add up to the output (1 prefill token + emitted per round)."""
    ids = tok(PROMPTS[1]).input_ids
    plain = engine.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True), Arm("none", 0))
    cut = 0
    for i in range(3, 30):
        stop = tok.decode(plain.token_ids[i : i + 1], skip_special_tokens=True)  # token i's text
        if not stop or stop in tok.decode(plain.token_ids[:i], skip_special_tokens=True):
            continue  # EOS (no text), or it would stop earlier
        res = engine.generate(ids, SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True), Arm("close", 8))
        assert res.token_ids == plain.token_ids[: i + 1]
        assert 1 + sum(r.emitted for r in res.records) == len(res.token_ids)
        last = res.records[-1]
        assert last.accepted <= last.emitted and sum(last.accepted_per_pos) == last.accepted
        m = res.metrics()
        assert m["num_accepted_draft_tokens"] == sum(r.accepted for r in res.records) <= len(res.token_ids) - 1
        assert m["mean_acceptance_length"] <= len(res.token_ids) / len(res.records) + 1e-9
        cut += last.emitted <= last.num_drafted  # the stop came inside the drafts
    assert cut > 0


def test_records_carry_the_draft_length_used_near_max_tokens(engine, tok):
    ids = tok(PROMPTS[1]).input_ids
    res = engine.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True), Arm("ngram", 8))
    assert 1 + sum(r.emitted for r in res.records) == 6
    for r in res.records:
        assert r.k <= 8 and r.num_drafted <= r.k
    assert res.records[0].k == 4  # 6 tokens, 1 from the prefill, 1 bonus: at most 4 drafts pay
    assert res.records[-1].k == 0 or res.records[-1].drafter != "none"


def test_a_round_that_emits_nothing_fails_loudly(engine, tok, monkeypatch):
    from draftpick.workers import engine as engine_module
    from draftpick.workers.verify import VerifyResult

    monkeypatch.setattr(engine_module, "verify", lambda p, draft, q, g: VerifyResult(0, []))
    with pytest.raises(RuntimeError, match="emitted no token"):
        engine.generate(tok(PROMPTS[0]).input_ids, SamplingParams(max_tokens=10), Arm("ngram", 3))


@pytest.mark.parametrize("pad", [1, 3, 4])
def test_padded_verification_keeps_greedy_output_and_counts(target, tok, pad):
    drafters = {"ngram": NgramDrafter(), "close": ModelDrafter("close", noisy_copy(target, 0.05))}
    ids = tok(PROMPTS[0]).input_ids
    ref = hf_greedy(target, ids, 30)
    for name in drafters:
        engine = SpeculativeEngine(target, tok, drafters, verify_pad_multiple=pad)
        res = engine.generate(ids, SamplingParams(max_tokens=30), Arm(name, 5))
        assert res.token_ids == ref
        assert 1 + sum(r.emitted for r in res.records) == len(ref)


def test_sinks_receive_each_finished_request_and_a_failing_sink_fails_nothing(target, tok):
    got = []
    engine = SpeculativeEngine(target, tok, {"ngram": NgramDrafter()})
    engine.add_sink(lambda res: 1 / 0)
    engine.add_sink(lambda res: got.append((res, len(res.records), list(res.token_ids))))  # as seen when called
    res = engine.generate(tok("ab").input_ids, SamplingParams(max_tokens=5), Arm("ngram", 2), tenant="t1")
    assert got == [(res, len(res.records), res.token_ids)] and res.tenant == "t1" and engine.sink_errors == 1


def test_rng_seed_reproduces_an_unseeded_request_and_never_changes_a_seeded_one(engine, tok):
    ids = tok(PROMPTS[2]).input_ids
    unseeded = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    a, b, c = (engine.generate(ids, unseeded, Arm("close", 3), rng_seed=s).token_ids for s in (1, 1, 2))
    assert a == b != c
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=9, ignore_eos=True)
    assert len({tuple(engine.generate(ids, seeded, Arm("close", 3), rng_seed=s).token_ids) for s in (1, 2, 3)}) == 1
