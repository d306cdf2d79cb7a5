"""Opt-in capture of served traffic (the target's verified outputs) for distillation.

Both are engine sinks (`engine.add_sink(capture)`, done by workers.factory from the
configuration): each finished request writes {"prompt_token_ids", "token_ids", "tenant"}, either as a JSON line
of a local file (writing stops once the file reaches `max_bytes`) or as an entry of a Redis
stream (`redis://host:port/db#stream`; the stream keeps the newest `max_entries`). Both are
bounded. `draftpick distill --prompts FILE|redis://...#stream` trains on them (the target's own
outputs: sequence-level distillation).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path


class TrafficCapture:
    def __init__(self, path: str, max_bytes: int):
        self.path, self.max_bytes = Path(path), max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, result) -> None:
        self.write(result.prompt_token_ids, result.token_ids, result.tenant)

    def write(self, prompt_ids: list[int], token_ids: list[int], tenant: str = "") -> bool:
        line = json.dumps({"prompt_token_ids": prompt_ids, "token_ids": token_ids, "tenant": tenant}) + "\n"
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.max_bytes:
                return False
            with self.path.open("a") as f:
                f.write(line)
        return True


def parse_stream_url(url: str) -> tuple[str, str]:
    """redis://host:port/db#stream -> (Redis URL, stream name)."""
    base, _, stream = url.partition("#")
    if not base.startswith("redis://") or not stream:
        raise ValueError(f"a capture stream is redis://host:port/db#stream, got {url!r}")
    return base, stream


class RedisStreamCapture:
    def __init__(self, url: str, max_entries: int):
        import redis

        base, self.stream = parse_stream_url(url)
        self.client, self.max_entries = redis.Redis.from_url(base), max_entries

    def __call__(self, result) -> None:
        self.write(result.prompt_token_ids, result.token_ids, result.tenant)

    def write(self, prompt_ids: list[int], token_ids: list[int], tenant: str = "") -> bool:
        entry = json.dumps({"prompt_token_ids": prompt_ids, "token_ids": token_ids, "tenant": tenant})
        self.client.xadd(self.stream, {"data": entry}, maxlen=self.max_entries, approximate=False)
        return True


def read_stream(url: str, limit: int) -> list[dict]:
    """The oldest `limit` captured requests of a Redis stream."""
    import redis

    base, stream = parse_stream_url(url)
    try:
        entries = redis.Redis.from_url(base).xrange(stream, count=limit)
    except redis.ConnectionError as e:
        raise ValueError(f"prompts: cannot read {url!r}: {e}") from None
    if not entries:
        raise ValueError(f"prompts: the stream {url!r} is empty or missing")
    return [json.loads(fields[b"data"]) for _, fields in entries]
