"""`batch-table`: a static table of draft length by load, like vLLM's per-batch-size speculation.

What speculation is worth falls as the batch fills (a drafted token costs a larger share of a
batched forward, see policies.costs), so serving engines keep a fixed table: draft k tokens while
fewer than so many requests are in flight, fewer above, none beyond. This policy is that table,
for one drafter, with no learning: the baseline the learned policies are measured against
(`draftpick bench load`). Options: `drafter` (default: the first drafter among the arms) and
`table`, {from this many requests in flight: k}; k = 0 is plain decoding. The default table,
{1: 3, 4: 2, 8: 1, 16: 0}, takes for each k the longest of the drafter's draft lengths up to it; a
table given must name draft lengths among the arms.
"""
from __future__ import annotations

from dataclasses import dataclass

from draftpick.policies.base import BasePolicy, PolicyConfig, pick_drafter
from draftpick.policies.registry import register
from draftpick.policies.types import Arm, Choice


DEFAULT_TABLE = {1: 3, 4: 2, 8: 1, 16: 0}


@dataclass(frozen=True)
class BatchTableConfig(PolicyConfig):
    drafter: str = ""
    table: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.table is None:
            return
        try:
            table = {int(n): int(k) for n, k in dict(self.table).items()}
        except (TypeError, ValueError):
            raise ValueError(f"table must map requests in flight to a draft length, e.g. {{1: 3, 16: 0}}; "
                             f"got {self.table!r}") from None
        if not table or min(table) != 1 or min(table.values()) < 0:
            raise ValueError(f"table must start at 1 request in flight and give draft lengths >= 0; got {table}")
        object.__setattr__(self, "table", dict(sorted(table.items())))


@register("batch-table")
class BatchTable(BasePolicy):
    Config = BatchTableConfig

    def __init__(self, arms, **config):
        super().__init__(arms, **config)
        self.drafter = pick_drafter(self.arms, self.cfg.drafter)
        table = self.cfg.table
        if table is None:
            ks = [a.k for a in self.arms if a.drafter == self.drafter]
            table = {n: max([j for j in ks if j <= k], default=0) for n, k in DEFAULT_TABLE.items()}
        self.rows = [(n, Arm(self.drafter, k) if k else Arm("none", 0)) for n, k in table.items()]
        missing = [str(a) for _, a in self.rows if a not in self.arms]
        if missing:
            raise ValueError(f"table arm(s) {', '.join(missing)} are not among the arms (policy.ks)")

    def select(self, context, stats, rng):
        arm = self.rows[0][1]
        for n, a in self.rows:
            if context.load >= n:
                arm = a
        return Choice(arm, 1.0)

    def increments(self, record):
        return self.mean_increments(record)  # kept so that its arms' values are visible
