"""``enclavefl attest``: measure this node, verify evidence, create a simulated root, inspect collateral.

Turning a job's ``attestation`` section into credentials is library code:
:mod:`enclavefl.transport.provisioning`; fetching and judging collateral is
:mod:`enclavefl.attest.collateral_source`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.collateral_source import PccsCollateralSource, StaticCollateralSource, describe_collateral
from enclavefl.attest.pccs import Platform, platform_of, urllib_get
from enclavefl.attest.measurement import measure_code, signer_id
from enclavefl.attest.pck import certificate_fingerprint, intel_sgx_root_ca
from enclavefl.attest.policy import Policy, load_policy
from enclavefl.attest.quote import Quote, parse_quote
from enclavefl.attest.ratls import LEGACY_QUOTE_OIDS, TCG_EVIDENCE_OID, verify_ratls_certificate
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.tcg_evidence import decode_tagged_evidence
from enclavefl.attest.verifier import QuoteVerification, verify_quote
from enclavefl.config import load_job
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
    c = asub.add_parser("collateral", help="fetch Intel collateral from a PCCS, or show what is cached or loaded")
    csub = c.add_subparsers(dest="collateral_command", required=True, metavar="ACTION")
    f = csub.add_parser("fetch", help="fetch a platform's collateral into the cache; one line per piece")
    _collateral_origin(f, file_allowed=False)
    f.add_argument("--quote", type=Path, help="take the platform from this quote (.bin) or RA-TLS certificate")
    f.add_argument("--fmspc", help="the platform's FMSPC (12 hex digits), instead of --quote")
    f.add_argument("--ca", choices=("processor", "platform"), help="the PCK CA kind, with --fmspc")
    f.add_argument("--tee", choices=("sgx", "tdx"), default="sgx", help="with --fmspc (default sgx)")
    f.add_argument("--at", help="judge the collateral at this time, ISO 8601 (default now, UTC)")
    f.set_defaults(func=run_collateral_fetch)
    show = csub.add_parser("show", help="each cached or loaded piece: issuer, issueDate, nextUpdate, time left, verifies")
    _collateral_origin(show, file_allowed=True)
    show.add_argument("--at", help="judge the collateral at this time, ISO 8601 (default now, UTC)")
    show.set_defaults(func=run_collateral_show)


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


# ---------------------------------------------------------------- attest collateral


def _collateral_origin(parser: argparse.ArgumentParser, *, file_allowed: bool) -> None:
    parser.add_argument("--config", type=Path, help="a job file: its attestation.collateral section")
    parser.add_argument("--url", help="PCCS or PCS base URL (https), instead of --config")
    parser.add_argument("--cache-dir", type=Path, default=Path("collateral-cache"),
                        help="with --url: the collateral cache (default ./collateral-cache)")
    parser.add_argument("--ca-cert", type=Path, help="with --url: PEM CA file for the PCCS's TLS certificate")
    if file_allowed:
        parser.add_argument("--collateral", type=Path, help="a collateral file (combined JSON)")


def _origin(args: argparse.Namespace) -> PccsCollateralSource | Collateral:
    """What the arguments point at: a PCCS source, or a loaded collateral file."""
    given = [name for name in ("config", "url", "collateral") if getattr(args, name, None) is not None]
    if len(given) != 1:
        options = "--config, --url or --collateral" if hasattr(args, "collateral") else "--config or --url"
        raise ConfigError(f"give exactly one of {options}" + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    if args.url is not None:
        http_get = None
        if args.ca_cert is not None:
            try:
                context = ssl.create_default_context(cafile=str(args.ca_cert))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--ca-cert {args.ca_cert}: cannot load CA certificates: {exc}") from exc
            http_get = functools.partial(urllib_get, ssl_context=context)
        return PccsCollateralSource(args.url, args.cache_dir, node="cli", http_get=http_get)
    if getattr(args, "collateral", None) is not None:
        return Collateral.from_file(args.collateral)
    from enclavefl.transport.provisioning import make_collateral_source  # loads grpc: only when asked

    source = make_collateral_source(load_job(args.config), job_dir=args.config.parent, node="cli")
    if source is None:
        raise ConfigError(f"{args.config}: attestation.collateral is not set")
    if isinstance(source, PccsCollateralSource):
        return source
    if hasattr(args, "collateral") and isinstance(source, StaticCollateralSource):
        return source.collateral
    raise ConfigError(f"{args.config}: attestation.collateral.source is file: nothing to fetch (use show)")


def _platform(args: argparse.Namespace) -> Platform:
    if args.quote is not None:
        try:
            raw = args.quote.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{args.quote}: cannot read: {exc.strerror or exc}") from exc
        if args.quote.suffix.lower() in (".pem", ".der", ".crt", ".cer"):
            raw = _quote_in_certificate(raw)
        return platform_of(parse_quote(raw))
    if args.fmspc is None or args.ca is None:
        raise ConfigError("give --quote FILE, or --fmspc HEX with --ca processor|platform")
    fmspc = args.fmspc.upper()
    if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
        raise ConfigError(f"--fmspc {args.fmspc!r}: must be 12 hex digits")
    return Platform(args.tee, fmspc, args.ca)


def _left(delta: dt.timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    text = f"{seconds // 86400}d {seconds % 86400 // 3600}h {seconds % 3600 // 60}m"
    return f"left {text}" if delta.total_seconds() >= 0 else f"EXPIRED {text} ago"


def _print_pieces(collateral: Collateral, at: dt.datetime, *, brief: bool) -> bool:
    """One line per piece; True if every piece verifies at ``at``."""
    ok = True
    for piece in describe_collateral(collateral, at=at):
        nxt = piece.next_update.isoformat() if piece.next_update else "none"
        verdict = "verifies" if piece.problem is None else f"DOES NOT VERIFY: {piece.problem}"
        ok = ok and piece.problem is None
        if brief:
            print(f"  {piece.name:<12} nextUpdate {nxt}  {_left(piece.time_left(at))}  {verdict}")
        else:
            print(f"  {piece.name:<12} issuer {piece.issuer}")
            print(f"  {'':<12} issueDate {piece.issue_date.isoformat()}  nextUpdate {nxt}  {_left(piece.time_left(at))}")
            print(f"  {'':<12} {verdict}")
    return ok


def run_collateral_fetch(args: argparse.Namespace) -> int:
    origin = _origin(args)
    if not isinstance(origin, PccsCollateralSource):
        raise ConfigError("collateral fetch needs a PCCS: --url, or a job whose attestation.collateral.source is pccs")
    platform, at = _platform(args), _parse_time(args.at).replace(microsecond=0)
    collateral = origin.fetch(platform)
    print(f"collateral {platform} from {origin.url} into {origin.cache_dir}")
    return 0 if _print_pieces(collateral, at, brief=True) else 3


def run_collateral_show(args: argparse.Namespace) -> int:
    origin, at = _origin(args), _parse_time(args.at).replace(microsecond=0)
    print(f"at {at.isoformat()}")
    if isinstance(origin, Collateral):
        print("collateral file")
        return 0 if _print_pieces(origin, at, brief=False) else 3
    cached = origin.cached()
    if not cached:
        raise AttestationError(f"no collateral from {origin.url} in the cache {origin.cache_dir} "
                               "(enclavefl attest collateral fetch)")
    ok = True
    for platform, collateral in cached:
        print(f"collateral {platform} from {origin.url} (cache {origin.cache_dir})")
        if isinstance(collateral, AttestationError):
            print(f"  unreadable: {collateral}")
            ok = False
        else:
            ok = _print_pieces(collateral, at, brief=False) and ok
    return 0 if ok else 3
