"""Credentials from a job: its ``transport.tls`` and ``attestation`` sections turned into TLS identities.

A PS or worker process calls :func:`make_credentials` once at start. With
``attestation.mode`` ``none`` that is mutual TLS under the per-job CA
(``enclavefl certs``); with ``simulated`` or ``gramine`` it is an attested
RA-TLS identity whose key is made in memory. Paths in the attestation section
(policy, sim root, collateral) are relative to the job file's folder and never
come from the environment.

:func:`prepare_simulated_attestation` makes the material a local run needs for
simulated evidence: a sim root, the code measurement and a policy that allows
exactly that code (development only, NOT A REAL TEE).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.measurement import CodeMeasurement, measure_code, signer_id
from enclavefl.attest.policy import load_policy
from enclavefl.attest.providers import EvidenceProvider, GramineProvider, SimulatedProvider
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.credentials import CaCredentials, Credentials

__all__ = [
    "POLICY_FILE",
    "SIM_ROOT_DIR",
    "make_attested_credentials",
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


def make_attested_credentials(config: JobConfig, *, job_dir: Path, role: str, node: str,
                              audit_path: Path | None) -> AttestedCredentials:
    """Credentials for ``attestation.mode`` simulated or gramine.

    Args:
        job_dir: the job file's folder; relative attestation paths start there.
        role: ``ps``, or anything else for a worker.
        node: this node's name in logs and audit records.
        audit_path: append attestation decisions here as JSON lines (None: no file).

    Raises:
        ConfigError: the mode is none, or the policy, sim root or collateral is missing or invalid.
        AttestationError: no evidence can be produced.
    """
    att = config.attestation
    if att.mode == "none":
        raise ConfigError("attestation.mode is none: use the per-job CA credentials")
    policy = load_policy(_resolve(job_dir, att.policy, "policy"))
    collateral = Collateral.from_file(_resolve(job_dir, att.collateral, "collateral")) if att.collateral else None
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
