"""The errors of the cluster's shared state, one branch of the project's error tree.

::

    EnclaveFLError
    └── StoreError                          the shared store refused or failed an operation
        ├── StoreUnavailable(ConnectionError) the store cannot be reached now; retry later
        ├── StoreConflict                   a transition out of order, or a compare-and-set lost
        ├── DuplicateUpdate                 an update id (or its worker's slot) is already accepted
        ├── LeaseLost                       the caller's lease expired or another holder took it
        └── SealedValueRejected             a stored value failed authentication (tampered, replayed)

Every refusal leaves the store as it was: a conflict, a duplicate or a lost
lease never writes part of a transition.
"""

from __future__ import annotations

from collections.abc import Iterable

from enclavefl.errors import EnclaveFLError

__all__ = [
    "DuplicateUpdate",
    "LeaseLost",
    "SealedValueRejected",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(EnclaveFLError):
    """The shared store refused or failed an operation."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store cannot be reached (it is down, restarting or loading); retrying later may succeed.

    Whether a write that raised this was applied is unknown: every write of the
    store is idempotent for the same arguments, so the caller repeats it.
    """


class StoreConflict(StoreError):
    """A transition was refused: out of order (a round not open, a version gap) or a compare-and-set lost."""


class DuplicateUpdate(StoreError):
    """Some updates of an ``accept`` were accepted before; nothing of that ``accept`` was recorded.

    Attributes:
        update_ids: the refused update ids, sorted.
    """

    def __init__(self, message: str, update_ids: Iterable[str]) -> None:
        self.update_ids = tuple(sorted(update_ids))
        super().__init__(message)


class LeaseLost(StoreError):
    """The caller's lease expired or belongs to another holder: it must stop acting as the lease's holder."""


class SealedValueRejected(StoreError):
    """A sealed value failed authentication: flipped bits, another key's or version's value, or another cluster key."""
