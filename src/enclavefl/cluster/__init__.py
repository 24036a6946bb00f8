"""The cluster's shared state: the Store interface, its in-memory and Redis implementations, sealed values.

Redis is imported only when a :class:`RedisStore` is made (the ``cluster`` extra),
and the sealing names (``Sealer``, ``SealedStore``) load cryptography only when
first used, so the interface and :class:`MemoryStore` load with neither: the
single parameter server may use them.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from enclavefl.cluster.sealing import CLUSTER_KEY_BYTES, SealedStore, Sealer

_SEALING = frozenset({"CLUSTER_KEY_BYTES", "SealedStore", "Sealer"})


def __getattr__(name: str) -> Any:
    # PEP 562: the sealing names import cryptography on first use only.
    if name in _SEALING:
        from enclavefl.cluster import sealing

        return getattr(sealing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
