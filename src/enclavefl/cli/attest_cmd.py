"""``enclavefl attest``: measure this node, verify evidence, create a simulated root.

Turning a job's ``attestation`` section into credentials is library code:
:mod:`enclavefl.transport.provisioning`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.measurement import measure_code, signer_id
from enclavefl.attest.pck import certificate_fingerprint, intel_sgx_root_ca
from enclavefl.attest.policy import Policy, load_policy
from enclavefl.attest.quote import Quote, parse_quote
from enclavefl.attest.ratls import LEGACY_QUOTE_OIDS, TCG_EVIDENCE_OID, verify_ratls_certificate
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.tcg_evidence import decode_tagged_evidence
from enclavefl.attest.verifier import QuoteVerification, verify_quote
from enclavefl.errors import AttestationError, ConfigError, VerificationError

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attest", help="measure this node, verify evidence, create a simulated root")
    asub = p.add_subparsers(dest="attest_command", required=True, metavar="ACTION")
    m = asub.add_parser("measure", help="print this node's mr_enclave, mr_signer, isv_prod_id, isv_svn (for a policy)")
    m.add_argument("--task-file", action="append", type=Path, default=[], help="task code file or directory (repeatable)")
    m.add_argument("--sim-root", type=Path, help="simulated root directory (gives mr_signer)")
    m.set_defaults(func=run_measure)
    v = asub.add_parser("verify", help="verify a raw quote (.bin) or an RA-TLS certificate (.pem/.der)")
    v.add_argument("file", type=Path)
    v.add_argument("--policy", type=Path, required=True, help="policy file (.json/.yaml)")
    v.add_argument("--at", help="verification time, ISO 8601 (default now, UTC)")
    v.add_argument("--collateral", type=Path, help="Intel collateral JSON (TCB info, QE identity, CRLs)")
    v.set_defaults(func=run_verify)
    i = asub.add_parser("init-sim-root", help="create a simulated attestation root (development only, NOT A REAL TEE)")
    i.add_argument("directory", type=Path)
    i.add_argument("--name", required=True, help="the federation's name, written into the certificates")
    i.set_defaults(func=run_init_sim_root)


def run_measure(args: argparse.Namespace) -> int:
    measurement = measure_code(args.task_file)
    mr_signer = "(set by the enclave signing key; see gramine-sgx-sigstruct-view)"
    if args.sim_root is not None:
        mr_signer = signer_id(SimRoot.load(args.sim_root).signer_key.public_key()).hex()
    print(f"mr_enclave  {measurement.mr_enclave.hex()}  (simulated measurement of {measurement.file_count} files)")
    print(f"mr_signer   {mr_signer}")
    print("isv_prod_id 0")
    print("isv_svn     0")
    return 0


def run_init_sim_root(args: argparse.Namespace) -> int:
    root = init_sim_root(args.directory, name=args.name)
    print(f"simulated root in {args.directory} (development only, NOT A REAL TEE)")
    print(f"simulated_root_sha256 {root.root_fingerprint}")
    print(f"mr_signer             {signer_id(root.signer_key.public_key()).hex()}")
    return 0


def _parse_time(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.timezone.utc)
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--at {text!r}: not an ISO 8601 time (e.g. 2025-06-20T12:00:00Z)") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def _quote_in_certificate(data: bytes) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise VerificationError("certificate", "an X.509 certificate (PEM or DER)", "unparsable", str(exc)) from exc
    for oid in (TCG_EVIDENCE_OID, *LEGACY_QUOTE_OIDS):
        try:
            ext = cert.extensions.get_extension_for_oid(oid).value
        except (x509.ExtensionNotFound, ValueError):
            continue
        if isinstance(ext, x509.UnrecognizedExtension):
            return decode_tagged_evidence(ext.value).quote if oid == TCG_EVIDENCE_OID else ext.value
    raise VerificationError("certificate.evidence", "an RA-TLS quote extension", "none")


def _show(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return value.hex() if value else "(empty)"
    if isinstance(value, tuple | list):
        return ", ".join(_show(v) for v in value) or "(none)"
    return str(value)


def _print_quote(quote: Quote) -> None:
    print(f"tee                 {quote.tee}")
    for part in ("header", "body"):
        obj = getattr(quote, part)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                value = ", ".join(f"{g.name}={_show(getattr(value, g.name))}" for g in dataclasses.fields(value))
            print(f"{part}.{f.name:<14} {_show(value)}")


def _print_verification(v: QuoteVerification) -> None:
    print(f"debug               {v.debug}")
    print(f"root_sha256         {v.root_fingerprint}")
    print(f"tcb_status          {v.tcb_status or 'NotEvaluated (no collateral)'}")
    print(f"advisory_ids        {_show(v.advisory_ids)}")
    print(f"checked             {_show(v.checked)}")


def _verify_quote_file(raw: bytes, policy: Policy, at: dt.datetime, collateral: Collateral | None) -> None:
    quote = parse_quote(raw)
    _print_quote(quote)
    roots = [intel_sgx_root_ca()]
    chain = quote.signature_data.pck_chain
    if chain and certificate_fingerprint(chain[-1]) in policy.trusted_root_fingerprints():
        roots.append(chain[-1])
    verification = verify_quote(quote, at=at, trusted_roots=roots, collateral=collateral)
    _print_verification(verification)
    simulated = policy.is_simulated_root(verification.root_fingerprint)
    if simulated:
        print("simulated           True (NOT A REAL TEE)")
    policy.evaluate(verification, simulated=simulated)


def run_verify(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    at = _parse_time(args.at)
    collateral = Collateral.from_file(args.collateral) if args.collateral else None
    try:
        raw = args.file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{args.file}: cannot read: {exc.strerror or exc}") from exc
    print(f"file                {args.file}")
    print(f"verified at         {at.isoformat()}")
    try:
        if args.file.suffix.lower() in (".pem", ".der", ".crt", ".cer"):
            _print_quote(parse_quote(_quote_in_certificate(raw)))
            evidence = verify_ratls_certificate(raw, policy=policy, at=at, collateral=collateral)
            _print_verification(evidence.verification)
            print(f"binding             {evidence.binding}")
            print(f"evidence_oid        {evidence.evidence_oid}")
            print(f"simulated           {evidence.simulated}{' (NOT A REAL TEE)' if evidence.simulated else ''}")
        else:
            _verify_quote_file(raw, policy, at, collateral)
    except AttestationError as exc:
        print(f"verdict             REFUSED: {exc}")
        return 3
    print("verdict             ACCEPTED")
    return 0
