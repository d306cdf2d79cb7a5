"""Messages shared by workers, the controller and policies.

Units are in the field comments; every sequence is indexed by draft position
(position 0 is the first token after the verified prefix).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple


@dataclass(frozen=True, order=True)
class Arm:
    """One choice a policy can make. k = 0 means plain decoding (no drafter runs)."""

    drafter: str  # drafter name as configured ("none" for k = 0)
    k: int  # draft length: tokens proposed per round

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"Arm.k must be >= 0, got {self.k}")

    def __str__(self) -> str:
        return f"{self.drafter}:{self.k}"

    @classmethod
    def parse(cls, text: str) -> "Arm":
        name, _, k = text.rpartition(":")
        if not name:
            raise ValueError(f"arm must look like 'drafter:k', got {text!r}")
        return cls(name, int(k))


@dataclass
class RoundRecord:
    """Feedback from one draft -> verify -> accept round (one target forward).

    `per_drafter` is the full-information part: for every drafter whose
    acceptance could be measured on this round's verified tokens, the
    probability that its own draft would have been accepted at each position
    (0/1 under greedy decoding; 1 - total-variation distance under sampling).
    A drafter's list is as long as the positions it was measured on
    (the tokens this round verified), so longer drafts are censored there.
    """

    drafter: str  # the drafter that drafted this round ("none" when k = 0)
    k: int  # draft length asked for
    num_drafted: int  # tokens actually proposed (<= k; n-gram drafters may find none)
    accepted: int  # leading draft tokens the target accepted (<= num_drafted)
    emitted: int  # tokens appended to the output this round (accepted + 1, less at a stop)
    draft_s: float  # seconds spent drafting
    verify_s: float  # seconds of the target forward (its share by rows when batched) and the accept step
    sync_s: float = 0.0  # seconds spent feeding verified tokens to other model drafters
    propensity: float = 1.0  # probability the policy gave this arm when choosing it
    accepted_per_pos: list[int] = field(default_factory=list)  # [num_drafted], 1 if accepted
    per_drafter: dict[str, list[float]] = field(default_factory=dict)  # name -> [positions]
    load: int = 1  # requests in flight on the worker during this round
    batch: int = 1  # requests whose rows the round's target forward ran (1: a forward of its own)
    batch_rows: int = 0  # rows (tokens) that forward ran, all its requests together (0: not recorded)
    # requests whose drafts one call of the drafter made together, this one's included (1: drafted alone);
    # such a call's seconds are shared by the tokens each drafted, so a drafter's cost depends on it
    draft_group: int = 1
    tenant: str = ""  # who asked (never used to share data across tenants)
    context: str = ""  # context tag the policy saw
    features: list[float] = field(default_factory=list)  # the prompt features the policy saw
    temperature: float = 0.0
    time: float = 0.0  # when the round ended (seconds; virtual time in replay)
    threshold: float | None = None  # confidence-threshold stop used while drafting, if any
    rounds: int = 1  # rounds this record sums (1 for the engine's records; more once aggregated)
    # full information summed over rounds, per drafter and draft position j (see position_counts):
    reach: dict[str, list[float]] = field(default_factory=dict)  # rounds whose position j was judged
    hits: dict[str, list[float]] = field(default_factory=dict)  # ... and accepted
    # exact counterfactuals of deterministic (lookup) drafters: the verified output does not depend on
    # the arm (greedy or seeded), so each such drafter's own rounds can be re-run along it; per
    # drafter, the rounds its arm (drafter, k) takes over `counterfactual_tokens` tokens, k = 1, 2, ..
    counterfactual: dict[str, list[float]] = field(default_factory=dict)
    counterfactual_tokens: float = 0.0
    # ... and the rows those rounds draft (a lookup drafter drafts only where its context matches)
    counterfactual_drafted: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RoundRecord":
        return cls(**data)


def position_counts(per_pos: list[float]) -> tuple[list[float], list[float]]:
    """(reach, hits) of one round's per-position acceptance list: reach[j] = prod_{i<j} a_i (the
    chance position j was judged), hits[j] = prod_{i<=j} a_i (and accepted).

    A list shorter than the draft is censored there (positions beyond were not verified this
    round), so those positions are simply not counted: estimating each position's acceptance as
    sum(hits) / sum(reach) over many rounds (a Kaplan-Meier-style hazard) is then unbiased,
    where counting censored positions as rejections would favour short drafts.
    """
    reach, hits, run = [], [], 1.0
    for a in per_pos:
        reach.append(run)
        run *= a
        hits.append(run)
    return reach, hits


def tokens_per_round(reach: list[float], hits: list[float], k: int) -> float:
    """Expected tokens a round emits with k drafts: 1 + sum_j prod_{i<=j} a_i, a_i = hits_i / reach_i.
    Positions never judged take the last estimated acceptance (1.0 if none: optimism)."""
    total, run, a = 1.0, 1.0, 1.0
    for j in range(k):
        if j < len(reach) and reach[j] > 0:
            a = hits[j] / reach[j]
        run *= a
        total += run
    return total


def _add(acc: dict[str, list[float]], name: str, values: list[float]) -> None:
    cur = acc.setdefault(name, [])
    cur.extend([0.0] * (len(values) - len(cur)))
    for j, v in enumerate(values):
        cur[j] += v


def aggregate(records: list[RoundRecord]) -> RoundRecord:
    """One record summing rounds (a request's feedback), with the full-information counts filled.

    The counters (emitted, accepted, seconds, rounds, reach, hits) add up, so statistics that are
    sums of them are the same whether folded from the aggregate or round by round; a policy that
    counts observations counts one per aggregate (the replay folds one per request).
    """
    first = records[0]
    reach: dict[str, list[float]] = {}
    hits: dict[str, list[float]] = {}
    for r in records:
        if r.reach:  # already aggregated
            for name in r.reach:
                _add(reach, name, r.reach[name])
                _add(hits, name, r.hits[name])
            continue
        for name, per_pos in r.per_drafter.items():
            rc, ht = position_counts(per_pos)
            _add(reach, name, rc)
            _add(hits, name, ht)
    counterfactual: dict[str, list[float]] = {}
    drafted: dict[str, list[float]] = {}
    for r in records:
        for name, rounds in r.counterfactual.items():
            _add(counterfactual, name, rounds)
        for name, rows in r.counterfactual_drafted.items():
            _add(drafted, name, rows)
    return RoundRecord(
        drafter=first.drafter, k=first.k, num_drafted=sum(r.num_drafted for r in records),
        accepted=sum(r.accepted for r in records), emitted=sum(r.emitted for r in records),
        draft_s=sum(r.draft_s for r in records), verify_s=sum(r.verify_s for r in records),
        sync_s=sum(r.sync_s for r in records), propensity=first.propensity, load=first.load,
        batch=round(sum(r.batch * r.rounds for r in records) / sum(r.rounds for r in records)),
        batch_rows=round(sum(r.batch_rows * r.rounds for r in records) / sum(r.rounds for r in records)),
        draft_group=_draft_group(records),
        tenant=first.tenant, context=first.context, features=first.features, temperature=first.temperature,
        time=records[-1].time, threshold=first.threshold, rounds=sum(r.rounds for r in records),
        reach=reach, hits=hits, counterfactual=counterfactual,
        counterfactual_tokens=sum(r.counterfactual_tokens for r in records), counterfactual_drafted=drafted,
    )


def _draft_group(records: list[RoundRecord]) -> int:
    """The group size whose 1 / size is the records' mean of 1 / draft_group weighted by drafted tokens
    (what policies.costs fits a drafter's seconds per token on)."""
    tokens = sum(r.num_drafted for r in records)
    inverse = sum(r.num_drafted / max(r.draft_group, 1) for r in records)
    return max(1, round(tokens / inverse)) if inverse > 0 else 1


class SoFar:
    """A request's rounds so far as one aggregated record, kept up to date one round at a time
    (for round-level choosers: Context.request)."""

    def __init__(self):
        self.record: RoundRecord | None = None
        self.rounds = 0

    def update(self, records: list[RoundRecord]) -> RoundRecord | None:
        """Fold the rounds of `records` not yet seen (records is the request's list so far)."""
        new = records[self.rounds:]
        if new:
            self.record = aggregate(([self.record] if self.record else []) + new)
            self.rounds = len(records)
        return self.record


class Rerun(NamedTuple):
    """A request's rounds so far re-run for each lookup drafter (workers.engine.Generation.rerun)."""
    rounds: dict[str, list[float]]  # {drafter: rounds of (drafter, k) for k = 1, 2, ..}
    tokens: float  # the tokens they emit (after the prefill's)
    drafted: dict[str, list[float]]  # {drafter: rows those rounds draft for k = 1, 2, ..}


@dataclass(frozen=True)
class Context:
    """What a policy may look at when it chooses. Built by the ingress, never from policy code."""

    tag: str = ""  # explicit context tag from the request (e.g. "code", "chat"); "" if none
    features: tuple[float, ...] = ()  # cheap prompt features (policies.features.prompt_features)
    temperature: float = 0.0
    load: int = 1  # requests in flight on the worker
    # the other requests in flight whose last round drafted with each drafter (those a drafter that
    # drafts many requests in one call, e.g. a feature head, would draft this one's round together with)
    drafting: dict[str, int] = field(default_factory=dict)
    time: float = 0.0  # now (seconds; virtual time in replay), for windowed statistics
    # round-level state, for policies that choose every round (hf-heuristic, draft-length control)
    round: int = 0
    last: RoundRecord | None = None
    request: RoundRecord | None = None  # the request's rounds so far, aggregated (policies.types.aggregate)
    # the request's rounds so far re-run for each lookup drafter (workers.engine.Generation.rerun): a function
    # () -> Rerun, or None (sampled without a seed); None: not offered
    rerun: Callable[[], Rerun | None] | None = None
    previous: "Choice | None" = None  # this policy's choice for the last round (its k before the engine cut it)


@dataclass(frozen=True)
class Choice:
    arm: Arm
    propensity: float  # probability the policy had of choosing this arm (1.0 if deterministic)
    threshold: float | None = None  # stop drafting when the drafter's top-1 probability is below this
    # the policy's own note for the request's later rounds: it comes back as context.previous.note
    # (contextual keeps its prediction from the prompt features there, so a round costs no regression)
    note: tuple | None = None
