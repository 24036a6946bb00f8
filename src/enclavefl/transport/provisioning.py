"""Credentials from a job: its ``transport.tls`` and ``attestation`` sections turned into TLS identities.

A PS or worker process calls :func:`make_credentials` once at start. With
``attestation.mode`` ``none`` that is mutual TLS under the per-job CA
(``enclavefl certs``); with ``simulated`` or ``gramine`` it is an attested
RA-TLS identity whose key is made in memory. Paths in the attestation section
(policy, sim root, collateral file, collateral cache) are relative to the job
file's folder and never come from the environment.

Collateral comes from :func:`make_collateral_source`: a file loaded once, or a
PCCS queried per platform and refreshed before it expires. In ``gramine`` mode a
policy that accepts quotes without collateral is refused unless the job file
allows that too (:func:`check_missing_collateral_allowed`).

:func:`prepare_simulated_attestation` makes the material a local run needs for
simulated evidence: a sim root, the code measurement and a policy that allows
exactly that code (development only, NOT A REAL TEE).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import ssl
from pathlib import Path

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.collateral_source import CollateralSource, PccsCollateralSource, StaticCollateralSource
from enclavefl.attest.pccs import urllib_get
from enclavefl.attest.measurement import CodeMeasurement, measure_code, signer_id
from enclavefl.attest.policy import load_policy
from enclavefl.attest.providers import EvidenceProvider, GramineProvider, SimulatedProvider
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.config import JobConfig
from enclavefl.errors import AttestationError, ConfigError
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.credentials import CaCredentials, Credentials

__all__ = [
    "POLICY_FILE",
    "SIM_ROOT_DIR",
    "check_missing_collateral_allowed",
    "make_attested_credentials",
    "make_collateral_source",
    "make_credentials",
    "prepare_simulated_attestation",
    "task_code_paths",
]

log = logging.getLogger(__name__)

SIM_ROOT_DIR = "attestation/simroot"
"""Where :func:`prepare_simulated_attestation` puts the sim root, relative to the run directory."""
POLICY_FILE = "attestation/policy.json"
"""Where :func:`prepare_simulated_attestation` writes the policy, relative to the run directory."""


def task_code_paths(config: JobConfig) -> list[Path]:
    """The user task's module file (or package directory): part of the measured code.

    Built-in tasks live in the enclavefl package, which is always measured.

    Raises:
        ConfigError: the task module cannot be found.
    """
    name = config.task.name
    if ":" not in name:
        return []
    module = name.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"task.name = {name!r}: cannot find module {module}: {exc}") from exc
    if spec is None or spec.origin is None:
        raise ConfigError(f"task.name = {name!r}: module {module} not found (cannot measure it)")
    if spec.submodule_search_locations:
        return [Path(next(iter(spec.submodule_search_locations)))]
    return [Path(spec.origin)]


def _resolve(job_dir: Path, value: str | None, key: str) -> Path:
    if not value:
        raise ConfigError(f"attestation.{key} is required for this attestation mode (a path relative to the job file)")
    path = Path(value)
    return path if path.is_absolute() else job_dir / path


def _provider(config: JobConfig, job_dir: Path) -> EvidenceProvider:
    att = config.attestation
    if att.mode == "gramine":
        return GramineProvider(Path(att.device_dir))
    sim_root = SimRoot.load(_resolve(job_dir, att.sim_root, "sim_root"))
    return SimulatedProvider(sim_root, measure_code(task_code_paths(config)))


def make_collateral_source(config: JobConfig, *, job_dir: Path, node: str) -> CollateralSource | None:
    """The collateral source ``attestation.collateral`` describes (None when there is none).

    A file is loaded now; a PCCS source fetches per platform when a quote first
    needs it (starting from its cache), so a node starts even while its PCCS is down.

    Raises:
        ConfigError: the collateral file or the PCCS CA file is unreadable or malformed.
    """
    setting = config.attestation.collateral
    if setting is None:
        return None
    if setting.source == "file":
        path = _resolve(job_dir, setting.path, "collateral.path")
        try:
            return StaticCollateralSource(Collateral.from_file(path), origin=f"collateral file {path}")
        except AttestationError as exc:
            raise ConfigError(f"attestation.collateral.path: {exc}") from exc
    http_get = None
    if setting.ca_cert is not None:
        ca_path = _resolve(job_dir, setting.ca_cert, "collateral.ca_cert")
        try:
            context = ssl.create_default_context(cafile=str(ca_path))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"attestation.collateral.ca_cert = {str(ca_path)!r}: cannot load CA certificates: {exc}") from exc
        http_get = functools.partial(urllib_get, ssl_context=context)
    cache_dir = _resolve(job_dir, setting.cache_dir, "collateral.cache_dir")
    log.info("%s: collateral from %s (cache %s, refreshed %gs before nextUpdate)", node, setting.url, cache_dir,
             setting.refresh_before_s)
    return PccsCollateralSource(setting.url, cache_dir, refresh_before_s=setting.refresh_before_s,
                                timeout_s=setting.timeout_s, node=node, http_get=http_get)


def check_missing_collateral_allowed(mode: str, *, policy_allows: bool, job_allows: bool, policy_source: str) -> None:
    """Refuse, in ``gramine`` mode, a policy that accepts quotes without collateral unless the job allows it too.

    Without collateral a verifier cannot check the QE identity, PCK revocation
    or TCB level: on real hardware that must be a decision written in both the
    policy and the attested job file, not a policy default.

    Raises:
        ConfigError: naming both keys.
    """
    if mode == "gramine" and policy_allows and not job_allows:
        raise ConfigError(
            f"{policy_source}: allow_missing_collateral: true is refused in attestation.mode gramine unless the "
            "job file also sets attestation.allow_missing_collateral: true (quotes would be accepted without "
            "checking the QE identity, PCK revocation or TCB level); better: configure attestation.collateral"
        )


def make_attested_credentials(config: JobConfig, *, job_dir: Path, role: str, node: str,
                              audit_path: Path | None) -> AttestedCredentials:
    """Credentials for ``attestation.mode`` simulated or gramine.

    Args:
        job_dir: the job file's folder; relative attestation paths start there.
        role: ``ps``, or anything else for a worker.
        node: this node's name in logs and audit records.
        audit_path: append attestation decisions here as JSON lines (None: no file).

    Raises:
        ConfigError: the mode is none; the policy, sim root or collateral is missing or invalid; or (gramine)
            the policy accepts missing collateral and the job file does not.
        AttestationError: no evidence can be produced.
    """
    att = config.attestation
    if att.mode == "none":
        raise ConfigError("attestation.mode is none: use the per-job CA credentials")
    policy_path = _resolve(job_dir, att.policy, "policy")
    policy = load_policy(policy_path)
    check_missing_collateral_allowed(att.mode, policy_allows=policy.allow_missing_collateral,
                                     job_allows=att.allow_missing_collateral,
                                     policy_source=str(policy_path))
    collateral = make_collateral_source(config, job_dir=job_dir, node=node)
    if att.mode == "simulated":
        log.warning("%s %s: attestation mode simulated: development only, NOT A REAL TEE", role, node)
    return AttestedCredentials.create(
        _provider(config, job_dir), policy, node=node, role="ps" if role == "ps" else "worker",
        audit=AuditLog(audit_path), server_name=config.transport.tls.server_name, collateral=collateral,
    )


def make_credentials(config: JobConfig, tls_dir: Path | None, role: str, *, job_dir: Path = Path("."),
                     audit_path: Path | None = None) -> Credentials:
    """Credentials for ``role`` (``ps`` or ``worker-<i>``) as the job says.

    With ``attestation.mode`` simulated or gramine: attested RA-TLS credentials
    (see :func:`make_attested_credentials`). With ``none``: mutual TLS under the
    per-job CA, from ``tls_dir`` (``ca.pem``, ``<role>.pem``, ``<role>.key``) or
    else from ``transport.tls``.

    Raises:
        ConfigError: no certificate source was given, or a file is unreadable.
        AttestationError: no evidence can be produced.
    """
    if config.attestation.mode != "none":
        return make_attested_credentials(config, job_dir=job_dir, role=role, node=role, audit_path=audit_path)
    tls = config.transport.tls
    if tls_dir is not None:
        return CaCredentials.from_files(tls_dir / "ca.pem", tls_dir / f"{role}.pem", tls_dir / f"{role}.key",
                                        server_name=tls.server_name)
    if tls.ca_cert and tls.cert and tls.key:
        return CaCredentials.from_files(tls.ca_cert, tls.cert, tls.key, server_name=tls.server_name)
    raise ConfigError("TLS is always on: give --tls-dir or transport.tls.{ca_cert,cert,key} (make them with `enclavefl certs`)")


def prepare_simulated_attestation(run_dir: Path, config: JobConfig) -> tuple[str, str, CodeMeasurement, bytes]:
    """Creates a sim root in ``run_dir`` (or reuses it), measures the code and writes a policy allowing exactly it.

    Development only: evidence under a sim root is NOT A REAL TEE.

    Returns:
        (sim root path, policy path) relative to ``run_dir``, the measurement and mr_signer.

    Raises:
        ConfigError: the task module cannot be found (it is part of the measurement).
    """
    root_dir = run_dir / SIM_ROOT_DIR
    sim_root = SimRoot.load(root_dir) if (root_dir / "root_ca.pem").exists() else init_sim_root(root_dir, name=config.job.name)
    measurement = measure_code(task_code_paths(config))
    mr_signer = signer_id(sim_root.signer_key.public_key())
    policy = {
        "verify_mr_enclave": "on", "verify_mr_signer": "on", "verify_isv_prod_id": "on", "verify_isv_svn": "on",
        "sgx_mrs": [{"mr_enclave": measurement.mr_enclave.hex(), "mr_signer": mr_signer.hex(), "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True,
        "simulated_root_sha256": sim_root.root_fingerprint,
    }
    (run_dir / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    return SIM_ROOT_DIR, POLICY_FILE, measurement, mr_signer
