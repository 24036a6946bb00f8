"""The job file: one YAML document describes a federated job.

Every section is a frozen pydantic model with ``extra="forbid"``, so an unknown
key, a wrong type or an out-of-range value is refused before anything starts,
with a message naming the file, the dotted key path, the value given and what
is allowed. ``--set section.key=value`` overrides are applied to the raw
document and validated the same way.

Keys of the cloud FL cluster this project replaces are accepted as top-level
aliases (``fl_iteration_num: 20`` means ``job.rounds: 20``); see
:data:`CLOUD_KEY_ALIASES` and the README for the mapping.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from enclavefl.errors import ConfigError

__all__ = [
    "CLOUD_KEY_ALIASES",
    "AttestationConfig",
    "ClientConfig",
    "JobConfig",
    "JobSection",
    "RoundConfig",
    "ServerConfig",
    "SummaryConfig",
    "TaskConfig",
    "TlsConfig",
    "TransportConfig",
    "apply_overrides",
    "load_job",
    "parse_job",
]

MiB = 2**20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax mode would read YAML's `yes`/`true` as 1: `rounds: yes` must be an error.
        field_name = info.field_name
        if isinstance(value, bool) and field_name is not None:
            if cls.model_fields[field_name].annotation in (int, float):
                raise ValueError("expected a number, got a boolean")
        return value


class JobSection(_Section):
    """What the job is called, how long it runs and how many workers `run` starts."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    rounds: int = Field(default=10, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    workers: int = Field(default=3, ge=1, le=1024, description="workers started by `enclavefl run`")


class RoundConfig(_Section):
    """When a round opens, whom it samples, and when it closes."""

    min_workers: int = Field(default=1, ge=1)
    start_window_s: float = Field(default=30.0, gt=0, le=86_400)
    fraction: float = Field(default=1.0, gt=0, le=1)
    update_ratio: float = Field(default=1.0, gt=0, le=1)
    update_window_s: float = Field(default=120.0, gt=0, le=86_400)
    min_updates: int = Field(default=1, ge=1, description="fewer updates at the window's end: retry the round")
    max_retries: int = Field(default=5, ge=0, le=1000)


class TaskConfig(_Section):
    """Which model and data: a built-in task name or a user task ``module:function``."""

    name: str = Field(default="digits-mlp", min_length=1)
    data_dir: str | None = None
    partition: Literal["iid", "dirichlet", "quantity", "writer"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if ":" in value:
            module, _, func = value.partition(":")
            ident = r"[A-Za-z_][A-Za-z0-9_]*"
            if not re.fullmatch(rf"{ident}(\.{ident})*", module) or not re.fullmatch(ident, func):
                raise ValueError("a user task is written 'package.module:function'")
        return value


class ClientConfig(_Section):
    """Local training on each worker."""

    epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0, le=100)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


class ServerConfig(_Section):
    """Aggregation, server optimizer and checkpoints on the parameter server."""

    optimizer: Literal["fedavg"] = "fedavg"
    lr: float = Field(default=1.0, gt=0, le=100, description="server learning rate on the mean delta")
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = Field(default=1, ge=1)
    max_concurrent_uploads: int = Field(default=4, ge=1, le=1024)
    max_concurrent_downloads: int = Field(default=8, ge=1, le=1024)
    max_update_bytes: int = Field(default=8 * 2**30, ge=1)


class TlsConfig(_Section):
    """Certificate files; empty means `enclavefl run` makes a per-job CA itself."""

    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str = "enclavefl-ps"


class TransportConfig(_Section):
    """Where the PS listens and how tensors are chunked on the wire."""

    listen: str = Field(default="127.0.0.1:0", pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")
    chunk_bytes: int = Field(default=2 * MiB, ge=4096, le=64 * MiB)
    tls: TlsConfig = Field(default_factory=TlsConfig)


class AttestationConfig(_Section):
    """How nodes prove their code; see docs/security.md."""

    mode: Literal["simulated", "gramine", "none"] = "simulated"
    policy: str | None = None
    sim_root: str | None = None
    device_dir: str = "/dev/attestation"
    collateral: str | None = None


class SummaryConfig(_Section):
    """Where per-round metrics go (relative to the run directory)."""

    metrics_file: str = "metrics.jsonl"


class JobConfig(_Section):
    """A whole job file."""

    job: JobSection = Field(default_factory=JobSection)
    round: RoundConfig = Field(default_factory=RoundConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    summary: SummaryConfig = Field(default_factory=SummaryConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, suitable for YAML or JSON (the resolved configuration)."""
        return self.model_dump(mode="json")


# Cloud FL cluster key -> (our dotted key, factor applied to the value).
# Its time windows are in milliseconds; ours are in seconds.
CLOUD_KEY_ALIASES: Mapping[str, tuple[str, float | None]] = {
    "fl_iteration_num": ("job.rounds", None),
    "start_fl_job_threshold": ("round.min_workers", None),
    "start_fl_job_time_window": ("round.start_window_s", 0.001),
    "update_model_ratio": ("round.update_ratio", None),
    "update_model_time_window": ("round.update_window_s", 0.001),
    "client_epoch_num": ("client.epochs", None),
    "client_batch_size": ("client.batch_size", None),
    "client_learning_rate": ("client.lr", None),
}


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts) or len(parts) < 2:
        raise ConfigError(f"{source}: '{dotted}' is not a key path; write section.key=value")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' in '{dotted}' is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_aliases(doc: dict[str, Any], source: str) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in CLOUD_KEY_ALIASES}
    for alias, (dotted, factor) in CLOUD_KEY_ALIASES.items():
        if alias not in doc:
            continue
        value = doc[alias]
        if factor is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{source}: {alias} = {value!r}: expected a number of milliseconds")
            value = value * factor
        _set_dotted(out, dotted, value, source)
    return out


def apply_overrides(doc: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of a raw job document with ``section.key=value`` overrides applied.

    Values are read as YAML scalars (``3`` is an int, ``true`` a bool, ``a,b`` a string).
    A cloud FL cluster key may be used in place of the dotted path.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    out = copy.deepcopy(dict(doc))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not a YAML scalar: {exc}") from exc
        if key in CLOUD_KEY_ALIASES:
            out[key] = value
        else:
            _set_dotted(out, key, value, f"--set {item}")
    return out


def _describe(error: Mapping[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        return f"{path}: unknown key (given {given!r})"
    if kind == "missing":
        return f"{path}: required key is missing"
    ctx = error.get("ctx") or {}
    msg = str(error["msg"])
    if "expected" in ctx and kind.startswith("literal"):
        msg = f"must be one of {ctx['expected']}"
    return f"{path} = {given!r}: {msg}"


def parse_job(doc: Any, *, source: str = "<job>", overrides: Iterable[str] = ()) -> JobConfig:
    """Validates a raw job document (already parsed YAML) into a :class:`JobConfig`.

    Raises:
        ConfigError: naming the source, every bad key path, the value and what is allowed.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a job file is a mapping of sections, got {type(doc).__name__}")
    # Aliases in the file first, so a --set in our spelling overrides them; then
    # aliases given with --set.
    doc = _resolve_aliases(copy.deepcopy(doc), source)
    doc = _resolve_aliases(apply_overrides(doc, list(overrides)), "--set")
    try:
        return JobConfig.model_validate(doc)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError(f"{source}: invalid job configuration:\n  " + "\n  ".join(lines)) from None


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Loads and validates a job file (YAML, safe loader only).

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_job(doc, source=str(path), overrides=overrides)
