"""The run configuration: one YAML file, one section per stage, composed from the packages' own models.

A bad file must fail before any work starts, so `load_config` turns pydantic's errors into one
`ConfigError` whose lines name the dotted path, the value given and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.k8s_config import K8sConfig
from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.layout import RunLayout
from jobs.config import EvalConfig, FinetuneConfig, ModelConfig, TrainConfig
from serve.config import ServeConfig


class ClusterConfig(BaseModel):
    """Where the run executes and where its artefacts live."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="Ray address to join (ray://, host:port, auto); None = embedded local Ray"
    )
    dashboard_address: str | None = Field(
        None,
        description="Ray Jobs API address for submit (default: the cluster `raylm cluster up` started, "
        "else http://127.0.0.1:8265)",
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of the embedded Ray (default: 2x cores, so Data and Train fit)"
    )
    storage_path: str = Field("runs", description="run folders and checkpoints: local path or pyarrow URI")
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    auth_token_file: str | None = Field(
        None, description="Ray auth token file (default: RAY_AUTH_TOKEN or ~/.ray)"
    )
    pip: list[str] = Field(default_factory=list, description="runtime_env pip packages for submitted jobs")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="runtime_env env vars for submitted jobs"
    )
    serve_direct_ingress: bool = Field(
        True,
        description="Ray Serve direct ingress on the Ray raylm starts or joins: each endpoint replica also"
        " serves HTTP on its own port (one hop less per token than Serve's proxy, which keeps routing"
        " serve.port on the head node)",
    )
    entrypoint_num_cpus: float = Field(0, ge=0)
    entrypoint_num_gpus: float = Field(0, ge=0)
    autoscaler: typing.Literal["auto", True, False] = Field(
        "auto",
        description="the cluster adds nodes on demand (KubeRay autoscaling), so wait for resources up to "
        "resource_wait_timeout_s instead of failing at once: auto (ask the cluster's autoscaler state; "
        "embedded Ray has none), true or false (override)",
    )
    resource_wait_timeout_s: float = Field(
        600, gt=0, description="with an autoscaler: how long to wait for nodes before giving up"
    )
    node_memory_gb: float | None = Field(
        None, gt=0, description="memory a run may use per node (default: what Ray reports per node)"
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of one GPU, to refuse training runs that cannot fit one"
    )


class RunConfig(BaseModel):
    """Everything one run needs, section by section."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    k8s: K8sConfig = Field(default_factory=K8sConfig)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections, used to tell whether a stage's output is current."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self) -> str:
        """Folder holding every artefact of this run: a URI, or an absolute local path.

        Absolute because Ray workers do not share the driver's working directory.
        """
        storage = self.cluster.storage_path.rstrip("/")
        if "://" not in storage:
            storage = os.path.abspath(storage)
        return f"{storage}/{self.cluster.run_name}"

    @property
    def run_name(self) -> str:
        return self.cluster.run_name

    def layout(self) -> RunLayout:
        """The run folder's paths (a local run folder; a URI run keeps only checkpoints remote)."""
        return RunLayout(Path(self.run_dir()))


class ConfigError(Exception):
    """A configuration problem a user can fix; `str()` is a readable multi-line message."""


class UserError(Exception):
    """A problem the user can fix, found while reaching Ray or checking inputs: one line, exit code 2.

    `raylm`'s entry point prints any that escapes a command as `error: <message>` (no traceback), so
    the checks deep below a command (auth, capacity, model folders) need no handler in each command.
    """


def _allowed(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """Names of the keys accepted at `loc`, for 'unknown key' messages."""
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return ""
        model = _model_of(model.model_fields[part].annotation)
    if model is None:
        return ""
    return "allowed keys: " + ", ".join(sorted(model.model_fields))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found:
                return found
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel] = RunConfig) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        path = ".".join(str(p) for p in loc) or "<root>"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key ({_allowed(model, loc)})")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            shown = json.dumps(given, default=str) if not isinstance(given, dict) else "{...}"
            lines.append(f"{path}: got {shown}; {e['msg'].removeprefix('Value error, ')}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one `--set a.b.c=value` override; the value is parsed as YAML (numbers, lists, booleans)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}={raw}: empty key in dotted path")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}={raw}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run file (None = all defaults), apply `--set` overrides, validate. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: top level must be a mapping of sections ({', '.join(RunConfig.model_fields)})"
            )
        tree = loaded
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved configuration, defaults included, as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
