"""The learned state in Redis: key schema, the feedback stream, and exactly-once folding.

Schema (version 1; docs/controller.md), every key under `draftpick:v1:<namespace>`:
  :meta      hash   what the namespace is (target, drafters with fingerprints, policy, options, arms)
  :stats     hash   the policy's sufficient statistics (field -> float, HINCRBYFLOAT)
  :totals    hash   requests, rounds, draft_tokens, accepted_tokens, rejected_records, dropped_records
  :arms      hash   "<context>|<arm>|rounds|accepted|emitted|seconds" -> float, for `draftpick stats`
  :feedback  stream one entry per finished request: {"data": JSON {"records": [...], "context", "tenant"}}
  :done      zset   entry ids already folded (bounded), so that no entry is folded twice

The namespace is a hash of the target's and every drafter's fingerprint, the policy, its options
and its arms: statistics learned for other weights or another policy are never reused.

Folding a batch of entries is one Lua script: an entry marked done is only acknowledged; the others'
increments are summed and added to :stats, :totals and :arms (one HINCRBYFLOAT a field), and each is
marked done, acknowledged and deleted from the stream. A consumer that dies before the script leaves the entry pending (another claims it with
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
local sums, order = {{}, {}, {}}, {{}, {}, {}}
local i, folded = 4, 0
for e = 1, n do
  local id, score = ARGV[i], tonumber(ARGV[i + 1]); i = i + 2
  local skip = redis.call('ZSCORE', done, id)
  for h = 1, 3 do
    local m = tonumber(ARGV[i]); i = i + 1
    if not skip then
      for j = 1, m do
        local f = ARGV[i]
        if sums[h][f] == nil then sums[h][f] = 0; order[h][#order[h] + 1] = f end
        sums[h][f] = sums[h][f] + tonumber(ARGV[i + 1])
        i = i + 2
      end
    else
      i = i + 2 * m
    end
  end
  if not skip then
    redis.call('ZADD', done, score, id)
    folded = folded + 1
  end
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
local hashes = {stats, totals, arms}
for h = 1, 3 do
  for _, f in ipairs(order[h]) do
    redis.call('HINCRBYFLOAT', hashes[h], f, string.format('%.17g', sums[h][f]))
  end
end
local extra = redis.call('ZCARD', done) - limit
if extra > 0 then redis.call('ZPOPMIN', done, extra) end
return folded
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


def flatten(entry_id: str, *increments: dict[str, float]) -> list:
    """One entry's part of the fold script's ARGV: its id and score, then for each hash its count
    and field, delta pairs."""
    out: list = [entry_id, entry_score(entry_id)]
    for inc in increments:
        out.append(len(inc))
        for k, v in inc.items():
            out += [k, repr(float(v))]
    return out


def entry_score(entry_id: str) -> int:
    """An entry id's milliseconds (the done marks' order)."""
    return int(entry_id.split("-")[0])
