"""Sealed values: what the servers write to a store outside the enclave is encrypted and authenticated.

How this works: :class:`Sealer` encrypts a blob with AES-GCM (NIST SP 800-38D)
under a key derived from the cluster key for one job (HKDF-SHA256, RFC 5869),
with a fresh random 96-bit nonce. The associated data names where the value
belongs: the job, the kind of value and its coordinates (model version; round,
attempt, server, generation and the update ids a partial holds). A value is
therefore refused when a bit of it changed, when it is read under another
key or version (an old model written back as the next one, one server's partial
copied over another's), or when it was sealed under another cluster key.

:class:`SealedStore` wraps any :class:`~enclavefl.cluster.store.Store` and
seals the model, the strategy's state, the partial aggregates and the job
config on their way in, and opens them on their way out; the membership,
round counters, ledger, sessions and leases stay readable (ids and counts, no
parameters). What sealing cannot see: a server's whole partial rolled back to
an older generation with its own ids is consistent with itself; the leader
catches it by comparing the partials with the ledger
(:func:`~enclavefl.cluster.store.check_partials`).

The cluster key is handed to attested servers by the scheduler (a later
slice); here it is a constructor argument and it is never logged.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final, final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclavefl.cluster.errors import SealedValueRejected, StoreConflict
from enclavefl.cluster.store import (
    AcceptedUpdate,
    Lease,
    Member,
    MemberRole,
    ModelVersion,
    Partial,
    RoundPhase,
    RoundState,
    Session,
    StateBlob,
    Store,
    UpdateRef,
)
from enclavefl.errors import ConfigError

__all__ = ["CLUSTER_KEY_BYTES", "SealedStore", "Sealer", "ids_digest"]

CLUSTER_KEY_BYTES: Final = 32
"""The cluster key's length: AES-256."""

MAGIC: Final = b"EFS1"
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16


def _field(value: str | int) -> bytes:
    raw = str(value).encode()
    return struct.pack(">I", len(raw)) + raw


def ids_digest(update_ids: Iterable[str]) -> str:
    """SHA-256 over the sorted ids (each length-prefixed): what a partial's seal binds."""
    h = hashlib.sha256()
    for uid in sorted(update_ids):
        h.update(_field(uid))
    return h.hexdigest()


@final
class Sealer:
    """Seals and opens blobs for one job under the cluster key.

    Args:
        key: the cluster key, :data:`CLUSTER_KEY_BYTES` random bytes.
        job: the job the values belong to (bound into every value).

    Raises:
        ConfigError: the key is not 32 bytes.
    """

    def __init__(self, key: bytes, *, job: str) -> None:
        if len(key) != CLUSTER_KEY_BYTES:
            raise ConfigError(f"cluster key: expected {CLUSTER_KEY_BYTES} bytes, got {len(key)}")
        derived = HKDF(hashes.SHA256(), CLUSTER_KEY_BYTES, salt=None,
                       info=b"enclavefl cluster store v1\x00" + job.encode()).derive(key)
        self._aead = AESGCM(derived)
        self._job = job

    def __repr__(self) -> str:
        return f"Sealer(job={self._job!r})"  # never the key

    def _ad(self, kind: str, context: Sequence[str | int]) -> bytes:
        return MAGIC + b"".join(_field(x) for x in (self._job, kind, *context))

    def seal(self, blob: bytes, kind: str, *context: str | int) -> bytes:
        """``MAGIC | nonce | AES-GCM(blob) | tag``, bound to (job, ``kind``, ``context``)."""
        nonce = os.urandom(_NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, blob, self._ad(kind, context))

    def open(self, sealed: bytes, kind: str, *context: str | int) -> bytes:
        """The blob :meth:`seal` sealed with the same ``kind`` and ``context``.

        Raises:
            SealedValueRejected: not a sealed value, or its authentication failed (tampered, replayed to
                another key or version, or sealed under another cluster key).
        """
        where = "/".join(str(x) for x in (kind, *context))
        if len(sealed) < len(MAGIC) + _NONCE_BYTES + _TAG_BYTES or not sealed.startswith(MAGIC):
            raise SealedValueRejected(f"{where}: not a sealed value ({len(sealed)} bytes, expected the {MAGIC!r} "
                                      "header): plaintext or foreign data in the store")
        nonce = sealed[len(MAGIC):len(MAGIC) + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[len(MAGIC) + _NONCE_BYTES:], self._ad(kind, context))
        except InvalidTag:
            raise SealedValueRejected(f"{where}: the sealed value failed authentication: tampered, written back "
                                      "from another key or version, or sealed under another cluster key") from None


