"""From the job file's ``cluster:`` section to a store: Redis settings, and the job settings a cluster supports.

The single parameter server never reads the ``cluster:`` section; the
cluster roles call :func:`check_cluster_job` first, so a job the cluster
cannot run the same way as one PS is refused with the key to change.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from enclavefl.cluster.redis_store import RedisSettings
from enclavefl.config import JobConfig, RedisConfig, parse_job
from enclavefl.errors import ConfigError

__all__ = ["check_cluster_job", "read_cluster_key", "redis_settings", "redis_settings_from_url", "stored_settings",
           "write_cluster_key"]


def check_cluster_job(config: JobConfig) -> None:
    """Refuses job settings that several servers cannot run as one PS would.

    Raises:
        ConfigError: naming the key: the aggregator must be mergeable (``mean``: each server folds
            a partial sum), rounds synchronous, and secure aggregation off (its stages and modular sum
            run on one server). Differential privacy (central, distributed, local Gaussian or SignDS)
            runs: each server checks its workers' uploads and folds them, the leader merges the sums.
    """
    aggregator = config.server.aggregator.name
    if aggregator != "mean":
        raise ConfigError(f"server.aggregator = {aggregator}: cluster mode needs mean (each server folds a partial "
                          "weighted sum the leader merges; a robust aggregator needs every update in one place)")
    if config.round.mode != "sync":
        raise ConfigError(f"round.mode = {config.round.mode}: cluster mode runs synchronous rounds only")
    if config.privacy.secure_aggregation.enabled:
        raise ConfigError("privacy.secure_aggregation.enabled = true: cluster mode does not support secure "
                          "aggregation yet (its stages and modular sum run on one server)")


def stored_settings(config: JobConfig, blob: bytes) -> JobConfig | None:
    """``config`` with the settings of the job config ``blob`` (the store's) where they differ; None if none do.

    Only the settings an operator may change while a job runs are taken
    (:data:`~enclavefl.server.handle.PATCHABLE`): the rest of ``config`` stays the caller's own.

    Raises:
        ConfigError: ``blob`` is not a valid job config.
    """
    from enclavefl.server.handle import patch_config, settings_of

    try:
        doc = yaml.safe_load(blob)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the job config in the store is not YAML: {exc}") from exc
    stored = parse_job(doc, source="the cluster's store")
    mine, theirs = settings_of(config), settings_of(stored)
    changed = {k: v for k, v in theirs.items() if k in mine and mine[k] != v}
    return patch_config(config, changed, rounds_done=0, round_open=False) if changed else None


def _read_password(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cluster.redis.password_file {path}: cannot read it: {exc.strerror or exc}") from exc
    password = text.strip("\r\n")
    if not password:
        raise ConfigError(f"cluster.redis.password_file {path}: the file is empty")
    return password


def _path(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def redis_settings(redis: RedisConfig, *, base_dir: Path) -> RedisSettings:
    """The :class:`RedisSettings` of the job's ``cluster.redis`` section.

    Args:
        base_dir: the job file's directory; relative paths (CA, certificate, password file) are
            resolved against it.

    Raises:
        ConfigError: the password file cannot be read or is empty.
    """
    password = None if redis.password_file is None else _read_password(Path(_path(base_dir, redis.password_file) or ""))
    return RedisSettings(
        host=redis.host, port=redis.port, db=redis.db, username=redis.username, password=password, tls=redis.tls,
        ca_file=_path(base_dir, redis.ca_cert), cert_file=_path(base_dir, redis.cert), key_file=_path(base_dir, redis.key),
        timeout_s=redis.timeout_s, retries=redis.retries,
    )


def redis_settings_from_url(url: str, *, base: RedisSettings | None = None) -> RedisSettings:
    """``redis://host:port/db`` or ``rediss://...`` (TLS) over ``base``'s other settings.

    A URL carries no password (it would show in the process list): use ``cluster.redis.password_file``.

    Raises:
        ConfigError: not a redis URL, a password in it, or a bad port or db.
    """
    base = base or RedisSettings()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--store {url!r}: {exc}") from exc
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"--store {url!r}: expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    if parts.password is not None:
        raise ConfigError("--store: a password in the URL is refused (it shows in the process list); "
                          "use cluster.redis.password_file")
    db_text = parts.path.strip("/") or str(base.db)
    if not db_text.isdigit() or int(db_text) > 15:
        raise ConfigError(f"--store {url!r}: database must be 0..15, got {db_text!r}")
    return RedisSettings(
        host=parts.hostname, port=port or 6379, db=int(db_text),
        username=unquote(parts.username) if parts.username else base.username, password=base.password,
        tls=parts.scheme == "rediss", ca_file=base.ca_file, cert_file=base.cert_file, key_file=base.key_file,
        connect_timeout_s=base.connect_timeout_s, timeout_s=base.timeout_s, retries=base.retries,
        backoff_base_s=base.backoff_base_s, backoff_cap_s=base.backoff_cap_s,
    )


CLUSTER_KEY_BYTES = 32


def write_cluster_key(path: Path) -> bytes:
    """Makes a fresh random cluster key and writes it to ``path`` (hex, mode 0600, created exclusively).

    For a cluster started on one host (``enclavefl run --servers``); in a deployment the scheduler
    hands the key only to servers whose attestation passes the policy.

    Raises:
        ConfigError: ``path`` exists already or cannot be written.
    """
    key = os.urandom(CLUSTER_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cluster key {path}: cannot create it: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    return key


def read_cluster_key(path: Path) -> bytes:
    """The cluster key in ``path``: 64 hex digits (a trailing newline allowed).

    Raises:
        ConfigError: unreadable, or not 32 bytes of hex (the message never shows the file's content).
    """
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cluster key {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != CLUSTER_KEY_BYTES:
        raise ConfigError(f"cluster key {path}: expected {2 * CLUSTER_KEY_BYTES} hex digits ({CLUSTER_KEY_BYTES} "
                          f"bytes), found {len(text)} characters")
    return key
