"""Attested credentials: mutual RA-TLS attestation bound to the live channel.

How this works (see docs/security.md for the threat model):

Worker -> PS. Before it sends a single gRPC byte, the worker opens a plain TLS
handshake to the PS only to read its certificate, verifies that RA-TLS
certificate against ITS policy (quote, PCK chain, key binding, measurements),
then pins exactly that certificate as the only root of the gRPC channel. The
gRPC handshake therefore succeeds only against the holder of the attested key.
A PS that restarts has a new key; the worker's next channel verifies it anew.

PS -> worker. gRPC Python cannot check self-signed client certificates it does
not know in advance, so a worker proves itself in an attested join: it asks for
a nonce (``Challenge``) and sends its RA-TLS certificate with an ECDSA signature
by the certificate's key over::

    "enclavefl-join-v1" || nonce (56) || SHA-256(PS certificate DER as the worker saw it) || worker name

The PS checks the nonce, that the PS certificate hash is its own (a relay or
man in the middle shows another one), the certificate's evidence against ITS
policy, and the signature (a replayed certificate without its key cannot make
it). It then issues a random session token, returned only over the pinned
attested channel, that the worker sends as gRPC metadata on every later call;
the PS maps it to the worker's certificate fingerprint and measurement.

Nonces and sessions are bound to the connection. gRPC Python gives the PS no
TLS channel binding (no exporter, no session id in ``auth_context()``, and no
client certificate in this mode); what it gives is the peer address of each
call, which names one HTTP/2 connection. A nonce is stateless::

    issued (8, the PS clock) || random (16) || HMAC-SHA256(PS secret, issued || random || connection)

so the PS keeps no outstanding nonce that a flood of ``Challenge`` calls could
push out: at ``Join`` it checks the MAC (issued by this PS, for this
connection), the age (TTL) and a bounded set of used nonces (single use;
forgetting an old entry lets a nonce be replayed only on its own connection,
within its TTL, which only the worker holding it can do). A session token
works only on the connection that joined: a leaked token is refused on any
other (``StaleSession``, and an honest worker whose channel reconnected simply
joins again).

Every decision goes to the :class:`~enclavefl.transport.audit.AuditLog`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.collateral_source import CollateralSource
from enclavefl.attest.pck import certificate_fingerprint
from enclavefl.attest.policy import Policy
from enclavefl.attest.providers import EvidenceProvider
from enclavefl.attest.quote import SgxReportBody, parse_quote
from enclavefl.attest.ratls import (
    LEGACY_QUOTE_OIDS,
    TCG_EVIDENCE_OID,
    PeerEvidence,
    RatlsIdentity,
    create_ratls_identity,
    verify_ratls_certificate,
)
from enclavefl.attest.tcg_evidence import decode_tagged_evidence
from enclavefl.errors import StaleSession, Unavailable, VerificationError
from enclavefl.transport.audit import AuditLog, AuditRecord
from enclavefl.messages import PeerIdentity
from enclavefl.transport.credentials import ChannelSetup, Credentials, JoinProof, cert_fingerprint

__all__ = ["JOIN_DOMAIN", "AttestedCredentials", "fetch_server_certificate", "join_message"]

log = logging.getLogger(__name__)

JOIN_DOMAIN: Final = b"enclavefl-join-v1"
_NONCE_RANDOM_BYTES: Final = 16
_NONCE_BYTES: Final = 8 + _NONCE_RANDOM_BYTES + 32  # issued, random, MAC
_MAX_CERT_BYTES: Final = 128 * 1024
_MAX_NAME_BYTES: Final = 256

Role = Literal["ps", "worker"]
Clock = Callable[[], float]


def join_message(nonce: bytes, ps_cert_sha256: bytes, worker_name: str) -> bytes:
    """The bytes a worker signs to join: fixed-size fields first, so the encoding is unambiguous."""
    return JOIN_DOMAIN + nonce + ps_cert_sha256 + worker_name.encode("utf-8")


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise Unavailable(f"{target!r} is not host:port")
    return host.strip("[]"), int(port)


def fetch_server_certificate(target: str, timeout_s: float = 10.0) -> bytes:
    """Reads the certificate a TLS server presents, without trusting it (PEM).

    Only a TLS handshake happens: no application byte is sent.

    Raises:
        Unavailable: the server cannot be reached or the handshake fails.
        VerificationError: the server presented no certificate, or one too large.
    """
    host, port = _split_target(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # No CA can vouch for a self-signed RA-TLS certificate: this handshake only
    # fetches it; the caller verifies its evidence against the policy and then
    # pins exactly that certificate for the real channel.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise Unavailable(f"{target}: cannot fetch the server certificate: {exc}") from exc
    if not der:
        raise VerificationError("server certificate", "an RA-TLS certificate", "none")
    if len(der) > _MAX_CERT_BYTES:
        raise VerificationError("server certificate", f"at most {_MAX_CERT_BYTES} bytes", f"{len(der)} bytes")
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _der(cert_pem: bytes) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise VerificationError("certificate", "a PEM X.509 certificate", "unparsable", str(exc)) from exc
    return cert.public_bytes(serialization.Encoding.DER)


def _claimed(cert_pem: bytes, policy: Policy) -> dict[str, object]:
    """What a certificate's quote claims (unverified), for the audit line of a refusal."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        for oid in (TCG_EVIDENCE_OID, *LEGACY_QUOTE_OIDS):
            try:
                ext = cert.extensions.get_extension_for_oid(oid).value
            except x509.ExtensionNotFound:
                continue
            if not isinstance(ext, x509.UnrecognizedExtension):
                continue
            raw = decode_tagged_evidence(ext.value).quote if oid == TCG_EVIDENCE_OID else ext.value
            quote = parse_quote(raw)
            chain = quote.signature_data.pck_chain
            simulated = bool(chain) and policy.is_simulated_root(certificate_fingerprint(chain[-1]))
            kind = "simulated" if simulated else quote.tee
            body = quote.body
            if isinstance(body, SgxReportBody):
                return {"evidence": kind, "simulated": simulated, "mr_enclave": body.mr_enclave.hex(),
                        "mr_signer": body.mr_signer.hex(), "isv_prod_id": body.isv_prod_id, "isv_svn": body.isv_svn}
            return {"evidence": kind, "simulated": simulated, "mr_enclave": body.mr_td.hex()}
    except Exception:  # noqa: BLE001 - best effort for the audit line; cryptography raises several non-ValueErrors
        pass
    return {}


