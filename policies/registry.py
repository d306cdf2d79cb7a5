"""Finding policies by name: built-ins, the `draftpick.policies` entry points, or `module:Class`.

Policies are named in configuration only (never in a request) and checked against the
protocol when the service starts, so that a bad plug-in fails there with a clear message.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect

from draftpick.policies.types import Arm

ENTRY_POINT_GROUP = "draftpick.policies"
_BUILTINS: dict[str, type] = {}
_BUILTIN_MODULES = ["fixed", "hf_heuristic", "epsilon_greedy", "ucb1", "sw_ucb", "thompson", "exp3", "hedge",
                    "contextual", "draft_length", "confidence", "batch_table"]


class PolicyError(ValueError):
    pass


def register(name: str):
    def deco(cls):
        cls.name = name
        _BUILTINS[name] = cls
        return cls
    return deco


def builtins() -> dict[str, type]:
    for m in _BUILTIN_MODULES:
        importlib.import_module(f"draftpick.policies.{m}")
    return dict(_BUILTINS)


def resolve(spec: str) -> type:
    """A policy class from a built-in name, an entry point name, or a dotted path `module:Class`."""
    found = builtins()
    if spec in found:
        return found[spec]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            try:
                return ep.load()
            except Exception as e:  # a broken plug-in must not hide behind a generic error
                raise PolicyError(f"policy {spec!r}: entry point {ep.value!r} failed to load: {e}") from e
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module)
        except Exception as e:
            raise PolicyError(f"policy {spec!r}: cannot import module {module!r}: {e}") from e
        try:
            return getattr(obj, attr)
        except AttributeError:
            raise PolicyError(f"policy {spec!r}: module {module!r} has no attribute {attr!r}") from None
    raise PolicyError(
        f"unknown policy {spec!r}: not a built-in ({', '.join(sorted(found))}), not an entry point in "
        f"{ENTRY_POINT_GROUP!r}, and not a 'module:Class' path"
    )


def create(spec: str, arms: list[Arm], config: dict | None = None, offered: dict | None = None):
    """Instantiate and check a policy; every failure is a PolicyError naming the policy.

    The policy is constructed as `cls(arms, **options)`: the options its configuration names, plus
    those of `offered` (e.g. replay's reward `scale`) that it declares and the configuration does
    not set. A policy declares an option by a parameter of that name in its constructor, or a field
    of its `Config` dataclass (the built-ins)."""
    cls = resolve(spec)
    if not callable(cls):
        raise PolicyError(f"policy {spec!r}: {cls!r} is not a class")
    options = dict(config or {})
    for name, value in (offered or {}).items():
        if name not in options and declares(cls, name):
            options[name] = value
    try:
        policy = cls(list(arms), **options)
    except (TypeError, ValueError) as e:
        raise PolicyError(f"policy {spec!r}: bad configuration: {e}") from e
    check(policy, spec)
    return policy


def declares(cls, option: str) -> bool:
    """Whether a policy class takes `option`: a `Config` dataclass field or a named constructor parameter."""
    config = getattr(cls, "Config", None)
    if dataclasses.is_dataclass(config):
        return option in {f.name for f in dataclasses.fields(config)}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(option)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def check(policy, spec: str) -> None:
    missing = [m for m in ("select", "increments") if not callable(getattr(policy, m, None))]
    if missing:
        raise PolicyError(f"policy {spec!r} does not follow the protocol: missing method(s) {', '.join(missing)}")
    level = getattr(policy, "level", "request")
    if level not in ("request", "round"):
        raise PolicyError(f"policy {spec!r}: level must be 'request' or 'round', got {level!r}")
    arms = getattr(policy, "arms", None)
    if not arms or not all(isinstance(a, Arm) for a in arms):
        raise PolicyError(f"policy {spec!r}: `arms` must be a non-empty list of Arm")
    if not getattr(policy, "name", None):
        policy.name = spec
