"""Configuration of a worker: the target, the drafters, the engine, the Ray actor.

Validated at start-up (pydantic, unknown fields refused), so that nothing
fails on the first request that could have failed before it.
"""
from __future__ import annotations

import re

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "local.yaml"  # the embedded default, shipped in draftpick.deploy


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(_Strict):
    """The target model."""

    name: str = Field(description="Name reported by `draftpick info` and the API")
    path: str = Field(description="HF hub id, local directory, .gguf file, or builtin:<name>")
    gguf_file: str | None = Field(None, description="GGUF file inside `path`, if any")


class NgramConfig(_Strict):
    """`ngram`: prompt lookup, proposes what followed the latest earlier match of the last n tokens."""

    type: Literal["ngram"]
    name: str = Field("ngram", description="drafter name (arms are name:k)")
    min_ngram: int = Field(1, ge=1, description="shortest suffix matched")
    max_ngram: int = Field(3, ge=1, description="longest suffix matched (tried first)")


class SuffixConfig(_Strict):
    """`suffix`: drafts from the tenant's earlier outputs and the request's own output."""

    type: Literal["suffix"]
    name: str = Field("suffix", description="drafter name (arms are name:k)")
    min_ngram: int = Field(2, ge=1, description="shortest suffix matched")
    max_ngram: int = Field(8, ge=1, description="longest suffix matched (tried first)")
    max_tokens_per_tenant: int = Field(200_000, ge=1, description="index bound per tenant")


class _NeuralDrafterConfig(_Strict):
    """Options shared by the neural drafters (`model`, `feature`)."""

    full_information: bool = Field(True, description="measure its acceptance on every round, also when another "
                                   "drafter is played (one forward of it per round); false: only when it is played")
    min_confidence: float = Field(0.0, ge=0, lt=1, description="draft only while the drafter's top-1 probability "
                                  "reaches this; below it at the first position the round is plain decoding "
                                  "(0: always draft k tokens)")


class ModelDrafterConfig(_NeuralDrafterConfig):
    """`model`: a small causal LM with the target's tokenizer and its own KV cache."""

    type: Literal["model"]
    name: str = Field(description="drafter name (arms are name:k)")
    path: str = Field(description="HF hub id, local directory or .gguf file; must share the target's tokenizer")
    gguf_file: str | None = Field(None, description="GGUF file inside `path`, if any")


class FeatureDrafterConfig(_NeuralDrafterConfig):
    """`feature`: an EAGLE-like head on the target's hidden states, made by `draftpick distill`."""

    type: Literal["feature"]
    name: str = Field(description="drafter name (arms are name:k)")
    path: str = Field(description="directory written by `draftpick distill --init feature` for this target "
                      "(a relative path is read from the working directory, else beside the config file)")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the head's arithmetic (drafts need not be exact: verification keeps output lossless); "
        "auto: bf16 on CUDA and on CPUs with native bf16 (avx512_bf16 / amx_bf16), else fp32")


DrafterConfig = Annotated[Union[NgramConfig, SuffixConfig, ModelDrafterConfig, FeatureDrafterConfig],
                          Field(discriminator="type")]


