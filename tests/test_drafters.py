"""Model-free drafters: prompt lookup and the per-tenant suffix index."""
import numpy as np

from draftpick.workers.drafters.ngram import NgramDrafter, prompt_lookup
from draftpick.workers.drafters.suffix import SuffixDrafter, SuffixIndex


def test_prompt_lookup_takes_the_latest_longest_match():
    ids = np.array([5, 1, 2, 9, 9, 1, 2, 7, 8, 3, 1, 2])
    # suffix [1, 2] occurs at 1 and 5; the latest (5) is followed by 7, 8
    assert prompt_lookup(ids, 2, 1, 3) == [7, 8]
    # a longer suffix wins over a more recent shorter one
    ids = np.array([4, 1, 2, 6, 6, 1, 2, 0, 4, 1, 2])
    assert prompt_lookup(ids, 1, 1, 3) == [6]


def test_prompt_lookup_is_the_latest_longest_earlier_window():
    """The array search equals its definition (every window of n tokens before the last one, n from
    max_ngram down) on random sequences of a few token values, where matches of every length abound."""
    def by_windows(ids, k, min_ngram, max_ngram):
        L = len(ids)
        for n in range(min(max_ngram, L - 1), min_ngram - 1, -1) if k > 0 else ():
            windows = np.lib.stride_tricks.sliding_window_view(ids[: L - 1], n)
            hits = np.flatnonzero((windows == ids[L - n:]).all(axis=1))
            if len(hits):
                return ids[int(hits[-1]) + n: int(hits[-1]) + n + k].tolist()
        return []

    rng = np.random.default_rng(0)
    found = 0
    for _ in range(3000):
        ids = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(0, 50))).astype(np.int64)
        k, lo = int(rng.integers(0, 6)), int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 6))
        expected = by_windows(ids, k, lo, hi)
        assert prompt_lookup(ids, k, lo, hi) == expected, (ids.tolist(), k, lo, hi)
        found += bool(expected)
    assert found > 1000  # most sequences had a match


def test_prompt_lookup_without_match_proposes_nothing():
    assert prompt_lookup(np.array([1, 2, 3, 4]), 3, 1, 3) == []
    assert prompt_lookup(np.array([1, 2, 3, 1]), 0, 1, 3) == []


def test_ngram_session_proposes_at_most_k():
    s = NgramDrafter(min_ngram=1, max_ngram=2).session("", 0)
    draft, q = s.propose([1, 2, 3, 4, 5, 1, 2], 2, None)
    assert draft.tolist() == [3, 4] and q is None


def test_suffix_drafts_from_a_tenants_earlier_outputs_only():
    d = SuffixDrafter(min_ngram=2, max_ngram=4)
    prompt = [100, 101]
    a = d.session("alice", len(prompt))
    a.close(prompt + [7, 8, 9, 10, 11])  # alice's output is indexed when her request ends
    later = prompt + [50, 7, 8]
    assert d.session("alice", 2).lookup(later, 3) == [9, 10, 11]
    assert d.session("bob", 2).lookup(later, 3) == []  # bob never sees alice's outputs


def test_suffix_uses_the_requests_own_output():
    d = SuffixDrafter(min_ngram=2, max_ngram=4)
    s = d.session("t", 2)
    assert s.lookup([100, 101, 1, 2, 3, 1, 2], 2) == [3, 1]
    assert s.lookup([1, 2, 3, 100, 101, 1, 2], 2) == []  # prompt tokens are not its own output


def test_suffix_index_is_bounded_and_drops_the_oldest():
    idx = SuffixIndex(min_ngram=2, max_ngram=2, max_tokens=10)
    idx.add([1, 2, 3, 4])
    idx.add([5, 6, 7, 8])
    idx.add([9, 10, 11, 12])  # 12 tokens > 10: the oldest output goes
    assert idx.num_tokens <= 10
    assert idx.lookup([1, 2], 2) == (0, [])
    assert idx.lookup([9, 10], 2) == (2, [11, 12])


def test_suffix_index_keeps_only_n_grams_with_a_continuation():
    """The output's final n-gram also occurs earlier: the lookup must follow the earlier occurrence,
    not the final one (which has nothing after it)."""
    from draftpick.workers.drafters.suffix import SuffixIndex

    idx = SuffixIndex(min_ngram=2, max_ngram=2, max_tokens=100)
    idx.add([5, 6, 7, 8, 5, 6])
    assert idx.lookup([1, 5, 6], 3) == (2, [7, 8, 5])
