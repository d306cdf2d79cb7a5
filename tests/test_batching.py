"""Batched verification: many requests, one target forward per step, each request exact alone."""
import asyncio
from collections import Counter

import numpy as np
import pytest
import torch

from draftpick.policies.types import Arm
from test_engine import exact_law, hf_greedy, sampling_context
from tiny import VOCAB, chi2_pvalue, feature_drafter, noisy_copy, save_models, tiny_sliding_model
from draftpick.workers.batched import ForwardCost, batchable, batched_forward, pooled_rows_cap, slot_ranges
from draftpick.workers.drafters.base import matching_prefix
from draftpick.workers.drafters.feature import FeatureDrafter
from draftpick.workers.drafters.model import ModelDrafter
from draftpick.workers.drafters.ngram import NgramDrafter
from draftpick.workers.drafters.suffix import SuffixDrafter
from draftpick.workers.engine import SpeculativeEngine
from draftpick.workers.models import KVPool, forward, new_cache, rollback
from draftpick.workers.sampling import SamplingParams

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "the cat sat on the mat. the cat", "x = 1\ny = 2\n",
           "q", "import os\nimport sys\nimport os\n", "hello there, hello there, hel"]


@pytest.fixture(scope="module")
def engine(target, tok, tmp_path_factory):
    head = feature_drafter(target, tok, tmp_path_factory.mktemp("feature") / "head")
    drafters = {"ngram": NgramDrafter(), "suffix": SuffixDrafter(), "close": ModelDrafter("close", noisy_copy(target, 0.05)),
                "feat": FeatureDrafter.load("feat", str(head), target),
                # a drafter with a reduced output vocabulary (as distilled ones have): every other token id
                "trimmed": ModelDrafter("trimmed", noisy_copy(target, 0.05), kept=list(range(0, VOCAB, 2)))}
    return SpeculativeEngine(target, tok, drafters)


def run_batched(engine, jobs, max_rows=None, on_step=None, chunk=None):
    """jobs: (start step, prompt ids, params, arm, start kwargs). Every request in flight steps
    together (engine.step_batch; chunk: chunked prefill), joining at its start step. Returns the
    generations in job order."""
    gens, step = [None] * len(jobs), 0
    while step <= max(j[0] for j in jobs) or any(not g.done for g in gens if g):
        for i, (start, ids, params, arm, kw) in enumerate(jobs):
            if start == step:
                gens[i] = engine.start(ids, params, arm, **kw)
        live = [g for g in gens if g and not g.done]
        results = engine.step_batch(live, max_rows, chunk)
        assert not [r for r in results if isinstance(r, Exception)]
        if on_step:
            on_step(live)
        step += 1
    return gens


def assert_holds(target, g, held: list[int]) -> None:
    """g's cache holds exactly the keys and values a fresh forward of `held` gives, and a feature
    head's hidden states are those of the same tokens."""
    if held:
        fresh = new_cache(target)
        forward(target, fresh, held)
        for a, b in zip(fresh.layers, g.cache.layers):
            assert a.keys.shape == b.keys.shape and torch.allclose(a.keys, b.keys, atol=1e-5)
            assert torch.allclose(a.values, b.values, atol=1e-5)
    if g.target_features is not None:
        assert len(g.target_features) == len(held)


def test_batched_forward_equals_each_requests_own_forward(target):
    assert batchable(target)
    prompts, new = [[3, 4, 5, 6, 7], list(range(1, 12)), [9]], [[1], [2, 3, 4], [5, 6]]
    alone, caches = [], []
    for p, t in zip(prompts, new):
        c = new_cache(target)
        forward(target, c, p)
        alone.append(forward(target, c, t, hidden=True))
        caches.append(new_cache(target))
        forward(target, caches[-1], p)
    together = batched_forward(target, caches, new, hidden=True)
    for p, t, (lg, h), (lg2, h2), c in zip(prompts, new, alone, together, caches):
        assert lg2.shape == lg.shape and torch.allclose(lg, lg2, atol=1e-5) and torch.allclose(h, h2, atol=1e-5)
        assert torch.equal(lg.argmax(-1), lg2.argmax(-1))
        fresh = new_cache(target)
        forward(target, fresh, p + t)
        for a, b in zip(fresh.layers, c.layers):  # the cache holds the prompt and the new rows
            assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    # a prefill in the batch: only its last row's logits
    (lg, _), = batched_forward(target, [new_cache(target)], [prompts[1]], last_only=[True])
    assert torch.allclose(lg, forward(target, new_cache(target), prompts[1], last_only=True), atol=1e-5)