@final
class SealedStore(Store):
    """A :class:`Store` whose blobs are sealed with ``sealer`` before they reach ``inner``.

    Reads raise :class:`SealedValueRejected` for a value that does not open. A
    write repeated with the same plaintext is answered as done, as the contract
    asks, although its ciphertext (a fresh nonce) differs from the stored one.
    """

    def __init__(self, inner: Store, sealer: Sealer) -> None:
        self._inner = inner
        self._sealer = sealer
        self._ids: dict[tuple[int, int, str], tuple[int, frozenset[str]]] = {}
        """The ids of the partials this process wrote last, by (round, attempt, server): their generation, ids."""

    # -- membership, sessions, leases: nothing to seal ----------------------------------------

    def register(self, member: Member, ttl_s: float) -> None:
        self._inner.register(member, ttl_s)

    def heartbeat(self, member_id: str, ttl_s: float) -> bool:
        return self._inner.heartbeat(member_id, ttl_s)

    def deregister(self, member_id: str) -> None:
        self._inner.deregister(member_id)

    def members(self, role: MemberRole | None = None) -> list[Member]:
        return self._inner.members(role)

    def bind_session(self, session: Session) -> None:
        self._inner.bind_session(session)

    def session(self, worker_id: str) -> Session | None:
        return self._inner.session(worker_id)

    def drop_session(self, worker_id: str) -> None:
        self._inner.drop_session(worker_id)

    def sessions(self) -> list[Session]:
        return self._inner.sessions()

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        return self._inner.acquire_lease(name, holder, ttl_s)

    def renew_lease(self, lease: Lease, ttl_s: float) -> None:
        self._inner.renew_lease(lease, ttl_s)

    def release_lease(self, lease: Lease) -> None:
        self._inner.release_lease(lease)

    def lease(self, name: str) -> Lease | None:
        return self._inner.lease(name)

    def round_state(self, number: int | None = None) -> RoundState | None:
        return self._inner.round_state(number)

    def open_round(self, number: int, attempt: int, *, model_version: int, sampled: Collection[str],
                   required: int, lease: Lease | None = None) -> RoundState:
        return self._inner.open_round(number, attempt, model_version=model_version, sampled=sampled,
                                      required=required, lease=lease)

    def begin_close(self, number: int, attempt: int, *, lease: Lease | None = None) -> RoundState:
        return self._inner.begin_close(number, attempt, lease=lease)

    def fail_round(self, number: int, attempt: int, reason: str, *, lease: Lease | None = None) -> RoundState:
        return self._inner.fail_round(number, attempt, reason, lease=lease)

    def count(self, number: int, attempt: int, counts: Mapping[str, int]) -> bool:
        return self._inner.count(number, attempt, counts)

    def accepted(self, number: int, attempt: int) -> dict[str, AcceptedUpdate]:
        return self._inner.accepted(number, attempt)

    def close(self) -> None:
        self._inner.close()

    # -- sealed values -------------------------------------------------------------------------

    def put_config(self, blob: bytes) -> None:
        self._inner.put_config(self._sealer.seal(blob, "config"))

    def config(self) -> bytes | None:
        sealed = self._inner.config()
        return None if sealed is None else self._sealer.open(sealed, "config")

    def _open_model(self, found: ModelVersion | None) -> ModelVersion | None:
        if found is None:
            return None
        return ModelVersion(found.version, self._sealer.open(found.blob, "model", found.version))

    def model(self, version: int | None = None) -> ModelVersion | None:
        return self._open_model(self._inner.model(version))

    def strategy_state(self) -> StateBlob | None:
        found = self._inner.strategy_state()
        if found is None:
            return None
        return StateBlob(found.version, self._sealer.open(found.blob, "strategy", found.version))

    def _holds(self, version: int, blob: bytes, strategy_state: bytes | None) -> bool:
        """The store holds this plaintext as model ``version`` (and strategy state): a repeated write."""
        found = self.model(version)
        if found is None or found.blob != blob:
            return False
        if strategy_state is None:
            return True
        state = self.strategy_state()
        return state is not None and (state.version, state.blob) == (version, strategy_state)

    def publish_model(self, version: int, blob: bytes, *, strategy_state: bytes | None = None,
                      lease: Lease | None = None) -> None:
        sealed_state = None if strategy_state is None else self._sealer.seal(strategy_state, "strategy", version)
        try:
            self._inner.publish_model(version, self._sealer.seal(blob, "model", version), strategy_state=sealed_state,
                                      lease=lease)
        except StoreConflict:
            if not self._holds(version, blob, strategy_state):
                raise

    def finish_round(self, number: int, attempt: int, *, model: bytes, strategy_state: bytes | None = None,
                     lease: Lease | None = None) -> RoundState:
        state = self._inner.round_state(number)
        version = (state.model_version if state is not None else 0) + 1
        sealed_state = None if strategy_state is None else self._sealer.seal(strategy_state, "strategy", version)
        try:
            return self._inner.finish_round(number, attempt, model=self._sealer.seal(model, "model", version),
                                            strategy_state=sealed_state, lease=lease)
        except StoreConflict:
            now = self._inner.round_state(number)
            if (now is None or now.attempt != attempt or now.phase is not RoundPhase.CLOSED
                    or not self._holds(version, model, strategy_state)):
                raise
            return now

    def _partial_ids(self, number: int, attempt: int, server: str, generation: int) -> frozenset[str]:
        """The ids the partial at ``generation`` holds (from memory, else from the store)."""
        if generation == 0:
            return frozenset()
        known = self._ids.get((number, attempt, server))
        if known is not None and known[0] == generation:
            return known[1]
        found = self._inner.partial(number, attempt, server)
        return found.update_ids if found is not None and found.generation == generation else frozenset()

    def accept(self, number: int, attempt: int, server: str, updates: Sequence[UpdateRef], partial: bytes, *,
               generation: int, counts: Mapping[str, int] | None = None) -> int:
        ids = self._partial_ids(number, attempt, server, generation) | {u.update_id for u in updates}
        sealed = self._sealer.seal(partial, "partial", number, attempt, server, generation + 1, ids_digest(ids))
        try:
            new = self._inner.accept(number, attempt, server, updates, sealed, generation=generation, counts=counts)
        except StoreConflict:
            found = self.partial(number, attempt, server)
            ledger = self._inner.accepted(number, attempt)
            if (found is None or found.generation != generation + 1 or found.update_ids != ids or found.blob != partial
                    or any(ledger.get(u.update_id) != AcceptedUpdate(u.worker, u.update_id, server) for u in updates)):
                raise
            new = found.generation  # a repeated accept
        self._ids = {k: v for k, v in self._ids.items() if k[0] >= number}  # earlier rounds are done
        self._ids[(number, attempt, server)] = (new, ids)
        return new

    def _open_partial(self, number: int, attempt: int, p: Partial) -> Partial:
        return Partial(p.server, p.generation, p.update_ids, self._sealer.open(
            p.blob, "partial", number, attempt, p.server, p.generation, ids_digest(p.update_ids)))

    def partials(self, number: int, attempt: int) -> dict[str, Partial]:
        return {server: self._open_partial(number, attempt, p)
                for server, p in self._inner.partials(number, attempt).items()}

    def partial(self, number: int, attempt: int, server: str) -> Partial | None:
        found = self._inner.partial(number, attempt, server)
        return None if found is None else self._open_partial(number, attempt, found)
