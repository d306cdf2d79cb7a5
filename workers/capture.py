"""Opt-in capture of served traffic (the target's verified outputs) for distillation.

Each finished request appends {"prompt_token_ids", "token_ids", "tenant"} as a JSON line; writing
stops once the file reaches `max_bytes`, so the capture is bounded. `draftpick distill --prompts
FILE` trains on these lines (the target's own outputs: sequence-level distillation).
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

    def write(self, prompt_ids: list[int], token_ids: list[int], tenant: str = "") -> bool:
        line = json.dumps({"prompt_token_ids": prompt_ids, "token_ids": token_ids, "tenant": tenant}) + "\n"
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.max_bytes:
                return False
            with self.path.open("a") as f:
                f.write(line)
        return True