class EngineConfig(_Strict):
    """The speculative engine: where it runs, in which precision, defaults for pinned requests."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU (bf16 on CPU is faster but not lossless there)"
    )
    full_information: bool = Field(True, description="feed verified tokens to every model drafter each round")
    default_drafter: str | None = Field(None, description="drafter used when a request names none "
                                        "(default: the first configured drafter, or `none`)")
    default_k: int = Field(3, ge=0, le=64, description="draft length when a request names a drafter but no k")
    max_k: int = Field(16, ge=0, le=64, description="largest draft length a request or policy may ask for")
    small_batch_linears: bool = Field(
        True, description="on the CPU in fp32, compute the linear layers of 1-64-row forwards (decoding, "
        "verification, batched steps) with whichever product measured fastest on this machine at load "
        "(workers.models.small_batch_linears; the same dot products summed in another order); false keeps "
        "PyTorch's own")
    prefix_cache_blocks: int = Field(
        256, ge=0, description="prompt prefix caching: keep the target's keys and values of up to this many "
        "8-token blocks of earlier prompts, and prefill only what follows the longest stored prefix of a new "
        "prompt (workers.prefix; about 0.37 MB a block for the embedded default); 0 turns it off")
    verify_pad_multiple: int | None = Field(
        None, ge=1, le=16, description="pad multi-token verify forwards to a multiple of this many tokens "
        "(default: 1 on CUDA and for fp32 on the CPU, which runs few-row products on faster paths, see "
        "workers.models.small_batch_linears; 4 for other precisions on the CPU, where PyTorch's 2-, 3-, 6- and "
        "7-row matmuls are slow)")
    capture_path: str | None = Field(
        None, description="opt-in: append each request's prompt and verified output (token ids) to this JSONL "
        "file, for `draftpick distill --prompts FILE`")
    capture_max_bytes: int = Field(100_000_000, ge=1, description="stop capturing once the file is this large")
    capture_stream: str | None = Field(
        None, description="opt-in, instead of capture_path: a Redis stream redis://host:port/db#stream that "
        "receives each request's prompt and verified output")
    capture_max_entries: int = Field(100_000, ge=1, description="the capture stream keeps this many newest requests")

    @model_validator(mode="after")
    def _one_capture(self):
        if self.capture_path and self.capture_stream:
            raise ValueError("set capture_path or capture_stream, not both")
        if self.capture_stream:
            from draftpick.workers.capture import parse_stream_url

            parse_stream_url(self.capture_stream)
        return self


class AutoscalingConfig(_Strict):
    """`worker.autoscaling`: Serve scales the worker replicas between the bounds by requests in flight."""

    min_replicas: int = Field(1, ge=0, description="fewest worker replicas")
    max_replicas: int = Field(1, ge=1, description="most worker replicas")
    target_ongoing_requests: float = Field(8, gt=0, description="requests in flight per replica Serve aims for")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class WorkerConfig(_Strict):
    """The Ray worker actor hosting target and drafters."""

    num_cpus: float = Field(2, gt=0, description="Ray CPU shares per worker actor")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker actor (0 on CPU)")
    torch_threads: int = Field(2, ge=1, description="torch intra-op threads in the actor")
    max_concurrency: int = Field(64, ge=1, description="requests in flight at once per actor (Serve: per worker "
                                 "replica; more wait in Serve's queue, serve.max_queued, then get a 429)")
    batching: bool = Field(True, description="verify all in-flight requests in one target forward per step "
                           "(workers.batched; false: one request's round at a time, interleaved)")
    max_batch_tokens: int = Field(512, ge=1, description="rows (tokens) one batched forward may run: joining "
                                  "prompts wait for the next step beyond it and drafts are cut to fit")
    prefill_chunk: int = Field(0, ge=0, description="batched: the prompt tokens joining requests together run "
                               "per step, first come first served, so the requests in flight are not stalled by "
                               "long prefills (chunked prefill; 0: whole prompts in the step they join)")
    replicas: int = Field(1, ge=1, description="worker replicas of the Serve application (without autoscaling)")
    autoscaling: AutoscalingConfig | None = Field(None, description="scale the worker replicas with load "
                                                    "instead of a fixed number (see below)")


class ServeSection(_Strict):
    """The HTTP endpoint (`draftpick serve`, and the Serve application of deploy/serve.yaml)."""

    name: str = Field("draftpick", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
                      description="the service's name: its Serve application (`draftpick serve`; name the application "
                      "of a Serve config the same), its controller actor `<name>_controller`, its embedded Redis's "
                      "directory (`$DRAFTPICK_HOME/redis`, `redis-<name>` for other names) and its learned state; "
                      "services on one Ray cluster need different names")
    host: str = Field("127.0.0.1", description="address `draftpick serve` listens on (loopback by default)")
    port: int = Field(8000, ge=1, le=65535, description="port `draftpick serve` listens on")
    api_key: str | None = Field(None, description="required as `Authorization: Bearer KEY`; `env:NAME` reads it "
                                "from that environment variable at start-up; unset: $DRAFTPICK_API_KEY, else open")
    max_tokens: int = Field(2048, ge=1, description="largest max_tokens a request may ask for (chat's default)")
    max_queued: int = Field(32, ge=0, description="requests waiting for a worker beyond those running; more "
                            "get a 429 with Retry-After")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (tokenises, parses)")

    def resolved_api_key(self) -> str | None:
        """The key requests must carry (None: open); `env:NAME` must name a set variable."""
        import os

        if self.api_key is None:
            return os.environ.get("DRAFTPICK_API_KEY") or None
        if self.api_key.startswith("env:"):
            name = self.api_key[4:]
            if not os.environ.get(name):
                raise ConfigError(f"serve.api_key: environment variable {name} is not set")
            return os.environ[name]
        return self.api_key


class PolicySection(_Strict):
    """The policy that chooses each request's arm (drafter, k) and learns from the feedback."""

    name: str = Field("contextual", description="built-in name, `draftpick.policies` entry point, or module:Class")
    options: dict = Field(default_factory=dict, description="keyword options of the policy")
    ks: list[int] = Field([1, 2, 3, 5, 8], description="draft lengths offered for every drafter (k = 0 is always offered)")

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks):
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty list of draft lengths >= 1")
        return sorted(set(ks))


