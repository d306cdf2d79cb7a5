"""Turn a user's input ({"prompt": ...} or {"messages": [...]}) into token ids."""
from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    pass


def encode_input(tokenizer, item: dict) -> list[int]:
    """{"prompt": str} is a raw completion; {"messages": [{"role", "content"}...]} uses the chat template."""
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise InputError("`messages` must be a non-empty list of {role: str, content: str}")
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    elif "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"]:
            raise InputError("`prompt` must be a non-empty string")
        ids = tokenizer(item["prompt"]).input_ids
    else:
        raise InputError("each input needs `prompt` (text) or `messages` (chat)")
    if not ids:
        raise InputError("the input encodes to no tokens")
    return list(ids)


def iter_jsonl(path: str | Path, what: str = "file", error=ValueError):
    """(line number, object) for each non-empty line; a missing file or bad line raises `error`
    with the path and line number."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Input lines as dicts; a bad line is reported with its number."""
    items = []
    for i, obj in iter_jsonl(path, "prompts file", InputError):
        if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
            raise InputError(f"{path}:{i}: expected an object with `prompt` or `messages`")
        items.append(obj)
    if not items:
        raise InputError(f"{path}: no prompts")
    return items


def encode_inputs(tokenizer, items: list[dict]) -> list[list[int]]:
    """Token ids of each input; a bad one is reported with its number (1-based)."""
    out = []
    for n, item in enumerate(items, 1):
        try:
            out.append(encode_input(tokenizer, item))
        except InputError as e:
            raise InputError(f"prompt {n}: {e}") from None
    return out


def input_text(item: dict) -> str:
    """The text of an input, for the prompt features: its prompt, or its messages' contents joined."""
    return item.get("prompt") or " ".join(m["content"] for m in item["messages"])


def write_jsonl(path: str | Path, lines: list[dict]) -> int:
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return len(lines)
