"""`contextual`: per-context statistics plus a linear model over the request's features.

Both learn from full-information feedback when the engine records it (every drafter's
acceptance on the verified tokens gives every arm's tokens per round, see
policies.types.aggregate), so neither needs to explore to compare arms; costs per round come
from draftpick.policies.costs.

- A request with an explicit context tag (e.g. "code", "chat", a tenant's workload name) is
  decided from its tag's own statistics: the arm with the best throughput in that tag, where an
  arm's tokens/s measured when it was played under the tag are shrunk toward the full-information
  estimate (`prior_seconds` of play), and an arm never played under the tag gets an `optimism`
  bonus so that a close contender is tried once. Measurements matter because the positions where
  rounds start depend on the arm played, so full-information hazards alone misjudge long drafts
  (in the recorded trace they moved the tagged policy from 0.943 to 0.954 of the oracle).
- A request without a tag (or with a tag never seen) is decided by linear models over the cheap
  prompt features (policies.features: bias, length, repetition, code punctuation, newlines,
  temperature, load): for each drafter and draft position, a weighted ridge regression of its
  acceptance on the features (weights: how often the position was judged), plus a LinUCB bonus
  alpha * sqrt(x^T A^-1 x) where the data are thin; the positions' acceptances give each arm's
  tokens per round. For drafters whose rounds were re-run along the outputs (lookup drafters under
  greedy or seeded decoding: RoundRecord.counterfactual), a ridge regression on the features of the
  share of rounds each arm saves (1 - rounds / tokens, weighted by tokens) replaces the position
  hazards, which are biased by where the played arm's rounds started. Rounds per token, not tokens
  per round: averaged over requests weighted by tokens it gives the traffic's own rounds per token
  (sum of rounds / sum of tokens), where the mean of tokens per round leans to the requests that
  copy well (two requests of 64 tokens at 1 and 2 tokens per round average 1.5; together they run
  at 128 / 96 = 1.33). At rounds 1, 2, 4, 8, .. of the request (`switch`) the prediction is shrunk
  toward the request's own rounds, for each arm only as far as they judged its last position
  (`within_request`); a lookup drafter's arms toward its re-run over the tokens so far (Context.rerun), in
  tokens per round and in the rows a round drafts. At batched load levels a lookup arm is priced at its
  rows (policies.costs): those its predicted savings imply, at the rows per round saved the re-run
  requests showed, shrunk toward the request's own re-run (`lookup_rows`).
Statistics: reach|<tag>|<drafter>|j and hit|<tag>|<drafter>|j per tag; ct|<tag>|<arm> (tokens
emitted when played under the tag); A|<drafter>|j|p|q (upper
triangle of sum reach * x x^T) and b|<drafter>|j|p (sum hits * x); cfw|<drafter>, cfA|<drafter>|p|q,
cfsave|<drafter>|k|p and cfround|<drafter>|k for the re-run rounds, cfdraft|<drafter>|k and cfdsave|<drafter>|k
for the rows they drafted and the rounds they saved; the costs of policies.costs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draftpick.policies.base import BasePolicy, PolicyConfig, key, record_arm
from draftpick.policies.costs import cost_increments, round_costs
from draftpick.policies.features import NAMES
from draftpick.policies.estimators import arm_tokens_per_round, position_increments
from draftpick.policies.registry import register
from draftpick.policies.types import Choice, aggregate, tokens_per_round


@dataclass(frozen=True)
class ContextualConfig(PolicyConfig):
    alpha: float = 0.3  # LinUCB exploration weight (acceptance per draft position; chosen on the dev trace)
    cf_alpha: float = 0.1  # LinUCB weight of the re-run (counterfactual) share of rounds saved (chosen on the dev trace)
    ridge: float = 1.0  # regularisation of the linear models
    prior_rounds: float = 5.0  # pseudo-rounds of the cost prior
    prior_seconds: float = 5.0  # under a tag: seconds of play the full-information estimate is worth
    optimism: float = 0.05  # under a tag: bonus of an arm not yet played there
    switch: bool = True  # untagged: revisit the choice at rounds 1, 2, 4, 8, ... (0-based) from the request's own rounds
    # the learned estimate weighs as much as this many of the request's rounds that judged the arm's last position
    switch_prior: float = 16.0
    # for a lookup drafter, the learned estimate weighs as much as this many tokens of the request's own
    # rounds re-run (Context.rerun)
    rerun_prior: float = 16.0


@register("contextual")
class Contextual(BasePolicy):
    Config = ContextualConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.d = len(NAMES)
        self.iu = np.triu_indices(self.d)
        self.drafters = sorted({a.drafter for a in self.arms if a.k})
        self._name_cache: dict = {}
        self.level = "round" if self.cfg.switch else "request"

    def vector(self, features) -> np.ndarray:
        x = np.zeros(self.d)
        f = np.asarray(features, dtype=float)[: self.d] if len(features) else np.array([1.0])
        x[: len(f)] = f
        return x

    def select(self, context, stats, rng):
        tagged = context.tag and stats.get(key("obs", context.tag), 0.0) > 0
        last = context.last
        if last is not None and (tagged or context.round & (context.round - 1)):
            # between switch points (round not a power of two): keep the arm (as chosen, before any cut of k)
            return Choice(context.previous.arm if context.previous else record_arm(last), 1.0,
                          note=context.previous.note if context.previous else None)
        if tagged:
            return Choice(self.arms[int(np.argmax(self.tagged(context.tag, stats)))], 1.0)
        # untagged: the prediction from the features is made once per request (round 0) and carried in
        # the choice's note; each switch point shrinks it toward the request's own rounds so far
        note = context.previous.note if context.previous is not None else None
        prior = np.asarray(note) if note is not None else self.linear(context.features, stats)
        rerun = context.rerun() if context.rerun is not None and context.request is not None else None
        tpr = self.within_request(prior, context.request, rerun) if context.request is not None else prior
        cost = round_costs(stats, self.arms, self.cfg.prior_rounds, load=context.load, drafting=context.drafting,
                           rows=self.lookup_rows(tpr, rerun, stats))
        return Choice(self.arms[int(np.argmax(tpr / cost))], 1.0, note=tuple(prior.tolist()) if self.cfg.switch else None)

    def lookup_rows(self, tpr: np.ndarray, rerun, stats) -> dict[int, tuple[float, float]] | None:
        """{arm index: (rows a round of the lookup arm would draft for this request, weight)} for
        policies.costs.round_costs (which uses them at batched load levels): the rows its tokens per
        round `tpr` imply, at the rows the arm drafted per round it saved over the requests re-run
        (`drafted_per_saved`), shrunk toward the request's own re-run where there is one
        (`rerun_rows`); weight 1 where that ratio is known, else the re-run's own weight.

        A lookup drafter drafts only where the request matches, so its rows go with its savings: an arm
        predicted to save nothing drafts nothing and costs a plain round, and a long draft costs its
        rows. Priced instead by its draft length (the level's verify seconds by k, fitted where short
        drafts were played), `ngram:8` opened 18 of 64 requests at 16 clients at the endpoint; priced at
        the rows it drafted for the requests that played it, a request that rarely copies was moved to
        plain decoding (docs/results.md)."""
        mine = self.rerun_rows(rerun) or {}
        out = dict(mine)
        for i, per_saved in self.drafted_per_saved(stats).items():
            rows, w = mine.get(i, (0.0, 0.0))
            out[i] = (w * rows + (1 - w) * per_saved * max(tpr[i] - 1.0, 0.0), 1.0)
        return out or None

    def drafted_per_saved(self, stats) -> dict[int, float]:
        """{arm index: rows the lookup arm drafted per round it saved}, over the requests whose rounds were
        re-run (cfdraft|<drafter>|k, cfdsave|<drafter>|k): about 1 / its acceptance where it drafts, which
        differs far less between requests than how often it drafts."""
        out = {}
        for i, arm in enumerate(self.arms):
            if arm.k:
                rows = stats.get(key("cfdraft", arm.drafter, arm.k), 0.0)
                saved = stats.get(key("cfdsave", arm.drafter, arm.k), 0.0)
                if rows > 0 and saved > 0:
                    out[i] = rows / saved
        return out

    def rerun_rows(self, rerun) -> dict[int, tuple[float, float]] | None:
        """{arm index: (rows a round of the arm drafted in the request's rounds so far re-run, their
        weight: tokens so far against `rerun_prior`)} for the lookup arms the re-run covers (what
        `lookup_rows` shrinks toward)."""
        if rerun is None or rerun.tokens <= 0:
            return None
        w = rerun.tokens / (rerun.tokens + self.cfg.rerun_prior)
        return {i: (rerun.drafted[arm.drafter][arm.k - 1] / rerun.rounds[arm.drafter][arm.k - 1], w)
                for i, arm in enumerate(self.arms)
                if arm.k and len(rerun.rounds.get(arm.drafter, ())) >= arm.k and rerun.rounds[arm.drafter][arm.k - 1]}

    def within_request(self, tpr: np.ndarray, so_far, rerun=None) -> np.ndarray:
        """[K] tokens per round shrunk toward what the request's own rounds so far show: for each
        drafter measured in them (every full-information drafter on the tokens each round verified; a
        head where it was played), its per-position acceptance gives the arm's tokens per round,
        weighed by the request's rounds that judged the arm's last position against `switch_prior`
        of the learned estimate. An arm whose last position the rounds never judged keeps the learned
        estimate: two accepted drafts say little about the eighth (weighed by the rounds judged at the
        first position, a head's k = 8 looked as good as its first two positions and the policy
        switched to it; the dev trace went from 0.925 to 0.955 of the oracle, docs/results.md). A
        request that copies from its prompt shows it within a few rounds, whatever its features said.

        A lookup drafter's arms whose rounds the request re-ran (`rerun`: what Context.rerun returns, the
        exact rounds each (drafter, k) would have taken over its tokens so far) are shrunk toward those
        instead, in the share of rounds saved (1 - rounds / tokens, as the learned estimate is fitted),
        the tokens so far against `rerun_prior` tokens of the learned estimate. The rounds judge
        every k, where the played arm's rounds judge no position past the tokens they verified (a
        request playing ngram:1 kept the features' estimate of ngram:8, 3.3-7.7 tokens a round at 16
        clients, against its 1.5; docs/results.md)."""
        out = tpr.copy()
        m = self.cfg.switch_prior
        rounds, tokens = (rerun.rounds, rerun.tokens) if rerun is not None else ({}, 0.0)
        for i, arm in enumerate(self.arms):
            if arm.k and tokens > 0 and len(rounds.get(arm.drafter, ())) >= arm.k:
                saved = (tokens * (1.0 - rounds[arm.drafter][arm.k - 1] / tokens)
                         + self.cfg.rerun_prior * (1.0 - 1.0 / tpr[i])) / (tokens + self.cfg.rerun_prior)
                out[i] = 1.0 / (1.0 - saved)
                continue
            reach = so_far.reach.get(arm.drafter) if arm.k else None
            w = reach[arm.k - 1] if reach and len(reach) >= arm.k else 0.0
            if w <= 0:
                continue
            own = tokens_per_round(reach, so_far.hits[arm.drafter], arm.k)
            out[i] = (w * own + m * tpr[i]) / (w + m)
        return out

    def tagged(self, tag, stats) -> np.ndarray:
        """[K] tokens/s of each arm under `tag`: what the arm measured when played there, shrunk
        toward the full-information estimate (every round's verified tokens give every arm's
        tokens per round, but the positions where rounds start depend on the arm played, so that
        estimate drifts from what the arm itself gets); an arm not yet played under the tag
        counts `optimism` better, so a close contender is tried there once."""
        tpr = arm_tokens_per_round(stats, self.arms, prefix=tag)
        estimate = tpr / round_costs(stats, self.arms, self.cfg.prior_rounds, tag=tag)
        tokens = np.array([stats.get(key("ct", tag, a), 0.0) for a in self.arms])
        seconds = np.array([stats.get(key("cs", tag, a), 0.0) for a in self.arms])
        prior = self.cfg.prior_seconds
        thr = (tokens + prior * estimate) / (seconds + prior)
        return np.where(seconds > 0, thr, thr * (1 + self.cfg.optimism))

    def linear(self, features, stats) -> np.ndarray:
        """[K] optimistic tokens per round of each arm predicted from the features."""
        x = self.vector(features)  # [d]
        cols = [(X, j) for X in self.drafters for j in range(self.max_k)]
        n, d = len(cols), self.d
        A = np.zeros((n, d, d))
        b = np.zeros((n, d))
        for i, (X, j) in enumerate(cols):
            bk, ak = self._names(X, j)
            A[i][self.iu] = [stats.get(ak[p][q], 0.0) for p, q in zip(*self.iu)]
            b[i] = [stats.get(bk[p], 0.0) for p in range(d)]
        A = A + np.triu(A, 1).transpose(0, 2, 1) + self.cfg.ridge * np.eye(d)  # symmetric [n, d, d]
        rhs = np.concatenate([b[..., None], np.broadcast_to(x, (n, d))[..., None]], -1)  # [n, d, 2]
        sol = np.linalg.solve(A, rhs)
        theta, ainv_x = sol[..., 0], sol[..., 1]  # [n, d] each
        acc = np.clip(theta @ x + self.cfg.alpha * np.sqrt(np.maximum(ainv_x @ x, 0)), 0.0, 1.0)  # [n]
        a = dict(zip(cols, acc))
        tpr = np.array([tokens_per_round([1.0] * arm.k, [a[(arm.drafter, j)] for j in range(arm.k)], arm.k)
                        for arm in self.arms])
        return self._counterfactual_linear(x, stats, tpr)

    def _counterfactual_linear(self, x, stats, tpr: np.ndarray) -> np.ndarray:
        """Where a drafter's rounds were re-run along the outputs (lookup drafters, greedy or seeded),
        its arms' tokens per round come from a ridge regression on the features of the share of
        rounds the arm saved there (1 - rounds / tokens, weighted by tokens), with the same LinUCB
        bonus, instead of from position hazards: tokens per round = 1 / (1 - saved), at most k + 1."""
        out = tpr.copy()
        d = self.d
        for X in self.drafters:
            if stats.get(key("cfw", X), 0.0) <= 0:
                continue
            A = np.zeros((d, d))
            A[self.iu] = [stats.get(key("cfA", X, p, q), 0.0) for p, q in zip(*self.iu)]
            A = A + np.triu(A, 1).T + self.cfg.ridge * np.eye(d)
            idx = [i for i, arm in enumerate(self.arms)
                   if arm.drafter == X and arm.k and stats.get(key("cfround", X, arm.k), 0.0) > 0]
            if not idx:
                continue
            b = np.array([[stats.get(key("cfsave", X, self.arms[i].k, p), 0.0) for p in range(d)] for i in idx])
            sol = np.linalg.solve(A, np.concatenate([b.T, x[:, None]], 1))  # one solve: [d, arms + 1]
            theta, ainv_x = sol[:, :-1].T, sol[:, -1]
            bonus = self.cfg.cf_alpha * np.sqrt(max(ainv_x @ x, 0.0))
            # the share of rounds saved is 0 for plain decoding, so the ridge pulls an unseen request
            # toward it; a k-token draft saves at most k / (k + 1)
            ks = np.array([self.arms[i].k for i in idx], dtype=float)
            out[idx] = 1.0 / (1.0 - np.clip(theta @ x + bonus, 0.0, ks / (ks + 1)))
        return out

    def increments(self, record):
        if not record.reach:
            record = aggregate([record])
        inc = cost_increments(record, tag=record.context)
        if record.context:
            inc[key("obs", record.context)] = 1.0
            inc.update(position_increments(record, prefix=record.context))
        x = self.vector(record.features)
        nz = np.flatnonzero(x).tolist()
        xs = x.tolist()
        for X, reach in record.reach.items():
            for j, (r, h) in enumerate(zip(reach, record.hits[X])):
                if not r or j >= self.max_k:
                    continue
                bk, ak = self._names(X, j)
                for i, p in enumerate(nz):
                    inc[bk[p]] = h * xs[p]
                    for q in nz[i:]:
                        inc[ak[p][q]] = r * xs[p] * xs[q]
        w = record.counterfactual_tokens
        for X, rounds in record.counterfactual.items() if w else ():
            inc[key("cfw", X)] = w
            for i, p in enumerate(nz):
                for q in nz[i:]:
                    inc[key("cfA", X, p, q)] = w * xs[p] * xs[q]
            drafted = record.counterfactual_drafted.get(X, ())
            for k, n in enumerate(rounds, start=1):
                inc[key("cfround", X, k)] = n
                y = 1.0 - n / w  # the share of plain decoding's rounds (one a token) the arm saved
                for p in nz:
                    inc[key("cfsave", X, k, p)] = w * y * xs[p]
                # the rows those rounds drafted, and the rounds they saved: kept apart from cfw and cfround,
                # which also sum records that carry no rows
                if k <= len(drafted):
                    inc[key("cfdraft", X, k)] = drafted[k - 1]
                    inc[key("cfdsave", X, k)] = w - n
        return inc

    def _names(self, drafter, j):
        """The b|drafter|j|p and A|drafter|j|p|q statistic names (built once: replay calls this a lot)."""
        names = self._name_cache.get((drafter, j))
        if names is None:
            names = ([key("b", drafter, j, p) for p in range(self.d)],
                     [[key("A", drafter, j, p, q) for q in range(self.d)] for p in range(self.d)])
            self._name_cache[(drafter, j)] = names
        return names
