"""Fetching DCAP collateral from a PCCS (or Intel PCS) over HTTPS, with a file cache.

How this works: the PCCS v4 API serves the PCK CRL (``/sgx/certification/v4/pckcrl``),
the TCB info (``/{sgx|tdx}/certification/v4/tcb``), the QE identity
(``/{sgx|tdx}/certification/v4/qe/identity``) and, on a PCCS, the root CA CRL
(``/sgx/certification/v4/rootcacrl``, hex); issuer chains come URL-encoded in
response headers. Each response (body + the headers we need) is cached under
``cache_dir`` keyed by URL and reused while younger than ``max_age_s``. Nothing
fetched is trusted because of where it came from: :class:`Collateral` checks Intel's
signatures when a quote is verified. Network access goes through an ``HttpGet``
callable so callers (and tests) can provide another transport.

Collateral is per platform: TCB info per (TEE, FMSPC), the PCK CRL per PCK CA
(:class:`Platform`, read from a quote by :func:`platform_of`).
:func:`load_cached_collateral` rebuilds a platform's collateral from the cache
alone (no network), which is how a node restarts while its PCCS is down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from enclavefl.attest.collateral import Collateral, CollateralFormatError
from enclavefl.attest.pck import parse_pck_extension, pck_ca_kind
from enclavefl.attest.quote import Quote
from enclavefl.errors import AttestationError, ConfigError, Unavailable

__all__ = [
    "HttpGet",
    "HttpResponse",
    "Platform",
    "cached_platforms",
    "fetch_collateral",
    "fetch_collateral_for_quote",
    "load_cached_collateral",
    "platform_of",
    "urllib_get",
]

logger = logging.getLogger(__name__)

_MAX_BODY_BYTES = 4 << 20
_CHAIN_HEADERS = (
    "sgx-pck-crl-issuer-chain",
    "tcb-info-issuer-chain",
    "sgx-tcb-info-issuer-chain",
    "sgx-enclave-identity-issuer-chain",
)
_INTEL_ROOT_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An HTTP response: status, body and headers (names lower-cased)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


#: ``(url, timeout_s) -> HttpResponse``; raises :class:`Unavailable` when the server cannot be reached.
HttpGet = Callable[[str, float], HttpResponse]


@dataclass(frozen=True, slots=True, order=True)
class Platform:
    """What selects a platform's collateral: the TEE, its FMSPC (12 upper-case hex digits) and its PCK CA."""

    tee: Literal["sgx", "tdx"]
    fmspc: str
    ca: Literal["processor", "platform"]

    def __str__(self) -> str:
        return f"{self.tee} fmspc={self.fmspc} ca={self.ca}"


def platform_of(quote: Quote) -> Platform:
    """The platform a quote comes from: FMSPC from its PCK leaf, CA kind from the leaf's issuer.

    Raises:
        VerificationError: the PCK leaf has no readable SGX extension.
        AttestationError: the chain is too short, or its CA is not an Intel PCK CA.
    """
    chain: tuple[x509.Certificate, ...] = quote.signature_data.pck_chain
    if len(chain) < 2:
        raise AttestationError("quote: PCK chain needs a leaf and its CA to select collateral")
    ca = pck_ca_kind(chain[1])
    if ca is None:
        raise AttestationError(f"quote: {chain[1].subject.rfc4514_string()} is not an Intel PCK CA")
    return Platform(quote.tee, parse_pck_extension(chain[0]).fmspc.hex().upper(), ca)


def urllib_get(url: str, timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> HttpResponse:
    """GET ``url`` over HTTPS with certificate verification (the default transport).

    Raises:
        Unavailable: connection, TLS or timeout failure.
        AttestationError: the body is larger than the limit.
    """
    request = urllib.request.Request(url, headers={"Accept": "*/*"})
    context = ssl_context or ssl.create_default_context()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            body = response.read(_MAX_BODY_BYTES + 1)
            headers = {k.lower(): v for k, v in response.headers.items()}
            status = response.status
    except urllib.error.HTTPError as exc:
        return HttpResponse(exc.code, b"", {})
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"GET {url}: {exc}") from exc
    if len(body) > _MAX_BODY_BYTES:
        raise AttestationError(f"GET {url}: response larger than {_MAX_BODY_BYTES} bytes")
    return HttpResponse(status, body, headers)


