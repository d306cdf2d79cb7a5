"""Messages shared by workers, the controller and policies.

Units are in the field comments; every sequence is indexed by draft position
(position 0 is the first token after the verified prefix).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    verify_s: float  # seconds of the target forward and the accept step
    sync_s: float = 0.0  # seconds spent feeding verified tokens to other model drafters
    propensity: float = 1.0  # probability the policy gave this arm when choosing it
    accepted_per_pos: list[int] = field(default_factory=list)  # [num_drafted], 1 if accepted
    per_drafter: dict[str, list[float]] = field(default_factory=dict)  # name -> [positions]
    load: int = 1  # requests in flight on the worker during this round
    tenant: str = ""  # who asked (never used to share data across tenants)
    context: str = ""  # context tag the policy saw
    features: list[float] = field(default_factory=list)  # the prompt features the policy saw
    temperature: float = 0.0
    time: float = 0.0  # when the round ended (seconds; virtual time in replay)
    threshold: float | None = None  # confidence-threshold stop used while drafting, if any
    rounds: int = 1  # rounds this record sums (1 for the engine's records; more once aggregated)
    arm_tokens: dict[str, float] = field(default_factory=dict)  # full information: "drafter:k" ->
    # tokens that arm would have emitted over these rounds (expected, from per_drafter)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RoundRecord":
        return cls(**data)


def expected_tokens(per_pos: list[float], k: int) -> float:
    """Tokens a round emits when drafting k tokens whose per-position acceptance is per_pos:
    1 + sum_j prod_{i<=j} a_i (the bonus / recovered token plus accepted drafts). Positions that
    were not measured (censored) count as rejected."""
    total, run = 1.0, 1.0
    for a in per_pos[:k]:
        run *= a
        total += run
    return total


def aggregate(records: list[RoundRecord], arms: list[Arm]) -> RoundRecord:
    """One record summing rounds of the same arm (a request's feedback), with arm_tokens filled.

    The counters (emitted, accepted, seconds, rounds) add up, so statistics that are sums of them
    (hedge's) are the same whether folded from the aggregate or round by round; a policy that
    counts observations counts one per aggregate (the replay folds one per request).
    """
    first = records[0]
    arm_tokens = {str(a): 0.0 for a in arms}
    for r in records:
        for a in arms:
            if a.k == 0:
                arm_tokens[str(a)] += 1.0
            elif a.drafter in r.per_drafter:
                arm_tokens[str(a)] += expected_tokens(r.per_drafter[a.drafter], a.k)
            elif a.drafter == r.drafter and a.k == r.k:
                arm_tokens[str(a)] += r.emitted
    arm_tokens = {a: v for a, v in arm_tokens.items() if v > 0 or a.endswith(":0")}
    measured = {a for a in arms if a.k == 0 or all(a.drafter in r.per_drafter for r in records)}
    return RoundRecord(
        drafter=first.drafter, k=first.k, num_drafted=sum(r.num_drafted for r in records),
        accepted=sum(r.accepted for r in records), emitted=sum(r.emitted for r in records),
        draft_s=sum(r.draft_s for r in records), verify_s=sum(r.verify_s for r in records),
        sync_s=sum(r.sync_s for r in records), propensity=first.propensity, load=first.load,
        tenant=first.tenant, context=first.context, features=first.features, temperature=first.temperature,
        time=records[-1].time, threshold=first.threshold, rounds=sum(r.rounds for r in records),
        arm_tokens={a: v for a, v in arm_tokens.items() if Arm.parse(a) in measured},
    )


@dataclass(frozen=True)
class Context:
    """What a policy may look at when it chooses. Built by the ingress, never from policy code."""

    tag: str = ""  # explicit context tag from the request (e.g. "code", "chat"); "" if none
    features: tuple[float, ...] = ()  # cheap prompt features (policies.features.prompt_features)
    temperature: float = 0.0
    load: int = 1  # requests in flight on the worker
    time: float = 0.0  # now (seconds; virtual time in replay), for windowed statistics
    # round-level state, for policies that choose every round (hf-heuristic, draft-length control)
    round: int = 0
    last: RoundRecord | None = None


@dataclass(frozen=True)
class Choice:
    arm: Arm
    propensity: float  # probability the policy had of choosing this arm (1.0 if deterministic)
    threshold: float | None = None  # stop drafting when the drafter's top-1 probability is below this
