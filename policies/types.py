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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RoundRecord":
        return cls(**data)