def _cache_paths(cache_dir: Path, url: str) -> tuple[Path, Path]:
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
    return cache_dir / f"{key}.body", cache_dir / f"{key}.meta.json"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(cache_dir: Path, url: str, max_age_s: float) -> HttpResponse | None:
    body_path, meta_path = _cache_paths(cache_dir, url)
    try:
        meta = json.loads(meta_path.read_bytes())
        if not isinstance(meta, dict) or meta.get("url") != url or body_path.stat().st_size > _MAX_BODY_BYTES:
            return None
        if time.time() - float(meta["fetched_at"]) > max_age_s:
            return None
        headers = {str(k): str(v) for k, v in dict(meta.get("headers", {})).items()}
        return HttpResponse(200, body_path.read_bytes(), headers)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _get(url: str, cache_dir: Path, timeout_s: float, max_age_s: float, http_get: HttpGet,
         fresh: dict[str, HttpResponse]) -> HttpResponse:
    """A cached response, or a fetched one added to ``fresh`` (cached only once all pieces parse)."""
    cached = _read_cache(cache_dir, url, max_age_s)
    if cached is not None:
        logger.debug("collateral cache hit for %s", url)
        return cached
    response = http_get(url, timeout_s)
    if response.status != 200:
        raise AttestationError(f"GET {url}: HTTP {response.status}")
    fresh[url] = response
    return response


def _store(cache_dir: Path, fetched: Mapping[str, HttpResponse]) -> None:
    for url, response in fetched.items():
        headers = {k: v for k, v in response.headers.items() if k.lower() in _CHAIN_HEADERS}
        meta = {"url": url, "fetched_at": time.time(), "headers": headers}
        body_path, meta_path = _cache_paths(cache_dir, url)
        try:
            _write_atomic(body_path, response.body)
            _write_atomic(meta_path, json.dumps(meta).encode("utf-8"))
        except OSError as exc:
            logger.warning("cannot cache collateral in %s: %s", cache_dir, exc.strerror)


def _header(response: HttpResponse, url: str, *names: str) -> str:
    lowered = {k.lower(): v for k, v in response.headers.items()}
    for name in names:
        if name in lowered:
            return urllib.parse.unquote(lowered[name])
    raise CollateralFormatError(url, names[0], "response header missing")


def _base_url(pccs_url: str) -> str:
    parsed = urllib.parse.urlsplit(pccs_url)
    if parsed.scheme != "https" or not parsed.netloc:
        raise ConfigError(f"pccs_url: must be an https:// URL, got {pccs_url!r}")
    base = pccs_url.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        base = base.removesuffix(suffix)
    return base


def _check_platform(fmspc: bytes | str, ca: str, tee: str) -> str:
    fmspc_hex = fmspc.hex() if isinstance(fmspc, bytes) else fmspc
    if not re.fullmatch(r"[0-9a-fA-F]{12}", fmspc_hex):
        raise ConfigError(f"fmspc: must be 6 bytes (12 hex characters), got {fmspc_hex!r}")
    if ca not in ("processor", "platform"):
        raise ConfigError(f"ca: must be 'processor' or 'platform', got {ca!r}")
    if tee not in ("sgx", "tdx"):
        raise ConfigError(f"tee: must be 'sgx' or 'tdx', got {tee!r}")
    return fmspc_hex.upper()


def _assemble(base: str, fmspc_hex: str, ca: str, tee: str, fetch: Callable[[str], HttpResponse]) -> Collateral:
    crl_url = f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"
    tcb_url = f"{base}/{tee}/certification/v4/tcb?fmspc={fmspc_hex}"
    qe_url = f"{base}/{tee}/certification/v4/qe/identity"
    pck_crl = fetch(crl_url)
    tcb = fetch(tcb_url)
    qe = fetch(qe_url)
    pck_crl_chain = _header(pck_crl, crl_url, "sgx-pck-crl-issuer-chain")
    try:
        root_crl = fetch(f"{base}/sgx/certification/v4/rootcacrl").body
    except AttestationError:
        # Intel's PCS has no rootcacrl endpoint: use the root's published CRL instead.
        root_crl = fetch(_INTEL_ROOT_CRL_URL).body
    return Collateral.from_parts(
        tcb_info=tcb.body,
        tcb_info_issuer_chain=_header(tcb, tcb_url, "tcb-info-issuer-chain", "sgx-tcb-info-issuer-chain"),
        qe_identity=qe.body,
        qe_identity_issuer_chain=_header(qe, qe_url, "sgx-enclave-identity-issuer-chain"),
        root_ca_crl=root_crl,
        pck_crl=pck_crl.body,
        pck_crl_issuer_chain=pck_crl_chain,
        source=base,
    )