def _proved(evidence: PeerEvidence) -> dict[str, object]:
    return {
        "evidence": "simulated" if evidence.simulated else evidence.tee,
        "simulated": evidence.simulated,
        "mr_enclave": evidence.mr_enclave.hex(),
        "mr_signer": evidence.mr_signer.hex(),
        "isv_prod_id": evidence.isv_prod_id,
        "isv_svn": evidence.isv_svn,
        "weaker": evidence.weaker,
    }


EvidenceKind = Literal["sgx", "tdx", "simulated", "none"]
_EVIDENCE_KINDS: Final[dict[str, EvidenceKind]] = {"sgx": "sgx", "tdx": "tdx", "simulated": "simulated"}


def _peer_identity(fingerprint: str, label: str, evidence: PeerEvidence) -> PeerIdentity:
    """What a verified certificate proves, as the PS's handler and management plane see the peer."""
    verification = evidence.verification
    sgx = evidence.tee == "sgx"  # a TD has no signer identity (QuoteVerification's docstring)
    return PeerIdentity(
        fingerprint=fingerprint, label=label, measurement=evidence.mr_enclave.hex(),
        evidence="simulated" if evidence.simulated else _EVIDENCE_KINDS.get(evidence.tee, "none"),
        mr_signer=evidence.mr_signer.hex() if sgx else "",
        isv_prod_id=evidence.isv_prod_id if sgx else None, isv_svn=evidence.isv_svn if sgx else None,
        tcb_status=verification.tcb_status, advisories=tuple(verification.advisory_ids), weaker=tuple(evidence.weaker),
    )


