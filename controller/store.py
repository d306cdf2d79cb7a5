"""The learned state in Redis: key schema, the feedback stream, and exactly-once folding.

Schema (version 1; docs/controller.md), every key under `draftpick:v1:<namespace>`:
  :meta      hash   what the namespace is (target, drafters with fingerprints, policy, options, arms)
  :stats     hash   the policy's sufficient statistics (field -> float, HINCRBYFLOAT)
  :totals    hash   requests, rounds, draft_tokens, accepted_tokens, rejected_records, dropped_records
  :arms      hash   "<context>|<arm>|rounds|accepted|emitted|seconds" -> float, for `draftpick stats`
  :feedback  stream one entry per finished request: {"data": JSON {"records": [...], "context", "tenant"}}
  :done      zset   entry ids already folded (bounded), so that no entry is folded twice

The namespace is a hash of the service's name, the target's and every drafter's fingerprint, the
policy, its options and its arms: statistics learned for other weights or another policy (or by
another service) are never reused.

Folding a batch of entries is one Lua script over their summed increments: if any entry of the batch
is already marked done, the script only acknowledges those and returns their ids, and the caller
folds the rest again without them; otherwise it adds the sums to :stats, :totals and :arms (one
HINCRBYFLOAT a field), marks every entry done, acknowledges it and deletes it from the stream. A consumer that dies before the script leaves the entry pending (another claims it with
XAUTOCLAIM); one that dies after it leaves nothing to redo; a stalled consumer that runs the script
for an entry another already folded finds the done mark.
"""
from __future__ import annotations

import hashlib
import json

SCHEMA = 1
GROUP = "draftpick-fold"
DONE_LIMIT = 100_000  # done marks kept (oldest dropped first): far more than can be in flight at once

FOLD = """
local stats, totals, arms, done, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, limit, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local already = {}
for e = 1, n do
  local id = ARGV[3 + e]
  if redis.call('ZSCORE', done, id) then
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    already[#already + 1] = id
  end
end
if #already > 0 then
  return already
end
local i = 4 + 2 * n
for _, key in ipairs({stats, totals, arms}) do
  local m = tonumber(ARGV[i]); i = i + 1
  for j = 1, m do
    redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 1]); i = i + 2
  end
end
for e = 1, n do
  local id = ARGV[3 + e]
  redis.call('ZADD', done, tonumber(ARGV[3 + n + e]), id)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
local extra = redis.call('ZCARD', done) - limit
if extra > 0 then redis.call('ZPOPMIN', done, extra) end
return {}
"""


def namespace(description: dict) -> str:
    """A short, stable name for a (target, drafters, policy) description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Keys:
    def __init__(self, ns: str):
        self.prefix = f"draftpick:v{SCHEMA}:{ns}"
        self.meta, self.stats, self.totals, self.arms = (f"{self.prefix}:{k}" for k in ("meta", "stats", "totals", "arms"))
        self.feedback, self.done = f"{self.prefix}:feedback", f"{self.prefix}:done"

    def all(self) -> list[str]:
        return [self.meta, self.stats, self.totals, self.arms, self.feedback, self.done]


def flatten(*increments: dict[str, float]) -> list:
    """The increments' part of the fold script's ARGV: for each hash its count and field, delta pairs."""
    out: list = []
    for inc in increments:
        out.append(len(inc))
        for k, v in inc.items():
            out += [k, repr(float(v))]
    return out


def entry_score(entry_id: str) -> int:
    """An entry id's milliseconds (the done marks' order)."""
    return int(entry_id.split("-")[0])