def test_a_request_with_many_rows_among_many_with_few_attends_alone_and_every_output_is_exact(target, monkeypatch):
    """The pool's product runs every member at the largest member's rows: of n requests, up to n // 8
    with the most rows attend alone instead (pooled_rows_cap). Ten requests, one verifying 6 rows:
    it attends alone, the nine others in the pool at one row, and every logit and cache is what each
    request's own forward gives. A request that left the pool is not counted among the n."""
    import draftpick.workers.batched as batched

    assert [pooled_rows_cap(r) for r in ([1] * 31 + [9], [1] * 24 + [2] * 8, [2] * 32, [1] * 3 + [4], [1] * 9 + [20])] \
        == [1, 2, 2, 4, 1]
    members = []
    pooled = batched._PooledRows

    class Spy(pooled):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            members.append(sorted(self.members))

    monkeypatch.setattr(batched, "_PooledRows", Spy)
    prompts = [[(3 * i + j) % 50 + 1 for j in range(5 + i)] for i in range(10)]
    new = [[7]] * 9 + [[1, 2, 3, 4, 5, 6]]
    alone, caches = [], []
    for p, t in zip(prompts, new):
        c = new_cache(target)
        forward(target, c, p)
        alone.append(forward(target, c, t))
        caches.append(new_cache(target))
        forward(target, caches[-1], p)
    batched_forward(target, caches, [[5]] * 10)  # every cache takes its pool slot at its first batched forward
    for c, p in zip(caches, prompts):
        rollback(c, len(p))
    together = batched_forward(target, caches, new)
    assert members[-1] == list(range(9))  # the 6-row request attended alone
    for lg, (lg2, _), c, p, t in zip(alone, together, caches, prompts, new):
        assert torch.allclose(lg, lg2, atol=1e-5) and torch.equal(lg.argmax(-1), lg2.argmax(-1))
        fresh = new_cache(target)
        forward(target, fresh, p + t)
        for a, b in zip(fresh.layers, c.layers):
            assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    # eight requests, of which one has left the pool (as past the pool's length): only the seven with
    # a slot count, and of seven none attends alone, the 6-row one included
    sub, subp, subt = caches[2:], prompts[2:], new[2:]
    for c, p in zip(sub, subp):
        rollback(c, len(p))
    for layer in sub[0].layers:
        layer.leave_pool()
    again = batched_forward(target, sub, subt)
    assert members[-1] == list(range(1, 8))
    for lg, (lg2, _) in zip(alone[2:], again):
        assert torch.allclose(lg, lg2, atol=1e-5) and torch.equal(lg.argmax(-1), lg2.argmax(-1))


def test_slot_ranges_are_the_cheapest_cut_of_the_members_into_consecutive_ranges():
    """Every way to cut a few members (slot, end) into consecutive ranges, priced as the product
    reads them (slots spanned x the longest end, + RANGE_COST a range): slot_ranges finds the cheapest."""
    import itertools

    import draftpick.workers.batched as batched

    def price(members, cuts):
        bounds = [0, *cuts, len(members)]
        return sum((members[j - 1][0] - members[i][0] + 1) * max(e for _, e in members[i:j]) + batched.RANGE_COST
                   for i, j in zip(bounds, bounds[1:]))

    rng = np.random.default_rng(0)
    for _ in range(200):
        slots = sorted(rng.choice(24, size=int(rng.integers(1, 8)), replace=False).tolist())
        members = [(s, int(rng.choice([rng.integers(20, 200), rng.integers(900, 1024)]))) for s in slots]
        got = slot_ranges(members)
        # ranges cover the members in order, each from its first member's slot to its last's, as long as its longest
        assert got[0][0] == members[0][0] and got[-1][1] == members[-1][0] + 1
        assert all(max(e for s, e in members if a <= s < b) == length for a, b, length in got)
        cuts = [i for i in range(1, len(members)) if any(members[i][0] == a for a, _, _ in got)]
        best = min(price(members, c) for r in range(len(members)) for c in itertools.combinations(range(1, len(members)), r))
        assert price(members, cuts) == best
    # long caches at the top slots, short ones at the bottom: two ranges
    assert slot_ranges([(0, 100), (1, 120), (2, 90), (13, 1000), (14, 900), (15, 950)]) == [(0, 3, 120), (13, 16, 1000)]
    assert slot_ranges([(0, 100), (1, 120)]) == [(0, 2, 120)]  # not worth a second range


