"""Verification rule: forced outcomes with hand-built distributions, then statistics."""
import numpy as np
import pytest
import torch
from tiny import chi2_pvalue
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from draftpick.workers.sampling import SamplingParams, probs_from_logits
from draftpick.workers.verify import verify

V = 6


def one_hot_rows(tokens):  # greedy target: p one-hot at these argmaxes, [len, V]
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()


def test_perfect_match_accepts_all_and_adds_bonus():
    p = one_hot_rows([3, 1, 4, 5])  # argmax at each of k + 1 = 4 positions
    res = verify(p, torch.tensor([3, 1, 4]), None)
    assert res.num_accepted == 3
    assert res.tokens == [3, 1, 4, 5]  # the last one is the bonus token


def test_early_mismatch_stops_at_first_rejection_with_target_token():
    p = one_hot_rows([3, 2, 4, 5])
    res = verify(p, torch.tensor([3, 1, 4]), None)  # position 1 disagrees
    assert res.num_accepted == 1
    assert res.tokens == [3, 2]  # recovered token is the target's choice; later drafts are dropped


def test_first_position_mismatch_emits_only_the_recovered_token():
    p = one_hot_rows([0, 1])
    res = verify(p, torch.tensor([5]), None)
    assert (res.num_accepted, res.tokens) == (0, [0])


def test_k_zero_is_plain_decoding():
    p = one_hot_rows([2])
    res = verify(p, torch.empty(0, dtype=torch.long), None)
    assert (res.num_accepted, res.tokens) == (0, [2])


def test_model_drafter_greedy_q_is_one_hot_and_matches_deterministic_rule():
    p = one_hot_rows([3, 2, 4])
    draft = torch.tensor([3, 1])
    q = one_hot_rows([3, 1])
    assert verify(p, draft, q).tokens == verify(p, draft, None).tokens == [3, 2]


def test_draft_impossible_under_target_is_always_rejected():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [1 / 6] * 6])
    for _ in range(200):
        res = verify(p, torch.tensor([4]), None, g)
        assert res.num_accepted == 0 and res.tokens[0] in (0, 1)


def _random_dist(g, rows):
    return torch.softmax(torch.randn(rows, V, generator=g) * 1.5, -1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_emitted_tokens_follow_target_distribution(deterministic):
    """First emitted token ~ p[0] and, given it was accepted, the second ~ p[1] (chi-square)."""
    g = torch.Generator().manual_seed(1234)
    p = _random_dist(g, 3)  # [k + 1, V] with k = 2; rows independent of earlier tokens here
    q = _random_dist(g, 2)
    n = 20000
    first = np.zeros(V)
    second = np.zeros(V)
    for _ in range(n):
        if deterministic:
            draft = torch.multinomial(q, 1, generator=g).squeeze(-1)  # a fixed draft per trial, q unused
            res = verify(p, draft, None, g)
        else:
            draft = torch.multinomial(q, 1, generator=g).squeeze(-1)
            res = verify(p, draft, q, g)
        first[res.tokens[0]] += 1
        if len(res.tokens) > 1:
            second[res.tokens[1]] += 1
    assert chi2_pvalue(first, p[0].numpy()) > 1e-3
    assert second.sum() > 2000  # enough rounds accepted the first draft
    assert chi2_pvalue(second, p[1].numpy()) > 1e-3


def test_a_wrong_verify_rule_is_detected():
    """The statistical check above has power: accepting every draft would fail it."""
    g = torch.Generator().manual_seed(5)
    p, q = _random_dist(g, 2), _random_dist(g, 1)
    n = 20000
    counts = np.bincount(torch.multinomial(q[0], n, replacement=True, generator=g).numpy(), minlength=V)
    assert chi2_pvalue(counts, p[0].numpy()) < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 4, 0.6),
                                                     (0.5, 0, 0.7), (2.0, 0, 0.9)])  # temperature and top-p alone too
def test_warp_matches_transformers_logits_processors(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ours = probs_from_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(ours, ref.softmax(-1))


def test_greedy_warp_is_one_hot_at_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 3.0]])
    assert probs_from_logits(logits, SamplingParams()).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_top_p_breaks_exact_ties_at_the_nucleus_boundary_as_transformers_does():
    """Tokens with equal logits straddle the top-p boundary: the same ones are kept as by
    transformers' TopPLogitsWarper (the same ascending sort decides)."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for top_p in (0.3, 0.5, 0.55, 0.6, 0.7, 0.9):
        ours = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
        ref = TopPLogitsWarper(top_p)(None, logits.clone()).softmax(-1)
        assert torch.equal(ours > 0, ref > 0), top_p
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(temperature=1e-30), dict(top_p=float("nan")), dict(max_tokens=2.5),
                                 dict(stop=("",)), dict(stop=("ok", 3))])
def test_bad_sampling_params_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_a_stop_given_as_one_string_is_one_stop_string():
    assert SamplingParams(stop="ab").stop == ("ab",)
    assert SamplingParams(stop=["ab", "c"]).stop == ("ab", "c")
