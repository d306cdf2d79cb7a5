"""Load and validate a draftpick YAML file; errors name the file and the field."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import ValidationError

from workers.config import DraftpickConfig

DEFAULT_CONFIG = "local.yaml"


class ConfigError(ValueError):
    pass


def default_config_path() -> Path:
    return Path(str(files("deploy") / DEFAULT_CONFIG))


def load_config(path: str | Path | None = None) -> DraftpickConfig:
    path = Path(path) if path else default_config_path()
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    _resolve_drafter_paths(data, path.parent)
    try:
        return DraftpickConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"config {path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _resolve_drafter_paths(data: dict, base: Path) -> None:
    """A drafter `path` that names a directory relative to the config file is read from there (the
    embedded config ships its feature drafters beside it); anything else is left as written."""
    for d in data.get("drafters") or []:
        if isinstance(d, dict) and isinstance(d.get("path"), str) and not Path(d["path"]).is_absolute():
            candidate = base / d["path"]
            if candidate.exists() and not Path(d["path"]).exists():
                d["path"] = str(candidate)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"field `{where}`: {err['msg']}"