class _Nonces:
    """Stateless challenges bound to a connection, plus a bounded record of the used ones (single use)."""

    def __init__(self, ttl_s: float, max_used: int, clock: Clock) -> None:
        self._ttl_s = ttl_s
        self._max_used = max_used
        self._clock = clock
        self._key = secrets.token_bytes(32)  # this process's only: nonces die with the PS
        self._lock = threading.Lock()
        self._used: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when it expires

    def _mac(self, head: bytes, connection: str) -> bytes:
        return hmac.new(self._key, head + connection.encode("utf-8", "replace"), hashlib.sha256).digest()

    def issue(self, connection: str) -> bytes:
        head = struct.pack(">d", self._clock()) + secrets.token_bytes(_NONCE_RANDOM_BYTES)
        return head + self._mac(head, connection)

    def _refuse(self, actual: str) -> VerificationError:
        return VerificationError(
            "join.nonce", f"a nonce this PS issued on this connection, unused and younger than {self._ttl_s:.0f}s",
            actual, "a replayed, relayed or late join",
        )

    def consume(self, nonce: bytes, connection: str) -> None:
        nonce = bytes(nonce)
        if len(nonce) != _NONCE_BYTES:
            raise self._refuse(f"{len(nonce)} bytes, not {_NONCE_BYTES}")
        head = nonce[: -32]
        if not hmac.compare_digest(nonce[-32:], self._mac(head, connection)):
            raise self._refuse("not issued by this PS for this connection")
        (issued,) = struct.unpack(">d", head[:8])
        now = self._clock()
        if not 0.0 <= now - issued < self._ttl_s:
            raise self._refuse(f"issued {now - issued:.0f}s ago")
        with self._lock:
            while self._used and next(iter(self._used.values())) <= now:
                self._used.popitem(last=False)
            if nonce in self._used:
                raise self._refuse("already used")
            while len(self._used) >= self._max_used:
                self._used.popitem(last=False)
            self._used[nonce] = issued + self._ttl_s


