"""The distribution installs one import name, `draftpick`, and works installed from its wheel:
`draftpick info`, and the README's example plug-in loaded by entry point and by dotted path."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_CHECK = """
import json, sys
import draftpick
from draftpick.policies import Arm
from draftpick.policies.registry import create
arms = [Arm("none", 0), Arm("ngram", 3)]
by_entry_point = create("greedy-mean", arms, {}, offered={"scale": 50.0})
by_path = create("greedy_mean:GreedyMean", arms, {})
try:
    import workers  # noqa: F401  (the old top-level names must be gone)
    old = True
except ImportError:
    old = False
print(json.dumps({"file": draftpick.__file__, "entry_point": type(by_entry_point).__name__,
                  "scale": by_entry_point.scale, "path": type(by_path).__name__, "old_names": old}))
"""


def run(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Built from a copy of the tree without build outputs (a stale build/ would leak into the wheel)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                            "bench-results", ".pytest_cache", ".venv"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)], out)
    return next(out.glob("draftpick-*.whl"))


def test_the_wheel_holds_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"draftpick", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "draftpick/deploy/local.yaml" in names
    assert "draftpick/deploy/drafters/smollm2-chat/head.safetensors" in names
    assert not any(n.startswith("draftpick/tests/") for n in names)


def _plugin(tmp: Path, python: str) -> None:
    """The README's example plug-in as a package of its own, installed with its entry point."""
    src = tmp / "greedy-mean"
    src.mkdir()
    (src / "greedy_mean.py").write_text((ROOT / "examples" / "greedy_mean.py").read_text())
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "greedy-mean"\nversion = "0.1"\n'
        '[project.entry-points."draftpick.policies"]\ngreedy-mean = "greedy_mean:GreedyMean"\n'
        '[tool.setuptools]\npy-modules = ["greedy_mean"]\n')
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)], tmp)
    run([python, "-m", "pip", "install", "-q", "--no-deps", str(next(tmp.glob("greedy_mean-*.whl")))], tmp)


def test_installed_from_the_wheel_it_runs_from_another_folder(wheel, tmp_path):
    """A fresh virtual environment that reuses the installed dependencies, draftpick installed
    without -e: `draftpick info --json` and the plug-in by entry point and by dotted path."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path)
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "draftpick")
    run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path)
    _plugin(tmp_path, python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    info = json.loads(run([cli, "info", "--json"], elsewhere))
    assert info["drafters"][-1] == "none" and Path(info["target"]["path"]).is_dir()
    assert str(venv) in info["config"]  # the embedded configuration of the installed copy
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "greedy-mean")}  # the dotted path needs the module on the path
    got = json.loads(run([python, "-c", PLUGIN_CHECK], elsewhere, env))
    assert str(venv) in got["file"] and str(ROOT) not in got["file"]
    assert got == {**got, "entry_point": "GreedyMean", "scale": 50.0, "path": "GreedyMean", "old_names": False}


def test_the_editable_install_runs_from_another_folder(tmp_path):
    info = json.loads(run([sys.executable, "-m", "draftpick.deploy.cli", "info", "--json"], tmp_path))
    assert info["drafters"][-1] == "none"
    out = run([sys.executable, "-c", "import draftpick, draftpick.workers.engine; print(draftpick.__file__)"], tmp_path)
    assert Path(out.strip()).parent == ROOT