def fetch_collateral(
    pccs_url: str,
    fmspc: bytes | str,
    ca: str,
    cache_dir: Path | str,
    timeout_s: float = 30.0,
    *,
    tee: str = "sgx",
    max_age_s: float = 12 * 3600.0,
    http_get: HttpGet | None = None,
) -> Collateral:
    """Fetch (or reuse from ``cache_dir``) the collateral for one platform.

    Args:
        pccs_url: PCCS or PCS base URL, https only (``/sgx/certification/v4`` may be included).
        fmspc: the platform's FMSPC (6 bytes or 12 hex characters), from its PCK certificate.
        ca: ``"processor"`` or ``"platform"``: the PCK CA that issued the PCK certificate.
        cache_dir: directory for cached responses (created if missing).
        timeout_s: per-request timeout.
        tee: ``"sgx"`` or ``"tdx"``: which TCB info and QE identity to fetch.
        max_age_s: cached responses older than this are fetched again (negative: always fetch).
        http_get: transport; defaults to :func:`urllib_get` with certificate verification.

    Raises:
        ConfigError: bad URL, FMSPC, CA or TEE name.
        Unavailable: the server cannot be reached.
        AttestationError: an HTTP error status; CollateralFormatError for a malformed response.
    """
    base = _base_url(pccs_url)
    fmspc_hex = _check_platform(fmspc, ca, tee)
    directory = Path(cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the collateral cache: {exc.strerror or exc}") from exc
    get = http_get or urllib_get
    fresh: dict[str, HttpResponse] = {}

    def fetch(url: str) -> HttpResponse:
        return _get(url, directory, timeout_s, max_age_s, get, fresh)

    collateral = _assemble(base, fmspc_hex, ca, tee, fetch)
    # A malformed response must not replace what the cache holds: the last good
    # collateral is what a restarted node serves while its PCCS misbehaves.
    _store(directory, fresh)
    return collateral


def load_cached_collateral(pccs_url: str, fmspc: bytes | str, ca: str, cache_dir: Path | str, *,
                           tee: str = "sgx") -> Collateral:
    """Rebuild one platform's collateral from ``cache_dir`` alone, whatever its age (no network).

    Nothing is trusted for being cached: the caller verifies the result as it would a fresh fetch.

    Raises:
        ConfigError: bad URL, FMSPC, CA or TEE name.
        AttestationError: a piece is not cached (the message names its URL); CollateralFormatError
            for a malformed cached response.
    """
    base = _base_url(pccs_url)
    fmspc_hex = _check_platform(fmspc, ca, tee)
    directory = Path(cache_dir)

    def fetch(url: str) -> HttpResponse:
        cached = _read_cache(directory, url, float("inf"))
        if cached is None:
            raise AttestationError(f"GET {url}: not in the collateral cache {directory}")
        return cached

    return _assemble(base, fmspc_hex, ca, tee, fetch)


_TCB_PATH = re.compile(r"(?P<base>https://.+)/(?P<tee>sgx|tdx)/certification/v4/tcb\?fmspc=(?P<fmspc>[0-9A-Fa-f]{12})")
_CRL_PATH = re.compile(r"(?P<base>https://.+)/sgx/certification/v4/pckcrl\?ca=(?P<ca>processor|platform)&encoding=der")


def cached_platforms(cache_dir: Path | str, pccs_url: str | None = None) -> list[tuple[str, Platform]]:
    """The (base URL, platform) pairs whose TCB info and PCK CRL are both in ``cache_dir``, sorted.

    A cached TCB info is paired with every PCK CRL cached from the same server.
    With ``pccs_url``, only what came from that server.

    Raises:
        ConfigError: ``pccs_url`` is not an https URL.
    """
    wanted = _base_url(pccs_url) if pccs_url is not None else None
    tcbs: set[tuple[str, str, str]] = set()
    crls: set[tuple[str, str]] = set()
    for meta_path in sorted(Path(cache_dir).glob("*.meta.json")):
        try:
            url = json.loads(meta_path.read_bytes()).get("url", "")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(url, str):
            continue
        if (match := _TCB_PATH.fullmatch(url)) is not None:
            tcbs.add((match["base"], match["tee"], match["fmspc"].upper()))
        elif (match := _CRL_PATH.fullmatch(url)) is not None:
            crls.add((match["base"], match["ca"]))
    found: list[tuple[str, Platform]] = []
    for base, tee, fmspc in tcbs:
        for crl_base, ca in crls:
            if crl_base == base and wanted in (None, base):
                found.append((base, Platform(tee, fmspc, ca)))  # type: ignore[arg-type]
    return sorted(found)


def fetch_collateral_for_quote(
    pccs_url: str, quote: Quote, cache_dir: Path | str, timeout_s: float = 30.0, *, http_get: HttpGet | None = None
) -> Collateral:
    """Fetch the collateral a quote needs: FMSPC and CA come from its PCK chain.

    Raises:
        VerificationError: the PCK leaf has no readable SGX extension.
        AttestationError: the chain's CA is not an Intel PCK CA (or as for :func:`fetch_collateral`).
    """
    platform = platform_of(quote)
    return fetch_collateral(pccs_url, platform.fmspc, platform.ca, cache_dir, timeout_s, tee=platform.tee,
                            http_get=http_get)