class AttestedCredentials(Credentials):
    """RA-TLS credentials: an in-memory attested identity, a policy and an audit log.

    One instance serves either role: a PS uses :meth:`server_credentials`,
    :meth:`issue_challenge`, :meth:`admit` and :meth:`identify_peer`; a worker
    uses :meth:`channel_setup` and :meth:`prove_join`.
    """

    def __init__(
        self,
        identity: RatlsIdentity,
        policy: Policy,
        *,
        node: str,
        role: Role,
        audit: AuditLog,
        collateral: Collateral | CollateralSource | None = None,
        nonce_ttl_s: float = 60.0,
        max_nonces: int = 1024,
        max_sessions: int = 4096,
        connect_timeout_s: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._identity = identity
        self._policy = policy
        self._node = node
        self._role = role
        self._audit = audit
        self._collateral = collateral
        self._connect_timeout_s = connect_timeout_s
        self._own_sha256 = hashlib.sha256(_der(identity.cert_pem)).digest()
        self._nonces = _Nonces(nonce_ttl_s, max_nonces, clock)
        self._max_sessions = max_sessions
        self._sessions_lock = threading.Lock()
        # SHA-256(token) -> (identity, the connection that joined)
        self._sessions: OrderedDict[bytes, tuple[PeerIdentity, str]] = OrderedDict()

    @classmethod
    def create(
        cls,
        provider: EvidenceProvider,
        policy: Policy,
        *,
        node: str,
        role: Role,
        audit: AuditLog,
        server_name: str = "enclavefl-ps",
        validity: dt.timedelta = dt.timedelta(days=7),
        collateral: Collateral | CollateralSource | None = None,
    ) -> AttestedCredentials:
        """Makes this node's key in memory, a quote binding it and its RA-TLS certificate.

        A PS's certificate carries ``server_name`` as its DNS name (what workers check it for).

        Raises:
            AttestationError: the provider cannot produce evidence.
        """
        common_name = server_name if role == "ps" else node
        identity = create_ratls_identity(provider, common_name=common_name, validity=validity)
        log.info("%s %s: RA-TLS certificate %s with %s evidence%s", role, node,
                 cert_fingerprint(identity.cert_pem)[:16], provider.kind,
                 " (SIMULATED, NOT A REAL TEE)" if provider.kind == "simulated" else "")
        return cls(identity, policy, node=node, role=role, audit=audit, collateral=collateral)

    @property
    def certificate_pem(self) -> bytes:
        """This node's RA-TLS certificate (public)."""
        return self._identity.cert_pem

    @property
    def attested_join(self) -> bool:
        return True

    @property
    def audit_log(self) -> AuditLog:
        return self._audit

    def own_identity(self) -> PeerIdentity:
        """This node's RA-TLS certificate and what its own quote claims (no TCB status: not verified here)."""
        claimed = _claimed(self._identity.cert_pem, self._policy)
        prod_id, svn = claimed.get("isv_prod_id"), claimed.get("isv_svn")
        return PeerIdentity(
            fingerprint=cert_fingerprint(self._identity.cert_pem), label=self._node,
            measurement=str(claimed.get("mr_enclave", "")),
            evidence=_EVIDENCE_KINDS.get(str(claimed.get("evidence", "none")), "none"),
            mr_signer=str(claimed.get("mr_signer", "")),
            isv_prod_id=prod_id if isinstance(prod_id, int) else None,
            isv_svn=svn if isinstance(svn, int) else None,
        )

    def close(self) -> None:
        """Logs the pending summary of refusals and closes the audit file (the server has stopped)."""
        self._audit.close()

    def _verify(self, cert_pem: bytes, peer: str) -> PeerEvidence:
        try:
            evidence = verify_ratls_certificate(
                cert_pem, policy=self._policy, at=dt.datetime.now(dt.timezone.utc), collateral=self._collateral
            )
        except VerificationError as exc:
            self._refuse(peer, exc, cert_pem)
            raise
        return evidence

    def _refuse(self, peer: str, exc: VerificationError, cert_pem: bytes | None) -> None:
        claimed = _claimed(cert_pem, self._policy) if cert_pem else {}
        if exc.field.startswith("simulated"):
            claimed["simulated"] = True
        self._audit.record(AuditRecord(
            node=self._node, role=self._role, peer=peer, decision="refused", reason=str(exc), field=exc.field,
            **claimed,  # type: ignore[arg-type]
        ))

    # ---------------------------------------------------------------- worker side
    def server_credentials(self) -> grpc.ServerCredentials:
        # No client certificates: workers prove themselves in the attested join.
        return grpc.ssl_server_credentials([(self._identity.private_key_pem(), self._identity.cert_pem)])

    def channel_setup(self, target: str) -> ChannelSetup:
        cert_pem = fetch_server_certificate(target, self._connect_timeout_s)
        evidence = self._verify(cert_pem, f"ps {target}")
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        if not names:
            exc = VerificationError("certificate.subject_alt_name", "a DNS name to pin the channel to", "none")
            self._refuse(f"ps {target}", exc, cert_pem)
            raise exc
        sha = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
        self._audit.record(AuditRecord(
            node=self._node, role=self._role, peer=f"ps {target} cert {sha.hex()[:16]}", decision="accepted",
            reason="evidence matches the policy; channel pinned to this certificate", **_proved(evidence),  # type: ignore[arg-type]
        ))
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        return ChannelSetup(creds, (("grpc.ssl_target_name_override", names[0]),), server_cert_sha256=sha)

    def prove_join(self, nonce: bytes, server_cert_sha256: bytes, worker_name: str) -> JoinProof:
        signature = self._identity.key.sign(join_message(nonce, server_cert_sha256, worker_name), ec.ECDSA(hashes.SHA256()))
        return JoinProof(self._identity.cert_pem, bytes(nonce), bytes(server_cert_sha256), signature)

    def sign_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        """Signs with the RA-TLS key, the one the attested join bound (secure aggregation's keys)."""
        return self._identity.cert_pem, self._identity.key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def check_secagg_certificate(self, cert_pem: bytes) -> bool:
        """Whether a fellow worker's RA-TLS evidence satisfies this node's policy (a refusal is audited)."""
        if len(cert_pem) > _MAX_CERT_BYTES:
            return False
        try:
            self._verify(cert_pem, f"secagg peer cert {cert_fingerprint(cert_pem)[:16]}")
        except (VerificationError, ValueError):
            return False
        return True

    # ---------------------------------------------------------------- PS side
    def issue_challenge(self, connection: str = "") -> bytes:
        return self._nonces.issue(connection)

    def admit(self, proof: JoinProof | None, worker_name: str, cert_pem: bytes | None,
              connection: str = "") -> tuple[PeerIdentity, str]:
        name = worker_name[:64]
        peer = f"worker {name!r}"
        if proof is None:
            exc = VerificationError("join.attestation", "an RA-TLS certificate and a signed challenge", "none")
            self._refuse(peer, exc, None)
            raise exc
        try:
            if len(proof.certificate) > _MAX_CERT_BYTES or len(worker_name.encode()) > _MAX_NAME_BYTES:
                raise VerificationError("join", f"certificate <= {_MAX_CERT_BYTES} B, name <= {_MAX_NAME_BYTES} B",
                                        f"{len(proof.certificate)} B, {len(worker_name.encode())} B")
            self._nonces.consume(proof.nonce, connection)
            if not secrets.compare_digest(proof.ps_cert_sha256, self._own_sha256):
                raise VerificationError(
                    "join.ps_cert_sha256", self._own_sha256.hex(), proof.ps_cert_sha256.hex(),
                    "the worker's channel ends at another certificate: a relay or man in the middle",
                )
        except VerificationError as exc:
            self._refuse(peer, exc, proof.certificate)
            raise
        evidence = self._verify(proof.certificate, peer)
        cert = x509.load_pem_x509_certificate(proof.certificate)
        key = cert.public_key()
        try:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InvalidSignature
            key.verify(proof.signature, join_message(proof.nonce, self._own_sha256, worker_name), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            err = VerificationError(
                "join.signature", "an ECDSA signature by the certificate's key over the nonce", "invalid",
                "the sender does not hold the certificate's key (a replayed certificate)",
            )
            self._refuse(peer, err, proof.certificate)
            raise err from exc
        fingerprint = cert_fingerprint(proof.certificate)
        label = f"{name} ({'SIMULATED, NOT A REAL TEE' if evidence.simulated else evidence.tee})"
        identity = _peer_identity(fingerprint, label, evidence)
        token = secrets.token_urlsafe(32)
        with self._sessions_lock:
            for old in [k for k, (v, _) in self._sessions.items() if v.fingerprint == fingerprint]:
                del self._sessions[old]
            while len(self._sessions) >= self._max_sessions:
                self._sessions.popitem(last=False)
            self._sessions[hashlib.sha256(token.encode()).digest()] = (identity, connection)
        self._audit.record(AuditRecord(
            node=self._node, role=self._role, peer=f"{peer} cert {fingerprint[:16]}", decision="accepted",
            reason="evidence matches the policy; join signed with the certificate key over a fresh nonce",
            **_proved(evidence),  # type: ignore[arg-type]
        ))
        return identity, token

    def identify_peer(self, cert_pem: bytes | None, session: str = "", connection: str = "") -> PeerIdentity:
        if not session:
            raise StaleSession("this call carries no attested session; join again")
        with self._sessions_lock:
            found = self._sessions.get(hashlib.sha256(session.encode()).digest())
        if found is None:
            raise StaleSession("unknown attested session (the PS restarted or dropped it); join again")
        identity, joined_on = found
        if not secrets.compare_digest(joined_on.encode(), connection.encode()):
            # A leaked token is useless elsewhere; an honest worker whose channel reconnected joins again.
            raise StaleSession("this session was issued on another connection; join again on this one")
        return identity
