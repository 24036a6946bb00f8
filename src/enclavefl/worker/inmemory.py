"""A :class:`~enclavefl.messages.WorkerClient` that calls a parameter server in the same process.

It lets the worker runtime run against a real :class:`~enclavefl.server.ps.ParameterServer`
without gRPC, TLS or sockets: unit tests of the runtime, and a whole federation
simulated in one process. It keeps what matters about the real transport:

- an update goes through ``open_update`` -> ``feed`` per chunk -> ``commit``, so the
  PS stages, bounds and validates it exactly as for an update that came over gRPC;
- a pulled model is a copy, so a worker cannot change the PS's global model by
  writing to the arrays it trains on;
- a refused update is a :class:`~enclavefl.messages.PushResult` with
  ``accepted=False``, not an exception, as the gRPC client reports it.

Errors the handler raises (StaleSession, ProtocolError, ...) reach the caller
as they are: they are the project's own, which is what the gRPC client
translates its status codes into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, final

from enclavefl.errors import ClosedError, ConfigError, ProtocolError, UpdateRejected
from enclavefl.messages import (
    FederationHandler,
    JoinInfo,
    PeerIdentity,
    PushResult,
    TaskInfo,
    UpdateKind,
    UpdateMeta,
)
from enclavefl.tensors import EncodedUpdate, ParamSet, StreamHeader, iter_chunks

if TYPE_CHECKING:
    from enclavefl.privacy.secagg.stages import SecAggAnswer, SecAggCall

__all__ = ["InMemoryClient", "SecAggSigner"]

SecAggSigner = Callable[[bytes], tuple[bytes, bytes]]
"""Signs a payload with a worker's certificate key: (certificate PEM, signature)."""


@final
class InMemoryClient:
    """One worker's in-process connection to a :class:`~enclavefl.messages.FederationHandler`.

    One worker uses it from one thread (as with the gRPC client), except :meth:`heartbeat`,
    which the worker's heartbeat thread may call meanwhile.
    """

    def __init__(self, handler: FederationHandler, peer: PeerIdentity, *, chunk_bytes: int = 2**20,
                 secagg_signer: SecAggSigner | None = None) -> None:
        """Binds the client to a handler; nothing is called until :meth:`join`.

        Args:
            handler: the PS (or anything implementing its handler contract).
            peer: who this worker is, as the PS sees it: the identity a TLS
                certificate gives over gRPC.
            chunk_bytes: the size of the chunks an update is fed in; the PS
                refuses chunks over its ``transport.chunk_bytes``.
            secagg_signer: for secure aggregation, signs a payload with the key of
                the certificate whose fingerprint is ``peer``'s, returning (certificate
                PEM, signature); None: this worker cannot take part in it.

        Raises:
            ValueError: ``chunk_bytes`` is not an int >= 1.
        """
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"InMemoryClient: chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
        self._handler = handler
        self._peer = peer
        self._chunk_bytes = chunk_bytes
        self._secagg_signer = secagg_signer
        self._closed = False

    @property
    def peer(self) -> PeerIdentity:
        return self._peer

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"InMemoryClient of {self._peer.label} used after close()")

    def join(self, worker_name: str, num_samples: int, *, job_settings: Mapping[str, str] | None = None) -> JoinInfo:
        """Joins; ``job_settings`` are not compared: a simulation's workers share the PS's job."""
        self._check_open()
        return self._handler.join(self._peer, worker_name, num_samples)

    def wait_task(self, worker_id: str, max_wait_s: float) -> TaskInfo:
        self._check_open()
        return self._handler.wait_task(self._peer, worker_id, max(float(max_wait_s), 0.0))

    def pull_model(self, worker_id: str, model_version: int) -> tuple[int, ParamSet, int]:
        """Returns (model version, a deep copy of the parameters, their payload bytes)."""
        self._check_open()
        version, params = self._handler.model_for(self._peer, worker_id, model_version)
        return version, params.copy(), params.nbytes

    def push_update(
        self,
        worker_id: str,
        round_: int,
        model_version: int,
        update: ParamSet | EncodedUpdate,
        num_samples: int,
        metrics: Mapping[str, float],
        *,
        kind: UpdateKind = UpdateKind.DELTA,
        extensions: Mapping[str, bytes] | None = None,
    ) -> PushResult:
        """Streams ``update`` into the handler chunk by chunk and returns its verdict.

        Returns:
            accepted, or refused with the PS's reason (the update was invalid,
            late, or broke the stream limits); ``bytes_sent`` is the payload size.

        Raises:
            StaleSession: the PS does not know this worker (any more).
        """
        self._check_open()
        header = StreamHeader.of(update)
        meta = UpdateMeta(
            worker_id=worker_id,
            round=round_,
            model_version=model_version,
            num_samples=num_samples,
            tensors=header,
            metrics={k: float(v) for k, v in metrics.items()},
            kind=kind,
            extensions=dict(extensions or {}),
        )
        try:
            sink = self._handler.open_update(self._peer, meta)
        except UpdateRejected as exc:
            return PushResult(False, str(exc), header.total_bytes)
        try:
            for chunk in iter_chunks(update, self._chunk_bytes):
                sink.feed(chunk)
            sink.commit()
        except (UpdateRejected, ProtocolError) as exc:
            sink.abort(str(exc))
            return PushResult(False, str(exc), header.total_bytes)
        except BaseException:
            sink.abort("stream ended abnormally")
            raise
        return PushResult(True, "", header.total_bytes)

    def secagg_exchange(self, call: SecAggCall) -> SecAggAnswer:
        """A secure-aggregation stage call, handed to the PS as the gRPC service would.

        Raises:
            ProtocolError: the PS refused the message, or it runs no secure aggregation.
            RoundError: the PS has no open attempt with the call's round and nonce.
        """
        self._check_open()
        exchange = getattr(self._handler, "secagg_exchange", None)
        if exchange is None:
            raise ProtocolError("SecAggExchange: the handler runs no secure aggregation")
        answer: SecAggAnswer = exchange(self._peer, call)
        return answer

    def sign_for_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        """(certificate PEM, signature) from the signer given at construction.

        Raises:
            ConfigError: this client was made without one (the worker cannot take part at all).
        """
        if self._secagg_signer is None:
            raise ConfigError(f"{self._peer.label}: this in-memory worker has no key to sign secure-aggregation keys "
                              "(give InMemoryClient a secagg_signer)")
        return self._secagg_signer(payload)

    def verify_for_secagg(self, certificate: bytes, payload: bytes, signature: bytes) -> bool:
        """Whether the certificate's key signed ``payload`` (in process there is no CA to check it against)."""
        from enclavefl.privacy.secagg.identity import verify_with_certificate

        return verify_with_certificate(certificate, payload, signature)

    def record_secagg_refusal(self, stage: str, reason: str) -> None:
        """In process there is no audit log: the worker's warning line is the record."""

    def leave(self, worker_id: str, reason: str) -> None:
        self._check_open()
        self._handler.leave(self._peer, worker_id, reason)

    def heartbeat(self, worker_id: str) -> None:
        self._check_open()
        self._handler.heartbeat(self._peer, worker_id)

    def close(self) -> None:
        """Marks the client closed; the handler is not told (as a closed channel tells it nothing). Idempotent."""
        self._closed = True
