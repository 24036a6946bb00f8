"""Where a verifier gets the collateral for a quote, kept fresh: a static file or a PCCS.

How this works. Intel's collateral expires: TCB info, QE identity and both CRLs
carry a ``nextUpdate`` about 30 days after issue, and a quote checked against
expired collateral is refused. A :class:`CollateralSource` hands out collateral
per quote at verification time (:meth:`CollateralSource.for_quote`):

- :class:`StaticCollateralSource` serves one loaded collateral (a file) for every
  quote, until it expires.
- :class:`PccsCollateralSource` keeps one collateral per platform
  (:class:`~enclavefl.attest.pccs.Platform`: TEE, FMSPC, PCK CA). It starts from
  the file cache (so a node restarts while its PCCS is down) and fetches when the
  cache has nothing usable. It refreshes ``refresh_before_s`` before the earliest
  ``nextUpdate`` of the four pieces. A refresh is kept only if it verifies and
  expires no earlier than what it replaces (no rollback to older collateral).
  If a refresh fails, the last good collateral is served until it expires, and
  attempts are spaced ``retry_s`` apart. After expiry a quote is refused with a
  :class:`~enclavefl.errors.VerificationError` that names the piece that expired,
  when, and why the refresh failed.

Thread safety: a PS verifies joins on many threads. A lock guards the table,
and one refresh runs at a time. While it runs, other threads keep getting the
current collateral if it is still valid, or wait for the refresh (with a
deadline) if there is none: a burst of joins makes one request to the PCCS, not
one each.

:func:`describe_collateral` reports each piece (issuer, issueDate, nextUpdate)
and whether it verifies, for ``enclavefl attest collateral show``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, final

from cryptography import x509

from enclavefl.attest.collateral import Collateral, _check_crl, _check_signed_json
from enclavefl.attest.pccs import (
    HttpGet,
    Platform,
    cached_platforms,
    fetch_collateral,
    load_cached_collateral,
    platform_of,
)
from enclavefl.attest.pck import as_utc, verify_certificate_chain
from enclavefl.attest.quote import Quote
from enclavefl.errors import AttestationError, EnclaveFLError, VerificationError

__all__ = [
    "PIECES",
    "CollateralPiece",
    "CollateralSource",
    "PccsCollateralSource",
    "StaticCollateralSource",
    "describe_collateral",
    "earliest_next_update",
]

logger = logging.getLogger(__name__)

#: The four pieces of collateral, each with its own nextUpdate.
PIECES: Final = ("tcb_info", "qe_identity", "pck_crl", "root_ca_crl")
_NEVER: Final = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class CollateralPiece:
    """One piece of collateral as an operator sees it.

    Attributes:
        name: one of :data:`PIECES`.
        issuer: who signed it (RFC 4514 name).
        issue_date: issueDate (JSON) or thisUpdate (CRL).
        next_update: nextUpdate; None for a CRL without one (never current).
        problem: why it does not verify at the time asked, or None if it does.
    """

    name: str
    issuer: str
    issue_date: dt.datetime
    next_update: dt.datetime | None
    problem: str | None

    def time_left(self, at: dt.datetime) -> dt.timedelta:
        """Until nextUpdate (negative once expired)."""
        return (self.next_update or _NEVER) - as_utc(at)


def _next_updates(collateral: Collateral) -> dict[str, dt.datetime]:
    return {
        "tcb_info": collateral.tcb_info.next_update,
        "qe_identity": collateral.qe_identity.next_update,
        "pck_crl": collateral.pck_crl.next_update_utc or _NEVER,
        "root_ca_crl": collateral.root_ca_crl.next_update_utc or _NEVER,
    }


def earliest_next_update(collateral: Collateral) -> tuple[str, dt.datetime]:
    """The piece that expires first and its nextUpdate: the whole collateral expires then."""
    name, when = min(_next_updates(collateral).items(), key=lambda item: item[1])
    return name, when


def _piece_problem(collateral: Collateral, name: str, at: dt.datetime,
                   trusted_roots: Sequence[x509.Certificate] | None) -> str | None:
    try:
        if name in ("tcb_info", "qe_identity"):
            chain = collateral.tcb_info_issuer_chain if name == "tcb_info" else collateral.qe_identity_issuer_chain
            verify_certificate_chain(chain, at=at, trusted_roots=trusted_roots, field=f"{name}_issuer_chain")
            info = collateral.tcb_info if name == "tcb_info" else collateral.qe_identity
            body = collateral.tcb_info_body if name == "tcb_info" else collateral.qe_identity_body
            signature = collateral.tcb_info_signature if name == "tcb_info" else collateral.qe_identity_signature
            _check_signed_json(body, signature, chain[0], info.issue_date, info.next_update, at, name)
        elif name == "pck_crl":
            chain = collateral.pck_crl_issuer_chain
            verify_certificate_chain(chain, at=at, trusted_roots=trusted_roots, field="pck_crl_issuer_chain")
            _check_crl(collateral.pck_crl, chain[0], at, name)
        else:
            root = verify_certificate_chain(collateral.pck_crl_issuer_chain, at=at, trusted_roots=trusted_roots,
                                            field="pck_crl_issuer_chain")
            _check_crl(collateral.root_ca_crl, root, at, name)
    except VerificationError as exc:
        return str(exc)
    return None


def describe_collateral(collateral: Collateral, *, at: dt.datetime,
                        trusted_roots: Sequence[x509.Certificate] | None = None) -> tuple[CollateralPiece, ...]:
    """Each piece's issuer, issueDate, nextUpdate and whether it verifies at ``at``, in :data:`PIECES` order.

    A piece verifies when its issuer chain leads to a trusted root (Intel's by
    default) and its signature and validity window hold at ``at``. Revocation of
    the issuer chains and the one-root rule are checked by
    :meth:`Collateral.verify`, which a quote's verification runs in full.
    """
    at = as_utc(at)
    issuers = {
        "tcb_info": collateral.tcb_info_issuer_chain[0].subject,
        "qe_identity": collateral.qe_identity_issuer_chain[0].subject,
        "pck_crl": collateral.pck_crl.issuer,
        "root_ca_crl": collateral.root_ca_crl.issuer,
    }
    issued = {
        "tcb_info": collateral.tcb_info.issue_date,
        "qe_identity": collateral.qe_identity.issue_date,
        "pck_crl": collateral.pck_crl.last_update_utc,
        "root_ca_crl": collateral.root_ca_crl.last_update_utc,
    }
    nxt = {"pck_crl": collateral.pck_crl.next_update_utc, "root_ca_crl": collateral.root_ca_crl.next_update_utc,
           "tcb_info": collateral.tcb_info.next_update, "qe_identity": collateral.qe_identity.next_update}
    return tuple(
        CollateralPiece(name, issuers[name].rfc4514_string(), issued[name], nxt[name],
                        _piece_problem(collateral, name, at, trusted_roots))
        for name in PIECES
    )


class CollateralSource(ABC):
    """Gives a verifier the collateral for a quote, at verification time.

    Implementations are safe to call from many threads at once.
    """

    @abstractmethod
    def for_quote(self, quote: Quote, at: dt.datetime) -> Collateral:
        """The collateral to judge ``quote`` with at ``at``.

        May block while collateral is fetched (bounded by the source's timeouts).
        The caller still verifies what it gets (:meth:`Collateral.verify`).

        Raises:
            VerificationError: no collateral that is valid at ``at`` can be had;
                the message names what expired or could not be fetched.
        """


def _expired(collateral: Collateral, at: dt.datetime, why: str) -> VerificationError:
    name, when = earliest_next_update(collateral)
    return VerificationError(
        f"collateral.{name}.next_update", f"collateral valid at {at.isoformat()}",
        f"{name} expired at {when.isoformat()}", why,
    )


@final
class StaticCollateralSource(CollateralSource):
    """One collateral for every quote (a collateral file, loaded once); it is never refreshed."""

    def __init__(self, collateral: Collateral, *, origin: str = "collateral file") -> None:
        self._collateral = collateral
        self._origin = origin

    @property
    def collateral(self) -> Collateral:
        return self._collateral

    def for_quote(self, quote: Quote, at: dt.datetime) -> Collateral:
        at = as_utc(at)
        if at > earliest_next_update(self._collateral)[1]:
            raise _expired(self._collateral, at, f"{self._origin} is never refreshed: replace it, or use a PCCS source")
        return self._collateral


@dataclass(slots=True)
class _Entry:
    """One platform's state: the last good collateral (if any), when to try again, and the last failure."""

    collateral: Collateral | None
    next_attempt: dt.datetime
    error: str | None = None


@final
class PccsCollateralSource(CollateralSource):
    """Collateral per platform from a PCCS (or Intel's PCS), cached on disk and refreshed before it expires."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        *,
        refresh_before_s: float = 7 * 86_400.0,
        retry_s: float = 300.0,
        timeout_s: float = 30.0,
        node: str = "",
        http_get: HttpGet | None = None,
        trusted_roots: Sequence[x509.Certificate] | None = None,
        max_platforms: int = 64,
    ) -> None:
        """Create the source; nothing is fetched until a quote asks.

        Args:
            url: the PCCS or PCS base URL (https).
            cache_dir: where fetched responses are kept (created on the first fetch).
            refresh_before_s: refresh this long before the earliest nextUpdate.
            retry_s: after an attempt, wait at least this long before the next one for that platform.
            timeout_s: per request.
            node: this node's name, for the log.
            http_get: the transport (default: HTTPS with the system's CAs).
            trusted_roots: roots the collateral and the quotes' PCK chains must chain to (default: Intel's root).
            max_platforms: platforms kept at most; a quote from one more is refused (bounds memory and fetches).
        """
        self._url = url
        self._cache_dir = cache_dir
        self._refresh_before = dt.timedelta(seconds=refresh_before_s)
        self._retry = dt.timedelta(seconds=retry_s)
        self._timeout_s = timeout_s
        self._node = node or "-"
        self._http_get = http_get
        self._trusted_roots = trusted_roots
        self._lock = threading.Lock()  # guards _entries
        self._refreshing = threading.Lock()  # one refresh at a time
        self._entries: dict[Platform, _Entry] = {}
        self._max_platforms = max_platforms

    @property
    def url(self) -> str:
        return self._url

    @property
    def cache_dir(self) -> Path:
        return self._cache_dir

    def for_quote(self, quote: Quote, at: dt.datetime) -> Collateral:
        at = as_utc(at)
        # Only an Intel-signed PCK certificate may make us fetch: a forged leaf could name any FMSPC.
        verify_certificate_chain(quote.signature_data.pck_chain, at=at, trusted_roots=self._trusted_roots,
                                 field="pck_chain")
        try:
            platform = platform_of(quote)
        except AttestationError as exc:
            raise VerificationError("collateral.platform", "a quote with an Intel PCK chain", "none usable",
                                    str(exc)) from exc
        return self.for_platform(platform, at)

    def for_platform(self, platform: Platform, at: dt.datetime) -> Collateral:
        """The collateral for ``platform`` at ``at``, refreshing it first when due.

        Raises:
            VerificationError: nothing could be fetched (``collateral <platform>``), what is held
                expired and the refresh failed (``collateral.<piece>.next_update``), or the platform
                would be one more than ``max_platforms``.
        """
        at = as_utc(at)
        entry = self._current(platform, at)
        if entry.collateral is None:
            raise VerificationError(f"collateral {platform}", f"collateral from {self._url}", "none",
                                    f"fetch failed: {entry.error}")
        if not self._usable(entry, at):
            raise _expired(entry.collateral, at, f"refresh from {self._url} failed: {entry.error}")
        return entry.collateral

    def fetch(self, platform: Platform) -> Collateral:
        """Fetch ``platform``'s collateral from the PCCS now, into the cache, without judging it.

        For inspection (``enclavefl attest collateral fetch``): the result is not
        verified and does not replace what this source serves.

        Raises:
            Unavailable: the PCCS cannot be reached.
            AttestationError: an HTTP error, or a malformed response (CollateralFormatError).
        """
        return fetch_collateral(self._url, platform.fmspc, platform.ca, self._cache_dir, self._timeout_s,
                                tee=platform.tee, max_age_s=-1, http_get=self._http_get)

    def cached(self) -> list[tuple[Platform, Collateral | AttestationError]]:
        """Each platform with collateral from this PCCS in the cache: the collateral, or why it cannot be read."""
        found: list[tuple[Platform, Collateral | AttestationError]] = []
        for _, platform in cached_platforms(self._cache_dir, self._url):
            try:
                found.append((platform, load_cached_collateral(self._url, platform.fmspc, platform.ca,
                                                               self._cache_dir, tee=platform.tee)))
            except AttestationError as exc:
                found.append((platform, exc))
        return found

    # ------------------------------------------------------------------ internals
    def _entry(self, platform: Platform) -> _Entry | None:
        with self._lock:
            return self._entries.get(platform)

    def _current(self, platform: Platform, at: dt.datetime) -> _Entry:
        """The platform's entry after refreshing it if due; the caller judges whether it is usable."""
        entry = self._entry(platform)
        valid = entry is not None and self._usable(entry, at)
        if entry is not None and valid and at < entry.next_attempt:
            return entry
        # With valid collateral in hand, never wait for another thread's refresh: serve what we have.
        got = self._refreshing.acquire(blocking=False) if valid else self._refreshing.acquire(timeout=self._timeout_s * 6)
        if not got:
            if entry is not None and valid:
                return entry
            raise VerificationError(f"collateral {platform}", "collateral valid now", "none",
                                    f"a refresh from {self._url} is still under way")
        try:
            entry = self._entry(platform)  # another thread may have refreshed meanwhile
            if entry is None and len(self._entries) >= self._max_platforms:
                raise VerificationError("collateral.platforms", f"at most {self._max_platforms} platforms",
                                        f"one more ({platform})", "raise max_platforms if the federation has more")
            if entry is None or at >= entry.next_attempt:
                entry = self._refresh(platform, entry, at)
            return entry
        finally:
            self._refreshing.release()

    @staticmethod
    def _usable(entry: _Entry, at: dt.datetime) -> bool:
        return entry.collateral is not None and at <= earliest_next_update(entry.collateral)[1]

    def _due(self, collateral: Collateral) -> dt.datetime:
        return earliest_next_update(collateral)[1] - self._refresh_before

    def _load(self, platform: Platform, at: dt.datetime, *, use_cache: bool) -> Collateral:
        if use_cache:
            collateral = load_cached_collateral(self._url, platform.fmspc, platform.ca, self._cache_dir,
                                                tee=platform.tee)
        else:
            collateral = self.fetch(platform)
        collateral.verify(at=at, trusted_roots=self._trusted_roots)
        return collateral

    def _refresh(self, platform: Platform, entry: _Entry | None, at: dt.datetime) -> _Entry:
        """Runs with ``_refreshing`` held. Stores and returns the platform's new entry."""
        current = entry.collateral if entry is not None else None
        if current is None:
            try:
                cached = self._load(platform, at, use_cache=True)
            except (EnclaveFLError, OSError) as exc:
                logger.debug("%s: no usable cached collateral for %s: %s", self._node, platform, exc)
            else:
                if at < self._due(cached):
                    name, when = earliest_next_update(cached)
                    logger.info("%s: collateral for %s loaded from the cache %s: %s nextUpdate %s",
                                self._node, platform, self._cache_dir, name, when.isoformat())
                    return self._store(platform, _Entry(cached, self._due(cached)))
                current = cached  # due for a refresh, but a fallback if the fetch fails
        try:
            fresh = self._load(platform, at, use_cache=False)
        except (EnclaveFLError, OSError) as exc:
            error = str(exc)
            if current is not None and at <= earliest_next_update(current)[1]:
                name, when = earliest_next_update(current)
                logger.warning("%s: collateral refresh for %s from %s failed: %s; serving the last good one "
                               "until %s expires at %s", self._node, platform, self._url, error, name, when.isoformat())
            else:
                logger.error("%s: collateral for %s from %s failed: %s; quotes from this platform are refused",
                             self._node, platform, self._url, error)
            return self._store(platform, _Entry(current, at + self._retry, error))
        best = fresh
        if current is not None and earliest_next_update(current)[1] > earliest_next_update(fresh)[1]:
            best = current  # never roll back to older collateral
        name, when = earliest_next_update(best)
        logger.info("%s: collateral for %s refreshed from %s: %s nextUpdate %s%s", self._node, platform, self._url,
                    name, when.isoformat(), "" if best is fresh else " (kept the newer one already held)")
        return self._store(platform, _Entry(best, max(self._due(best), at + self._retry)))

    def _store(self, platform: Platform, entry: _Entry) -> _Entry:
        with self._lock:
            self._entries[platform] = entry
        return entry
