"""The errors enclavefl raises, one branch per subsystem.

::

    EnclaveFLError
    ├── ConfigError(ValueError)           bad job file, --set override or CLI argument
    ├── ProtocolError                     a peer sent malformed or out-of-limit data
    │   └── VersionMismatch               a peer speaks another protocol version
    ├── UpdateRejected                    a worker update failed validation
    ├── RoundError                        the round engine could not make progress
    ├── CheckpointError                   a checkpoint is missing, corrupt or unwritable
    ├── DataError(ValueError)             a data set file is missing, truncated or malformed
    ├── AttestationError                  evidence could not be obtained or checked
    │   └── VerificationError             evidence checked and refused (.field/.expected/.actual)
    └── TransportError                    the network failed us
        ├── Unavailable(ConnectionError)  the peer cannot be reached (yet)
        ├── DeadlineExceeded(TimeoutError)
        └── StaleSession                  the PS no longer knows this worker: re-join
    (StoreError and its branch: enclavefl.cluster.errors, the cluster's shared state)

    ClosedError(RuntimeError)             caller misuse: used after close

Foreign errors (``grpc.RpcError``, ``ssl.SSLError``, pydantic's ``ValidationError``)
are translated at the boundary where they occur, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AttestationError",
    "CheckpointError",
    "ClosedError",
    "ConfigError",
    "DataError",
    "DeadlineExceeded",
    "EnclaveFLError",
    "ProtocolError",
    "RoundError",
    "StaleSession",
    "TransportError",
    "Unavailable",
    "UpdateRejected",
    "VerificationError",
    "VersionMismatch",
]


class EnclaveFLError(Exception):
    """Root of every error enclavefl raises on purpose."""


class ConfigError(EnclaveFLError, ValueError):
    """The job configuration (file, override or argument) is invalid."""


class ProtocolError(EnclaveFLError):
    """A peer sent data that breaks the wire format or its limits."""


class VersionMismatch(ProtocolError):
    """A peer speaks a protocol version this build does not."""


class UpdateRejected(EnclaveFLError):
    """A worker update was refused; it left no trace in the aggregate."""


class RoundError(EnclaveFLError):
    """The round engine cannot make progress (for example, too few workers)."""


class CheckpointError(EnclaveFLError):
    """A checkpoint could not be written, or the one on disk is unusable."""


class DataError(EnclaveFLError, ValueError):
    """A data set file is missing, truncated or does not match its format."""


class AttestationError(EnclaveFLError):
    """Evidence could not be produced, parsed or checked."""


class VerificationError(AttestationError):
    """Evidence was checked and refused.

    Attributes:
        field: what was compared (``mr_enclave``, ``signature``, ...).
        expected: what the policy or the format required.
        actual: what the evidence held.
    """

    def __init__(self, field: str, expected: Any, actual: Any, detail: str = "") -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        self.detail = detail
        message = f"{field}: expected {expected}, got {actual}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class TransportError(EnclaveFLError):
    """The network or the peer's process failed us."""


class Unavailable(TransportError, ConnectionError):
    """The peer cannot be reached now; retrying later may succeed."""


class DeadlineExceeded(TransportError, TimeoutError):
    """A call did not finish within its deadline."""


class StaleSession(TransportError):
    """The PS does not know this worker any more (it restarted or dropped it)."""


class ClosedError(RuntimeError):
    """An object was used after it was closed (a caller bug, not a peer's)."""