class DraftpickConfig(_Strict):
    target: TargetConfig = Field(description="the model whose output is kept")
    drafters: list[DrafterConfig] = Field(default_factory=list, description="drafters by `type`; `none` (k = 0) "
                                          "is always there")
    engine: EngineConfig = Field(EngineConfig(), description="see below")
    worker: WorkerConfig = Field(WorkerConfig(), description="see below")
    policy: PolicySection = Field(PolicySection(), description="see below")
    serve: ServeSection = Field(ServeSection(), description="see below")

    @field_validator("drafters")
    @classmethod
    def _unique_names(cls, drafters):
        names = [d.name for d in drafters]
        if "none" in names:
            raise ValueError("'none' is reserved (plain decoding is always available)")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"drafter names must be unique; repeated: {', '.join(sorted(dup))}")
        for d in drafters:
            if d.type in ("ngram", "suffix") and d.min_ngram > d.max_ngram:
                raise ValueError(f"drafter {d.name!r}: min_ngram ({d.min_ngram}) > max_ngram ({d.max_ngram})")
        return drafters

    @model_validator(mode="after")
    def _default_drafter_exists(self):
        names = {"none"} | {d.name for d in self.drafters}
        if self.engine.default_drafter is not None and self.engine.default_drafter not in names:
            raise ValueError(
                f"engine.default_drafter {self.engine.default_drafter!r} is not a configured drafter "
                f"({', '.join(sorted(names))})"
            )
        if self.engine.default_k > self.engine.max_k:
            raise ValueError(f"engine.default_k ({self.engine.default_k}) > engine.max_k ({self.engine.max_k})")
        if max(self.policy.ks) > self.engine.max_k:
            raise ValueError(f"policy.ks go up to {max(self.policy.ks)} > engine.max_k ({self.engine.max_k})")
        self.build_policy()  # a bad plug-in or option fails here, at start-up
        return self

    def arms(self) -> list:
        from draftpick.policies.types import Arm

        return [Arm("none", 0)] + [Arm(d.name, k) for d in self.drafters for k in self.policy.ks]

    def build_policy(self):
        """The configured policy over the configured arms (policies are named here, never in a request)."""
        from draftpick.policies.registry import PolicyError, create

        try:
            return create(self.policy.name, self.arms(), self.policy.options)
        except PolicyError as e:
            raise ValueError(f"policy: {e}") from None

    def drafter_names(self) -> list[str]:
        return [d.name for d in self.drafters] + ["none"]

    def default_drafter(self) -> str:
        return self.engine.default_drafter or self.drafter_names()[0]

    def describe(self) -> dict:
        """What `draftpick info --json` prints (resolves a built-in target to its local directory)."""
        from draftpick.workers.models import resolve_path

        where, gguf = resolve_path(self.target.path)
        return {
            "target": {"name": self.target.name, "path": where, **({"gguf_file": gguf} if gguf else {})},
            "drafters": self.drafter_names(),
            "drafter_types": {d.name: d.type for d in self.drafters} | {"none": "none"},
            "engine": self.engine.model_dump(),
            "worker": self.worker.model_dump(),
            "policy": {"name": self.policy.name, "options": self.policy.options, "arms": [str(a) for a in self.arms()]},
            "serve": self.serve.model_dump(exclude={"api_key"}) | {"api_key": self.serve.api_key is not None},
        }

    def pinned_arm(self, drafter: str | None = None, k: int | None = None):
        """The arm a request pins (a drafter and/or k), defaults filled in from the engine section."""
        from draftpick.policies.types import Arm

        drafter = drafter or self.default_drafter()
        if drafter not in self.drafter_names():
            raise ValueError(f"drafter {drafter!r} is not configured; choose from {', '.join(self.drafter_names())}")
        k = self.engine.default_k if k is None else k
        if not 0 <= k <= self.engine.max_k:
            raise ValueError(f"num_speculative_tokens must be in [0, {self.engine.max_k}] (engine.max_k), got {k}")
        return Arm("none", 0) if drafter == "none" or k == 0 else Arm(drafter, k)


def default_config_path() -> Path:
    return Path(str(files("draftpick.deploy") / DEFAULT_CONFIG))


def load_config(path: str | Path | None = None) -> DraftpickConfig:
    """Read and validate a YAML configuration; errors name the file and the field."""
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


SECTIONS = [("top level", DraftpickConfig), ("target", TargetConfig), ("drafters: type ngram", NgramConfig),
            ("drafters: type suffix", SuffixConfig), ("drafters: type model", ModelDrafterConfig),
            ("drafters: type feature", FeatureDrafterConfig), ("engine", EngineConfig), ("worker", WorkerConfig),
            ("worker.autoscaling", AutoscalingConfig), ("policy", PolicySection), ("serve", ServeSection)]


def reference_markdown() -> str:
    """docs/configuration.md, generated from the schema above (a test keeps the two equal):
    `python3 -m draftpick.workers.config > docs/configuration.md`."""
    out = ["# Configuration reference", "",
           "Generated from `workers/config.py` by `python3 -m draftpick.workers.config > docs/configuration.md`;",
           "a test checks that this file and the schema agree. Unknown fields are refused at start-up, naming",
           "the field. The embedded default is `deploy/local.yaml`.", ""]
    for title, model in SECTIONS:
        doc = (model.__doc__ or "").strip()
        out += [f"## {title}", ""] + ([doc, ""] if doc and not doc.startswith("Usage docs") else [])
        out += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else _show(f.get_default(call_default_factory=True))
            out.append(f"| `{name}` | {_type(f.annotation)} | {default} | {(f.description or '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def _show(value) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(annotation))  # no module paths
    if "DrafterConfig" in text or "Annotated" in text:
        return "list of drafters"
    return text.replace("|", "or")


if __name__ == "__main__":
    print(reference_markdown(), end="")