def test_long_caches_take_high_slots_and_the_product_reads_each_range_exactly(target, monkeypatch):
    """KVPool.take: a cache that starts at least as long as the median of the recent ones takes the
    highest free slot, the others the lowest; the pooled product then reads the two ends as
    separate ranges, and every logit is what each request's own forward gives."""
    import copy

    import draftpick.workers.batched as batched

    model, own = copy.deepcopy(target), copy.deepcopy(target)  # models of their own: pools of their own, empty
    ranges = []
    pooled = batched._PooledRows

    class Spy(pooled):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            ranges.append(self.ranges)

    monkeypatch.setattr(batched, "_PooledRows", Spy)
    monkeypatch.setattr(batched, "RANGE_COST", 64)  # two ranges pay here: 8 x 222 against 4 x 32 + 4 x 222
    pool = KVPool.of(model)
    for i in [pool.take() for _ in range(8)]:  # room for eight (a pool growing as they come adds slots above)
        pool.release(i)
    lengths = [20, 200, 25, 210, 30, 220, 22, 205]  # short and long prompts, arriving in turn
    prompts = [[(7 * i + j) % 20 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    alone, caches = [], []
    for p in prompts:
        c = new_cache(model)
        forward(model, c, p)  # each takes its slot at its prefill
        caches.append(c)
        c = new_cache(own)
        forward(own, c, p)
        alone.append(forward(own, c, [5, 6]))  # what this request alone gives
    slots = [c.layers[0].slot.index for c in caches]
    # the first takes slot 0; after it, the long ones (at least the median so far) the top free slot
    assert slots == [0, 7, 1, 6, 2, 5, 3, 4]
    together = batched_forward(model, caches, [[5, 6]] * 8)
    assert ranges[-1] == [(0, 4, 32), (4, 8, 222)]  # each range as far as its longest: 30 + 2 and 220 + 2
    for lg, (lg2, _) in zip(alone, together):
        assert torch.allclose(lg, lg2, atol=1e-5) and torch.equal(lg.argmax(-1), lg2.argmax(-1))


ARMS = [Arm("close", 4), Arm("ngram", 3), Arm("suffix", 2), Arm("feat", 4), Arm("none", 0), Arm("ngram", 8)]


def test_greedy_outputs_in_a_batch_equal_each_request_alone(engine, target, tok):
    """Requests of different lengths and arms, joining at different steps and leaving when done:
    every greedy output is the target's plain greedy output, and rounds really ran batched."""
    jobs = [(start, tok(p).input_ids, SamplingParams(max_tokens=n), arm, {})
            for start, p, n, arm in zip([0, 0, 1, 3, 6, 9], PROMPTS, [40, 25, 48, 30, 12, 36], ARMS)]
    seen = []
    gens = run_batched(engine, jobs, on_step=lambda live: seen.append(len(live)))
    for (_, ids, params, arm, _), g in zip(jobs, gens):
        assert g.out == hf_greedy(target, ids, params.max_tokens), arm
    records = [r for g in gens for r in g.records]
    assert max(seen) >= 4 and min(seen) == 1  # they joined and left mid-run
    assert max(r.batch for r in records) >= 4
    assert all(r.batch_rows >= r.num_drafted + r.batch for r in records)
    assert sum(r.accepted for r in records) > 10  # drafts were accepted along the way


def test_forward_cost_charges_a_drafted_row_its_marginal_cost_whatever_the_others_draft():
    """Forwards cost a + b rows (a = 80 ms, b = 2 ms, with noise): once the rows varied, the fit finds
    the line, a plain request pays a / n + b in a batch of plain requests and in one where the others
    draft, a drafted row costs b, and the shares sum to the forward. By rows (before the fit) a plain
    request's share would fall from 5.5 to 2.9 ms when the others draft."""
    rng = np.random.default_rng(0)
    cost = ForwardCost()
    assert cost.shares([1, 3], 0.04) == pytest.approx([0.01, 0.03])  # no fit yet: by rows
    for _ in range(200):
        rows = int(rng.integers(16, 64))
        cost.observe(rows, 0.080 + 0.002 * rows + rng.normal(0, 0.002))
    a, c, b = cost.line()
    assert a == pytest.approx(0.080, rel=0.1) and b == pytest.approx(0.002, rel=0.1) and c == 0  # one request each
    plain, mixed = [1] * 16, [1] + [4] * 15
    alone = cost.shares(plain, a + b * sum(plain))
    among = cost.shares(mixed, a + b * sum(mixed))
    assert alone[0] == pytest.approx(among[0]) == pytest.approx(a / 16 + b)
    assert among[1] - among[0] == pytest.approx(3 * b)
    assert sum(among) == pytest.approx(a + b * sum(mixed))
    assert sum(cost.shares(mixed, 0.5)) == pytest.approx(0.5)  # a slower forward than the line: scaled


def test_forward_cost_charges_a_drafted_row_its_own_cost_not_a_requests():
    """Forwards of n requests and R rows cost a + c n + b R (a = 40 ms, a request's own work c = 2.5
    ms, a row b = 1 ms; as this CPU measured at 16 requests). Plain forwards alone (R = n) cannot tell
    c from b: their line in rows charges a drafted row c + b = 3.5 ms, so drafting looks 3.5 times its
    price. Once the requests drafted different rows, the fit separates them: a drafted row costs b,
    a plain request a / n + c + b in any mix, and the shares sum to the forward."""
    rng = np.random.default_rng(0)
    a, c, b = 0.040, 0.0025, 0.001
    cost = ForwardCost()
    for _ in range(200):
        n = int(rng.integers(8, 33))
        cost.observe(n, a + c * n + b * n + rng.normal(0, 0.0005), n)  # nobody drafts
    fa, fc, fb = cost.line()
    assert fc == 0 and fb == pytest.approx(c + b, rel=0.1)  # the rows-alone line: a request's work in b
    for _ in range(400):
        n = int(rng.integers(8, 33))
        rows = n + int(rng.integers(0, 2 * n))
        cost.observe(rows, a + c * n + b * rows + rng.normal(0, 0.0005), n)
    fa, fc, fb = cost.line()
    assert (fa, fc, fb) == pytest.approx((a, c, b), rel=0.15)
    mixed = [1] * 8 + [3] * 8
    shares = cost.shares(mixed, fa + fc * 16 + fb * sum(mixed))
    assert shares[0] == pytest.approx(fa / 16 + fc + fb) and shares[8] - shares[0] == pytest.approx(2 * fb)
    assert sum(shares) == pytest.approx(fa + fc * 16 + fb * sum(mixed))


def test_forward_cost_falls_back_to_rows_without_a_usable_line():
    flat, falling, instant = ForwardCost(), ForwardCost(), ForwardCost()
    for i in range(100):
        flat.observe(16, 0.1)  # the rows never varied: no slope to fit
        falling.observe(16 + i % 8, 0.2 - 0.01 * (i % 8))  # more rows, less time: not a cost line
        instant.observe(16 + i % 8, 0.0)  # a clock that never moved: the line a + b rows is 0
    for cost in (flat, falling):
        assert cost.line() is None
    for cost in (flat, falling, instant):
        assert cost.shares([1, 3], 0.04) == pytest.approx([0.01, 0.03])


def test_batched_rounds_share_their_forward_by_the_fitted_line(engine, tok, monkeypatch):
    """In the engine: each step's shares (the forward seconds each request's round or prefill is
    charged) sum to the forward and follow the engine's line, a / n + c + b r_i. (The tiny model's
    forwards barely grow with rows, so the line is fitted beforehand and held: the fit itself is
    tested above.) The engine's forward seconds by phase (its status, /metrics, `bench load`) sum
    the shares: a prefill's to `prefill`, a round's to `decode`."""
    from draftpick.workers.engine import Generation

    class Held(ForwardCost):
        def observe(self, rows, seconds, requests=1):
            pass

    engine.forward_cost = Held()
    for rows in range(10, 40):
        for n in (4, 8):
            ForwardCost.observe(engine.forward_cost, rows, 0.05 + 0.001 * n + 0.002 * rows, n)
    assert engine.forward_cost.line() == pytest.approx((0.05, 0.001, 0.002))
    calls, steps = [], []
    complete = Generation.complete
    start, charged = dict(engine.forward_s), {"prefill": 0.0, "decode": 0.0}

    def spy(self, logits, hidden, forward_s, batch=1, rows=0):
        own = len(self._round_state[3]) + 1 if self._round_state is not None else self._chunk
        calls.append((own, forward_s, batch, rows))
        charged["prefill" if self._round_state is None else "decode"] += forward_s
        return complete(self, logits, hidden, forward_s, batch, rows)

    monkeypatch.setattr(Generation, "complete", spy)
    jobs = [(i, tok(p).input_ids, SamplingParams(max_tokens=30), arm, {}) for i, (p, arm) in enumerate(zip(PROMPTS, ARMS))]
    run_batched(engine, jobs, on_step=lambda live: (steps.append((list(calls), engine.forward_cost.line())), calls.clear()))
    fitted = 0
    for step, line in steps:
        if len(step) < 2:
            continue
        assert sum(r for r, *_ in step) == step[0][3] and all(c[2] == len(step) for c in step)
        shares = [s for _, s, *_ in step]
        if line is None:
            expected = [r / step[0][3] for r, *_ in step]
        else:
            a, c, b = line
            expected = [(a / len(step) + c + b * r) / (a + c * len(step) + b * step[0][3]) for r, *_ in step]
            fitted += len({r for r, *_ in step}) > 1
        assert [s / sum(shares) for s in shares] == pytest.approx(expected)
    assert fitted >= 3  # steps charged by the line, with requests of different rows in them
    assert charged["prefill"] > 0 and charged["decode"] > 0
    assert {k: engine.forward_s[k] - start[k] for k in charged} == pytest.approx(charged)


def test_each_cache_holds_exactly_its_verified_tokens_after_every_batched_step(engine, target, tok):
    def check(live):
        for g in live:
            if g.done or not g.out:
                continue
            assert_holds(target, g, g.ids[:-1])  # everything verified but the pending token

    jobs = [(i, tok(p).input_ids, SamplingParams(max_tokens=20), arm, {}) for i, (p, arm) in enumerate(zip(PROMPTS, ARMS))]
    run_batched(engine, jobs, on_step=check)


def test_chunked_prefill_leaves_every_output_and_cache_exact(engine, target, tok):
    """Prompts run 3 tokens a step, all joining requests together, while the others decode (chunked
    prefill): each cache holds exactly the prompt tokens run so far, then the verified tokens; every
    greedy output (a feature head's included, which reads the prompt's hidden states chunk by chunk)
    is plain greedy; a request appends nothing until its last chunk; and the chunks shared steps
    with rounds."""
    seen = {"mixed": 0, "waited": 0}
    ran: dict[int, int] = {}

    def check(live):
        if len(live) > 1:  # (a request alone stalls no one: it prefills whole)
            assert sum(g.prefilled - ran.get(id(g), 0) for g in live) <= 3  # the step's prompt-token budget
            seen["waited"] += any(g.prefill_left and g.prefilled == ran.get(id(g), 0) for g in live)
        ran.update({id(g): g.prefilled for g in live})
        for g in live:
            if g.done:
                continue
            held = g.prompt_ids[: g.prefilled] if g.prefill_left else g.ids[:-1]
            assert not g.prefill_left or not g.out
            assert_holds(target, g, held)  # (a feature head's hidden states: of the same tokens)
        seen["mixed"] += any(g.prefill_left for g in live) and any(g.records for g in live)

    jobs = [(i, tok(p).input_ids, SamplingParams(max_tokens=24), arm, {}) for i, (p, arm) in enumerate(zip(PROMPTS, ARMS))]
    gens = run_batched(engine, jobs, on_step=check, chunk=3)
    for (_, ids, params, arm, _), g in zip(jobs, gens):
        assert g.out == hf_greedy(target, ids, params.max_tokens), arm
    assert seen["mixed"] > 3 and seen["waited"] > 0  # a later prompt waited for an earlier one's chunks


def test_prompts_that_start_alike_reuse_the_stored_prefix_and_every_output_and_cache_is_exact(engine, target, tok,
                                                                                            monkeypatch):
    """With a prefix cache, a request joining after others prefills only what follows the longest
    stored prefix of its prompt (whole blocks, its tenant's only, never its last token); every cache
    then holds exactly what a fresh forward of its tokens gives, a feature head gets the hidden
    states of the reused tokens too, and every greedy output, batched or alone, is plain greedy."""
    from draftpick.workers.prefix import BLOCK, PrefixCache

    monkeypatch.setattr(engine, "prefix", PrefixCache(256))
    system = "system: you are a tiny model. be brief.\nuser: "
    prompts = [system + p for p in PROMPTS] + [system + PROMPTS[0]]  # the last: a prompt seen before, whole
    tenants = ["a"] * len(PROMPTS) + ["a"]
    tenants[2] = "b"  # the same start, another tenant: nothing of a's to reuse
    arms = ARMS + [Arm("feat", 3)]
    ids = [tok(p).input_ids for p in prompts]
    reused = []

    def check(live):
        for g in live:
            if g.done:
                continue
            assert_holds(target, g, g.ids[:-1])

    before = {"reused": 0}

    def on_step(live):
        reused.append(engine.prefix.reused_tokens - before["reused"])
        before["reused"] = engine.prefix.reused_tokens
        check(live)

    jobs = [(3 * i, x, SamplingParams(max_tokens=16), arm, {"tenant": t})
            for i, (x, arm, t) in enumerate(zip(ids, arms, tenants))]
    gens = run_batched(engine, jobs, on_step=on_step)
    for (_, x, params, arm, _), g in zip(jobs, gens):
        assert g.out == hf_greedy(target, x, params.max_tokens), arm
    # what each request should have found: the whole blocks it shares with an earlier prompt of its tenant
    expected = []
    for i, x in enumerate(ids):
        shared = max([matching_prefix(x, ids[j]) for j in range(i) if tenants[j] == tenants[i]], default=0)
        expected.append(min(shared, len(x) - 1) // BLOCK * BLOCK)
    assert [reused[3 * i] for i in range(len(ids))] == expected
    assert expected[1] >= 4 * BLOCK and expected[2] == 0 and expected[-1] == (len(ids[-1]) - 1) // BLOCK * BLOCK
    # alone (one forward per step), the stored prefix serves too
    start = engine.prefix.reused_tokens
    g = engine.start(tok(system + "y = 3").input_ids, SamplingParams(max_tokens=16), Arm("ngram", 3), tenant="a")
    assert g.run().token_ids == hf_greedy(target, g.prompt_ids, 16)
    assert engine.prefix.reused_tokens - start == matching_prefix(g.prompt_ids, ids[0]) // BLOCK * BLOCK


def test_a_stored_prefix_shortens_a_chunked_prefill_and_every_output_and_cache_stays_exact(engine, target, tok,
                                                                                          monkeypatch):
    """With chunked prefill (4 prompt tokens a step), a request that finds a stored prefix runs its
    chunks from there: after its first step it holds the reused blocks plus one chunk, every cache
    holds exactly the tokens run so far, and every greedy output is plain greedy."""
    from draftpick.workers.prefix import BLOCK, PrefixCache

    monkeypatch.setattr(engine, "prefix", PrefixCache(256))
    system = "system: you are a tiny model. be brief.\nuser: "
    ids = [tok(system + p).input_ids for p in PROMPTS[:4]]
    arms = [Arm("feat", 3), Arm("ngram", 3), Arm("none", 0), Arm("close", 2)]
    first: dict[int, int] = {}

    def check(live):
        for g in live:
            first.setdefault(id(g), g.prefilled)
            if g.done:
                continue
            assert_holds(target, g, g.prompt_ids[: g.prefilled] if g.prefill_left else g.ids[:-1])

    # each joins while the ones before it decode (the first, alone, prefills whole), after their prefills
    jobs = [(16 * i, x, SamplingParams(max_tokens=40), arm, {}) for i, (x, arm) in enumerate(zip(ids, arms))]
    gens = run_batched(engine, jobs, on_step=check, chunk=4)
    for (_, x, params, arm, _), g in zip(jobs, gens):
        assert g.out == hf_greedy(target, x, params.max_tokens), arm
    for i, (x, g) in enumerate(zip(ids[1:], gens[1:]), 1):
        reused = min(max(matching_prefix(x, y) for y in ids[:i]), len(x) - 1) // BLOCK * BLOCK
        assert reused >= 4 * BLOCK and first[id(g)] == reused + min(4, len(x) - reused), (i, first[id(g)], reused)


def test_a_full_prefix_cache_drops_the_later_blocks_of_its_oldest_prefixes_first(target, tok):
    from draftpick.workers.prefix import BLOCK, PrefixCache

    first, second = tok("abcdefghijklmnopqrstuvwxyz0123456789abcdefgh").input_ids, tok("0123456789" * 3).input_ids
    assert len(first) > 5 * BLOCK
    cache, c = PrefixCache(blocks=4), new_cache(target)
    forward(target, c, first)
    cache.store(first, c)
    assert len(cache) == 4 and cache.seed(first, new_cache(target)) == 4 * BLOCK  # its fifth block went, not its first
    cache = PrefixCache(blocks=3)
    for ids in (first, second):
        c = new_cache(target)
        forward(target, c, ids)
        cache.store(ids, c)
        assert len(cache) <= 3
    c = new_cache(target)
    assert cache.seed(second + [1], c) == 3 * BLOCK  # the newest prompt's first three blocks stayed
    c = new_cache(target)
    assert cache.seed(first, c) == 0  # the older prompt's went, first block included
    cache.clear()
    assert len(cache) == 0 and cache.seed(second + [1], new_cache(target)) == 0


def test_sampled_outputs_in_a_batch_follow_the_target_law(engine, target, tok):
    """Unseeded sampling, 16 requests per forward, the accept / reject draws on each request's own
    generator: three sampled tokens (the last two from one speculative round) vs the exact law."""
    ids = sampling_context(target, tok)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    law = exact_law(target, ids, params)
    keys = list(law)
    counts = np.zeros(len(keys))
    alone = SpeculativeEngine(target, tok, {"close": engine.drafters["close"]})
    n, batches = 2000, []
    for b in range(0, n, 16):
        gens = run_batched(alone, [(0, ids, params, Arm("close", 2), {"rng_seed": i}) for i in range(b, b + 16)])
        batches += [g.records[0].batch for g in gens]  # its speculative round
        for g in gens:
            counts[keys.index(tuple(g.out))] += 1
    assert min(batches) == 16
    assert chi2_pvalue(counts, [law[k] for k in keys]) > 1e-3


def test_a_seeded_request_gets_the_same_output_alone_and_in_a_batch(engine, tok):
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    ids = tok(PROMPTS[0]).input_ids
    ref = engine.generate(ids, params, Arm("none", 0)).token_ids
    others = [(0, tok(p).input_ids, SamplingParams(max_tokens=20, temperature=1.0), a, {}) for p, a in zip(PROMPTS[1:], ARMS)]
    for arm in [Arm("close", 3), Arm("ngram", 2), Arm("feat", 4)]:
        gens = run_batched(engine, [(1, ids, params, arm, {})] + others)
        assert gens[0].out == ref, arm


def test_a_lean_head_step_for_many_requests_equals_each_requests_own_step(engine):
    """LeanHead.step_rows: three requests with caches of different lengths, one row each (a draft
    step) and then 2, 1 and 3 rows (a catch-up on verified tokens) in one call: each gets the
    features, and its cache the entries, of its own call."""
    from draftpick.workers.drafters.feature.lean import LeanCache

    d = engine.drafters["feat"]
    g = torch.Generator().manual_seed(0)
    dim = d.out_rows.shape[1]
    alone, together = [LeanCache() for _ in range(3)], [LeanCache() for _ in range(3)]
    for n, a, b in zip([5, 1, 9], alone, together):
        f, e = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
        d.lean(f, e, a)
        d.lean(f, e, b)
    for counts in ([1, 1, 1], [2, 1, 3]):
        f, e = torch.randn(sum(counts), dim, generator=g), torch.randn(sum(counts), dim, generator=g)
        starts = [0, counts[0], counts[0] + counts[1]]
        own = torch.cat([d.lean(f[s:s + t], e[s:s + t], c) for s, t, c in zip(starts, counts, alone)])
        rows = d.lean.step_rows(f, e, together, counts)
        assert torch.allclose(own, rows, atol=1e-5)
        assert torch.equal(d.logits(own).argmax(-1), d.logits(rows).argmax(-1))
        for a, b in zip(alone, together):
            assert a.n == b.n and torch.allclose(a.k[:, :a.n], b.k[:, :b.n], atol=1e-5)


@pytest.mark.parametrize("name", ["feat", "close", "trimmed"])
def test_a_drafters_requests_draft_together_and_as_each_would_alone(engine, target, tok, monkeypatch, name):
    """Several requests on one model or feature drafter (different k, one with a confidence
    threshold, one sampled with a seed), stepping together: their draft steps run in one call per
    step (`propose_batch`), each request drafts what it drafts when the batch drafts one by one
    (the same rounds), and every greedy output is the target's plain greedy output."""
    from draftpick.policies.types import Choice

    drafter = engine.drafters[name]
    sizes = []
    real = drafter.propose_batch
    monkeypatch.setattr(drafter, "propose_batch", lambda asks: sizes.append(len(asks)) or real(asks))
    seeded = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    jobs = [(start, tok(p).input_ids, params, Arm(name, k), kw) for start, p, params, k, kw in [
        (0, PROMPTS[0], SamplingParams(max_tokens=30), 4, {}),
        (0, PROMPTS[1], SamplingParams(max_tokens=20), 2, {}),
        (1, PROMPTS[2], seeded, 3, {}),
        (2, PROMPTS[4], SamplingParams(max_tokens=26), 5,
         {"chooser": lambda g: Choice(Arm(name, 5), 1.0, threshold=0.3)}),
        (0, PROMPTS[5], SamplingParams(max_tokens=16), 3, {})]]
    together = run_batched(engine, jobs)
    assert sizes and max(sizes) >= 4
    # each round drafted in a call of m requests says so (what its draft seconds were shared among)
    calls = Counter(sizes)
    assert Counter(r.draft_group for g in together for r in g.records if r.draft_group > 1) == \
        Counter({m: m * n for m, n in calls.items()})
    engine.batch_drafts = False
    try:
        sizes.clear()
        alone = run_batched(engine, jobs)
    finally:
        engine.batch_drafts = True
    assert not sizes
    assert {r.draft_group for g in alone for r in g.records} == {1}
    for (_, ids, params, arm, _), a, b in zip(jobs, together, alone):
        assert [(r.num_drafted, r.accepted) for r in a.records] == [(r.num_drafted, r.accepted) for r in b.records], arm
        assert a.out == b.out
        if params.temperature == 0:
            assert a.out == hf_greedy(target, ids, params.max_tokens)
    rounds = [r for g in together for r in g.records]
    assert sum(r.num_drafted for r in rounds) > 40 and sum(r.accepted for r in rounds) > 0


def test_a_round_is_chosen_knowing_how_many_others_draft_with_each_drafter_that_drafts_together(engine, tok):
    """Before a round, its chooser sees Generation.co_drafting(): the other requests of the step
    whose last round drafted with each drafter that drafts requests together (what its draft would
    share a call with; policies.costs prices a drafted token by it), counted here from the others'
    records; drafters that draft alone (n-gram) are not counted."""
    from draftpick.policies.types import Choice

    together = {n for n, d in engine.drafters.items() if hasattr(d, "propose_batch")}
    assert {"feat", "close"} <= together and "ngram" not in together
    live, seen = [], []

    def chooser(arm):
        def choose(g):
            others = [o.records[-1].drafter for o in live if o is not g and not o.done and o.records]
            seen.append((g.co_drafting(), dict(Counter(d for d in others if d in together))))
            return Choice(arm, 1.0)
        return choose

    arms = [Arm("feat", 3), Arm("feat", 2), Arm("close", 2), Arm("ngram", 2), Arm("feat", 1)]
    jobs = [(0, tok(p).input_ids, SamplingParams(max_tokens=10 + 2 * i), arm, {"chooser": chooser(arm)})
            for i, (p, arm) in enumerate(zip(PROMPTS, arms))]
    run_batched(engine, jobs, on_step=lambda step: live.__setitem__(slice(None), step))
    assert len(seen) > 20 and all(got == want for got, want in seen)
    # three on the head: each sees the other two, the rest see all three
    assert {got.get("feat", 0) for got, _ in seen} >= {2, 3} and any(got.get("close") for got, _ in seen)


def test_a_cancelled_request_leaves_the_batch_and_the_others_are_unchanged(engine, target, tok):
    got = []
    engine.add_sink(got.append)
    try:
        jobs = [(0, tok(p).input_ids, SamplingParams(max_tokens=30), arm, {}) for p, arm in zip(PROMPTS[:3], ARMS)]
        gens = [engine.start(ids, params, arm) for _, ids, params, arm, _ in jobs]
        for step in range(8):
            engine.step_batch([g for g in gens if not g.done])
            if step == 3:
                gens[1].cancel()  # between steps, as the worker does
        while any(not g.done for g in gens):
            engine.step_batch([g for g in gens if not g.done])
    finally:
        engine.sinks.remove(got.append)
    assert gens[1].finish_reason == "abort" and gens[1].cache is None and 0 < len(gens[1].out) < 30
    assert any(r.token_ids == gens[1].out and r.records for r in got)  # its rounds still fed back
    for i in (0, 2):
        assert gens[i].out == hf_greedy(target, jobs[i][1], 30)
        # steps 1-3 ran three requests' rounds, step 4 two: the cancelled one left the forward
        assert [r.batch for r in gens[i].records[:4]] == [3, 3, 3, 2]


def test_max_rows_cuts_drafts_to_fit_and_output_stays_exact(engine, target, tok):
    jobs = [(0, tok(p).input_ids, SamplingParams(max_tokens=24, ignore_eos=True), Arm("ngram", 8), {}) for p in PROMPTS[:4]]
    gens = run_batched(engine, jobs, max_rows=12)
    rounds = [r for g in gens for r in g.records if r.batch == 4]
    assert rounds and max(r.k for r in rounds) == 2 and max(r.batch_rows for r in rounds) <= 12  # (12 - 4) // 4
    for (_, ids, params, _, _), g in zip(jobs, gens):
        assert g.out == engine.generate(ids, params, Arm("none", 0)).token_ids


def test_a_request_whose_round_fails_fails_alone(engine, target, tok):
    def bad(g):
        raise RuntimeError("chooser broke")

    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    gens = [engine.start(ids[0], SamplingParams(max_tokens=20), Arm("ngram", 3)),
            engine.start(ids[1], SamplingParams(max_tokens=20), Arm("ngram", 3), chooser=bad),
            engine.start(ids[2], SamplingParams(max_tokens=20), Arm("close", 3))]
    errors = []
    while any(not g.done for g in gens):
        errors += [r for r in engine.step_batch([g for g in gens if not g.done]) if isinstance(r, Exception)]
    assert [str(e) for e in errors] == ["chooser broke"] and gens[1].finish_reason == "abort"
    assert gens[0].out == hf_greedy(target, ids[0], 20) and gens[2].out == hf_greedy(target, ids[2], 20)


def test_a_target_that_cannot_batch_steps_each_request_alone(tok):
    target = tiny_sliding_model()
    assert not batchable(target)
    engine = SpeculativeEngine(target, tok, {"ngram": NgramDrafter()})
    jobs = [(0, tok(p).input_ids, SamplingParams(max_tokens=20), Arm("ngram", 3), {}) for p in PROMPTS[:3]]
    gens = run_batched(engine, jobs)
    for (_, ids, *_), g in zip(jobs, gens):
        assert g.out == hf_greedy(target, ids, 20)
        assert all(r.batch == 1 for r in g.records)


# the worker: its loop batches the requests in flight


@pytest.fixture(scope="module")
def worker_cfg(tmp_path_factory, target, tok):
    from draftpick.workers.config import DraftpickConfig

    root = save_models(tmp_path_factory.mktemp("models"), target, tok)
    return DraftpickConfig.model_validate({
        "target": {"name": "tiny", "path": str(root / "target")},
        "drafters": [{"type": "ngram"}, {"type": "suffix"}, {"type": "model", "name": "close", "path": str(root / "close")}],
        "engine": {"device": "cpu"}, "worker": {"torch_threads": 1},
    })


async def _stream(worker, req, after_steps=0, close_after=None):
    while worker.steps < after_steps:  # join once the worker has run that many steps (not by the clock)
        await asyncio.sleep(0.001)
    chunks, gen = [], worker.generate_stream(req)
    async for c in gen:
        chunks.append(c)
        if close_after is not None and len(chunks) == close_after:
            await gen.aclose()  # the client went away
            break
    return chunks


@pytest.mark.parametrize("batching,chunk", [(True, 0), (False, 0), (True, 4)])
def test_worker_serves_concurrent_streams_exactly_batched_or_interleaved(worker_cfg, target, tok, batching, chunk):
    from draftpick.workers.actor import EngineWorker, GenerateRequest

    cfg = worker_cfg.model_copy(update={"worker": worker_cfg.worker.model_copy(update={"batching": batching,
                                                                                     "prefill_chunk": chunk})})
    worker = EngineWorker(cfg)
    arms = [Arm("close", 4), Arm("ngram", 3), Arm("suffix", 2), Arm("none", 0), Arm("ngram", 5)]
    reqs = [GenerateRequest(tok(p).input_ids, SamplingParams(max_tokens=n), arm, request_id=str(i))
            for i, (p, n, arm) in enumerate(zip(PROMPTS, [40, 20, 30, 16, 36], arms))]

    async def main():
        closing = _stream(worker, GenerateRequest(tok(PROMPTS[5]).input_ids, SamplingParams(max_tokens=40), Arm("ngram", 2)),
                          close_after=3)
        return await asyncio.gather(*[_stream(worker, r, after_steps=i) for i, r in enumerate(reqs)], closing)

    *outs, closed = asyncio.run(main())
    for req, chunks in zip(reqs, outs):
        streamed = [t for c in chunks[:-1] for t in c["token_ids"]]
        assert streamed == chunks[-1]["result"]["token_ids"] == hf_greedy(target, req.prompt_ids, req.params.max_tokens)
    records = [r for chunks in outs for r in chunks[-1]["records"]]
    rounds = len(records) + len(outs) + 3  # rounds and prefills, with the closed stream's few
    if chunk:  # a prompt of n tokens takes up to ceil(n / chunk) steps
        rounds += sum(-(-len(r.prompt_ids) // chunk) - 1 for r in reqs)
    if batching:
        assert max(r["batch"] for r in records) >= 4 and worker.steps < 0.75 * rounds  # many steps ran several requests
    else:
        assert {r["batch"] for r in records} == {1} and worker.steps >= rounds
    assert len(closed) == 3 and not worker.running and not worker.joining and worker.in_flight == 0


@pytest.mark.parametrize("chunk", [0, 8])
def test_worker_admits_joining_requests_by_the_rows_the_engine_will_run(worker_cfg, tok, chunk, monkeypatch):
    """Whole prompts each count their tokens against worker.max_batch_tokens (one joins each step
    however long); with chunked prefill the prefilling requests share one budget of `chunk` rows,
    as step_batch runs them, so they all join and the step's forward stays within the bound."""
    from draftpick.workers.actor import EngineWorker, _Slot

    bound = 20  # one 16-token prompt fits, two do not; with chunks of 8 the old count let only two join
    cfg = worker_cfg.model_copy(update={"worker": worker_cfg.worker.model_copy(
        update={"prefill_chunk": chunk, "max_batch_tokens": bound})})
    worker = EngineWorker(cfg)
    prompt = tok(PROMPTS[0]).input_ids[:16]
    assert bound // 2 < len(prompt) <= bound  # one whole prompt fits, two do not
    worker.joining = [_Slot(worker.engine.start(prompt, SamplingParams(max_tokens=8), Arm("ngram", 3))) for _ in range(3)]
    assert worker._admit(chunk) == (3 if chunk else 1)
    from draftpick.workers import engine as module

    rows, forward = [], module.batched_forward

    def counted(model, caches, tokens, *a, **kw):  # the rows of every batched forward
        rows.append(sum(len(t) for t in tokens))
        return forward(model, caches, tokens, *a, **kw)

    monkeypatch.setattr(module, "batched_forward", counted)
    while worker.running:
        worker.engine.step_batch([s.g for s in worker.running], bound, chunk or None)
        worker.running = [s for s in worker.running if not s.g.done]
        worker._admit(chunk)
    assert rows and max(rows) <= bound and not worker.joining


def test_the_worker_runs_its_models_on_the_one_thread_that_loaded_them(worker_cfg, tok, redis_server, monkeypatch):
    """Loading, fingerprinting (the learned state's namespace reads every weight) and every step run
    on the worker's engine thread: torch's OpenMP keeps a team of threads per calling thread, and
    two teams on two cores made a batched step twice as slow (workers.actor). Before, the loop's
    asyncio.to_thread ran steps on the event loop's pool threads and the constructor fingerprinted
    on its own."""
    import threading

    from draftpick.controller import controller
    from draftpick.workers import factory
    from draftpick.workers.actor import EngineWorker, GenerateRequest

    threads = {"build": set(), "fingerprint": set(), "step": set()}

    def on(kind, fn):
        def wrapped(*a, **kw):
            threads[kind].add(threading.get_ident())
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(factory, "build_engine", on("build", factory.build_engine))
    monkeypatch.setattr(controller, "fingerprint", on("fingerprint", controller.fingerprint))
    redis_server.flushall()
    worker = EngineWorker(worker_cfg, f"redis://127.0.0.1:{redis_server.connection_pool.connection_kwargs['port']}/0")
    worker.engine.step_batch = on("step", worker.engine.step_batch)
    reqs = [GenerateRequest(tok(p).input_ids, SamplingParams(max_tokens=12), Arm("ngram", 2)) for p in PROMPTS[:4]]

    async def main():
        return await asyncio.gather(*[_stream(worker, r) for r in reqs])

    try:
        outs = asyncio.run(main())
    finally:
        worker.close()
    assert all(o[-1]["result"]["token_ids"] for o in outs)
    assert len(threads["build"]) == 1 and threads["fingerprint"] == threads["step"] == threads["build"]
    assert threads["build"] != {threading.get_ident()}
