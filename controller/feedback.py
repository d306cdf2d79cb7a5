"""Feedback: an engine sink that appends each finished request's round records to the Redis stream,
and the boundary check every record passes before it is folded.

The sink never blocks generation: `__call__` only puts the entry in a bounded in-memory buffer; a
background thread appends buffered entries (XADD) in order, retrying with backoff while Redis is
down. Only when the buffer is full is an entry dropped, counted and logged; the count reaches
Redis (`totals.dropped_records`) with the next successful append.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque

from draftpick.policies.types import RoundRecord

log = logging.getLogger(__name__)
CONTEXT = re.compile(r"^[A-Za-z0-9_.:/-]{0,64}$")


def entry(result) -> dict:
    """The stream entry of a finished request (workers.engine.GenerationResult)."""
    return {"records": [r.to_dict() for r in result.records], "context": result.context, "tenant": result.tenant}


class FeedbackSink:
    BATCH = 64  # entries appended per round trip at most

    def __init__(self, client, stream: str, totals: str, max_buffer: int = 10_000, max_backoff: float = 2.0):
        self.client, self.stream, self.totals = client, stream, totals
        self.buffer: deque[str] = deque()
        self.max_buffer, self.max_backoff = max_buffer, max_backoff
        self.dropped = 0  # entries dropped since the last successful append (then added to Redis)
        self.dropped_total = 0
        self.appended = 0
        self.last_error: str | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="draftpick-feedback", daemon=True)
        self._thread.start()

    def __call__(self, result) -> None:
        if result.records:  # a request cancelled before its first round has nothing to learn from
            self.put(json.dumps(entry(result)))

    def put(self, data: str) -> None:
        with self._cv:
            if len(self.buffer) >= self.max_buffer:
                self.dropped += 1
                self.dropped_total += 1
                log.warning("draftpick: feedback buffer full (%d entries): one request's feedback dropped",
                            self.max_buffer)
                return
            self.buffer.append(data)
            self._cv.notify()

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cv:
                while not self.buffer and not self._stop:
                    self._cv.wait()
                if not self.buffer and self._stop:
                    return
                batch, dropped = list(self.buffer)[: self.BATCH], self.dropped
            try:  # the oldest entries in order, one round trip (with the count of what was dropped before them)
                pipe = self.client.pipeline(transaction=bool(dropped))
                for data in batch:
                    pipe.xadd(self.stream, {"data": data})
                if dropped:
                    pipe.hincrbyfloat(self.totals, "dropped_records", dropped)
                pipe.execute()
            except Exception as e:  # Redis down or unreachable: keep the entries, retry with backoff
                self.last_error = f"{type(e).__name__}: {e}"
                if self._stop and self._give_up:
                    return
                time.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff)
                continue
            backoff, self.last_error = 0.05, None
            with self._cv:
                for _ in batch:
                    self.buffer.popleft()
                self.dropped -= dropped
                self.appended += len(batch)
                self._cv.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every buffered entry is appended; False if the timeout came first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the thread; returns whether everything was appended."""
        ok = self.flush(timeout)
        with self._cv:
            self._stop, self._give_up = True, True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        return ok

    _give_up = False

    def status(self) -> dict:
        return {"buffered": len(self.buffer), "appended": self.appended, "dropped": self.dropped_total,
                "redis_error": self.last_error}


class BadRecord(ValueError):
    pass


def check_record(r: RoundRecord, drafters: set[str], max_k: int) -> None:
    """Refuse a record that could not have come from the engine of this configuration."""
    numbers = {"k": r.k, "num_drafted": r.num_drafted, "accepted": r.accepted, "emitted": r.emitted,
               "draft_s": r.draft_s, "verify_s": r.verify_s, "sync_s": r.sync_s, "propensity": r.propensity,
               "load": r.load, "batch": r.batch, "batch_rows": r.batch_rows, "draft_group": r.draft_group,
               "temperature": r.temperature, "rounds": r.rounds}
    for name, v in numbers.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise BadRecord(f"{name} must be a finite number >= 0, got {v!r}")
    if r.drafter not in drafters:
        raise BadRecord(f"unknown drafter {r.drafter!r}")
    if r.draft_group < 1:
        raise BadRecord(f"draft_group must be >= 1 (the round's own request), got {r.draft_group!r}")
    if (r.drafter == "none") != (r.k == 0) or r.k > max_k:
        raise BadRecord(f"impossible arm {r.drafter}:{r.k} (max_k {max_k})")
    if not r.accepted <= r.num_drafted <= r.k or not 1 <= r.emitted <= r.accepted + 1:
        raise BadRecord(f"impossible counts: k {r.k}, drafted {r.num_drafted}, accepted {r.accepted}, "
                        f"emitted {r.emitted}")
    if not 0 < r.propensity <= 1:
        raise BadRecord(f"propensity must be in (0, 1], got {r.propensity!r}")
    if not isinstance(r.context, str) or not CONTEXT.match(r.context):
        raise BadRecord(f"context must be up to 64 letters, digits or _.:/-, got {r.context!r}")
    for name, values in r.per_drafter.items():
        if name not in drafters:
            raise BadRecord(f"unknown drafter {name!r} in the full-information feedback")
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values):
            raise BadRecord(f"acceptance of {name!r} must lie in [0, 1]")
    tokens = r.counterfactual_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not 0 <= tokens < math.inf:
        raise BadRecord(f"counterfactual_tokens must be a finite number >= 0, got {tokens!r}")
    for name, rounds in r.counterfactual.items():
        if name not in drafters:
            raise BadRecord(f"unknown drafter {name!r} in the counterfactual feedback")
        if len(rounds) > max_k or not all(isinstance(v, (int, float)) and 0 < v <= max(tokens, 1) for v in rounds):
            raise BadRecord(f"counterfactual rounds of {name!r}: at most {max_k} values in (0, tokens]")
    for name, rows in r.counterfactual_drafted.items():
        if name not in r.counterfactual:
            raise BadRecord(f"counterfactual_drafted of {name!r} without its counterfactual rounds")
        if len(rows) > max_k or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and 0 <= v <= k * max(tokens, 1) for k, v in enumerate(rows, start=1)):
            raise BadRecord(f"counterfactual_drafted of {name!r}: at most {max_k} values, the k-th in [0, k x tokens]")


def parse_entry(data: bytes | str, drafters: set[str], max_k: int) -> tuple[list[RoundRecord], str]:
    """(records, context) of a stream entry, every record checked; BadRecord otherwise."""
    try:
        obj = json.loads(data)
        records = [RoundRecord.from_dict(d) for d in obj["records"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BadRecord(f"not a feedback entry: {e}") from None
    if not records:
        raise BadRecord("an entry without records")
    for r in records:
        check_record(r, drafters, max_k)
    return records, records[0].context
