"""The cluster's shared state: the Store interface, its in-memory and Redis implementations, sealed values.

Redis is imported only when a :class:`RedisStore` is made (the ``cluster`` extra);
the rest loads without it.
"""

from enclavefl.cluster.errors import (
    DuplicateUpdate,
    LeaseLost,
    SealedValueRejected,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from enclavefl.cluster.memory import MemoryStore
from enclavefl.cluster.redis_store import RedisSettings, RedisStore
from enclavefl.cluster.sealing import CLUSTER_KEY_BYTES, SealedStore, Sealer
from enclavefl.cluster.store import (
    ROUND_TRANSITIONS,
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
    check_partials,
)

__all__ = [
    "CLUSTER_KEY_BYTES",
    "ROUND_TRANSITIONS",
    "AcceptedUpdate",
    "DuplicateUpdate",
    "Lease",
    "LeaseLost",
    "Member",
    "MemberRole",
    "MemoryStore",
    "ModelVersion",
    "Partial",
    "RedisSettings",
    "RedisStore",
    "RoundPhase",
    "RoundState",
    "SealedStore",
    "SealedValueRejected",
    "Sealer",
    "Session",
    "StateBlob",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "UpdateRef",
    "check_partials",
]
