"""Benchmarks (`draftpick bench ...`) and the installed prompt sets they use."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def machine() -> str:
    """The machine a benchmark ran on, as its reports print it."""
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_results(out_dir: str, kind: str, report: dict, md: str) -> None:
    """OUT/<kind>-<time>.json and .md; the markdown is also printed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{kind}-{stamp}.json").write_text(json.dumps(report, indent=1))
    (out / f"{kind}-{stamp}.md").write_text(md)
    print(md)
    print(f"wrote {out / f'{kind}-{stamp}.json'} and .md", file=sys.stderr)
