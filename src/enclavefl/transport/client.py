"""The worker's end of the federation service, with gRPC errors translated to ours.

One :class:`FederationClient` is one channel, and every call of the worker
(its heartbeat thread's too) goes over it. The channel keeps a subchannel of
its own, so it is one HTTP/2 connection at a time: the session an attested
join issues is valid on that connection only, and when the channel
reconnects the PS answers the next call with ``StaleSession`` and the worker
joins again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import grpc

from enclavefl.bufferpool import BufferPool
from enclavefl.errors import ClosedError, ConfigError, EnclaveFLError, ProtocolError, Unavailable
from enclavefl.job_digest import differing_settings
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.tensors import CodecLimits, EncodedUpdate, ParamSet, StreamDecoder, StreamHeader, iter_chunks
from enclavefl.transport.framing import DataChunk, chunk_decoder, chunk_payload, encode_data, encode_message
from enclavefl.transport.credentials import Credentials
from enclavefl.messages import JoinInfo, PushResult, TaskInfo, UpdateKind, UpdateMeta, WorkerClient
from enclavefl.transport.ratelimit import RATE_LIMITED
from enclavefl.privacy.secagg.identity import KnownKeys
from enclavefl.privacy.secagg.stages import SecAggAnswer, SecAggCall
from enclavefl.transport.audit import AuditRecord
from enclavefl.transport.secagg_wire import answer_from_proto, call_to_proto
from enclavefl.transport.service import SESSION_METADATA_KEY, message_limit
from enclavefl.transport.wire import (
    SETTINGS_MISMATCH,
    check_version,
    error_from_rpc,
    header_from_proto,
    task_from_proto,
    tls_failure,
    update_meta_to_proto,
)

__all__ = ["FederationClient", "PushResult"]

log = logging.getLogger(__name__)

def _error_from_rpc(exc: grpc.RpcError, what: str) -> EnclaveFLError:
    """:func:`error_from_rpc`, except that the PS's rate limit is :class:`Unavailable`: retry later."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(RATE_LIMITED):
        return Unavailable(f"{what}: the PS refuses calls from this connection for now: {details}")
    return error_from_rpc(exc, what)


class FederationClient:
    """One TLS channel to a parameter server. Close it with close() or a ``with`` block."""

    def __init__(self, target: str, credentials: Credentials, *, chunk_bytes: int, limits: CodecLimits = CodecLimits()) -> None:
        """Opens the channel; the credentials may verify the server first.

        Raises:
            VerificationError: the server is not trusted (nothing was sent).
            Unavailable: the server could not be reached for verification.
        """
        setup = credentials.channel_setup(target)
        limit = message_limit(chunk_bytes)
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", 0),
            # Not shared with other channels of this process: the connection, and so the session, is this client's.
            ("grpc.use_local_subchannel_pool", 1),
            *setup.options,
        ]
        self._credentials = credentials
        self._server_cert_sha256 = setup.server_cert_sha256
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._channel = grpc.secure_channel(target, setup.credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)  # type: ignore[no-untyped-call]
        # Tensor streams use the framing fast path (same bytes on the wire, fewer copies).
        self._pull = self._channel.unary_stream(
            "/enclavefl.v1.Federation/PullModel",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=chunk_decoder(pb.ModelChunk),
        )
        self._push = self._channel.stream_unary(
            "/enclavefl.v1.Federation/PushUpdate",
            request_serializer=encode_message,
            response_deserializer=pb.PushReply.FromString,
        )
        self._chunk_bytes = chunk_bytes
        self._limits = limits
        self._peer_keys = KnownKeys(credentials.check_secagg_certificate)
        # The last download's buffer, reused when the worker no longer views that model (no page faults).
        self._download_buffers = BufferPool(1)
        self._closed = False
        self.target = target

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("FederationClient used after close()")

    def _error(self, exc: grpc.RpcError, what: str) -> EnclaveFLError:
        """Our error for a failed call; a refused TLS handshake under the job CA is a configuration error.

        With a pinned PS certificate (attested credentials) a failed handshake
        means the PS restarted with a new key since it was verified, and the
        worker verifies it again, so it stays a transport error there.
        """
        details = (exc.details() if hasattr(exc, "details") else None) or ""
        reason = None if self._server_cert_sha256 else tls_failure(details)
        if reason is not None:
            log.debug("%s %s: TLS handshake failed: %s", what, self.target, details)
            return ConfigError(
                f"{what} {self.target}: {reason}; check that ca.pem (--tls-dir, or transport.tls.ca_cert) is the CA "
                "that issued the PS certificate, and that transport.tls.server_name is a name in it"
            )
        return _error_from_rpc(exc, f"{what} {self.target}")

    def join(self, worker_name: str, num_samples: int, timeout_s: float = 30.0, *,
             job_settings: Mapping[str, str] | None = None) -> JoinInfo:
        """Joins; with attested credentials, first proves this node's evidence over a PS challenge.

        Args:
            job_settings: this node's digests of the settings every node must share
                (:func:`enclavefl.job_digest.job_digests`), for the PS to compare.

        Raises:
            VerificationError: the PS refused this worker's evidence or proof.
            ConfigError: the TLS handshake refused the PS certificate (another CA or name), or
                this worker's job settings differ from the PS's (the message names the keys).
        """
        self._check_open()
        ours = dict(job_settings or {})
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name=worker_name, num_samples=num_samples,
                                 job_settings=ours)
        try:
            if self._credentials.attested_join:
                challenge = self._stub.Challenge(pb.ChallengeRequest(protocol_version=PROTOCOL_VERSION), timeout=timeout_s)
                check_version(challenge.protocol_version, "ChallengeReply", sender="PS")
                proof = self._credentials.prove_join(challenge.nonce, self._server_cert_sha256, worker_name)
                request.attestation.CopyFrom(
                    pb.JoinAttestation(certificate=proof.certificate, nonce=proof.nonce,
                                       ps_cert_sha256=proof.ps_cert_sha256, signature=proof.signature)
                )
            reply = self._stub.Join(request, timeout=timeout_s, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise self._error(exc, "Join") from exc
        check_version(reply.protocol_version, "JoinReply", sender="PS")
        differ = differing_settings(ours, reply.job_settings) if ours and reply.job_settings else []
        if differ:
            raise ConfigError(f"Join {self.target}: {SETTINGS_MISMATCH} from the PS's in {', '.join(differ)}: "
                              "every node must run the same job file")
        self._metadata = ((SESSION_METADATA_KEY, reply.session_token),) if reply.session_token else ()
        return JoinInfo(reply.worker_id, reply.job_name, reply.ps_instance, int(reply.rounds),
                        heartbeat_s=max(float(reply.heartbeat_s), 0.0))

    def wait_task(self, worker_id: str, max_wait_s: float) -> TaskInfo:
        """Long-polls for the next task.

        Raises:
            ProtocolError: the task breaks the format: unknown kind, client
                settings out of range, or a config map out of its limits.
        """
        self._check_open()
        try:
            reply = self._stub.WaitTask(
                pb.WaitTaskRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, max_wait_s=max_wait_s),
                timeout=max_wait_s + 30.0,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, "WaitTask") from exc
        check_version(reply.protocol_version, "Task", sender="PS")
        return task_from_proto(reply)

    def pull_model(self, worker_id: str, model_version: int, timeout_s: float = 600.0) -> tuple[int, ParamSet, int]:
        """Streams the global parameters in.

        Args:
            model_version: the version this worker holds in full from this PS instance, -1 for none; the
                download may hold rows changed since it (:func:`enclavefl.download_codec.resolve_download`).

        Returns:
            (model version, parameters, bytes received).

        Raises:
            ProtocolError: the stream broke the format or the limits.
        """
        self._check_open()
        try:
            stream = self._pull(
                pb.PullRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, model_version=model_version),
                timeout=timeout_s,
                metadata=self._metadata,
            )
            first = next(stream, None)
            if first is None or isinstance(first, DataChunk) or first.WhichOneof("part") != "header":
                raise ProtocolError("PullModel: the stream did not start with a model header")
            check_version(first.header.protocol_version, "ModelHeader", sender="PS")
            decoder = StreamDecoder(header_from_proto(first.header.tensors), self._limits,
                                    pool=self._download_buffers)
            for msg in stream:
                data = chunk_payload(msg)
                if data is None:
                    raise ProtocolError("PullModel: a second header inside one model stream")
                decoder.feed(data)
            params = decoder.finish()
        except grpc.RpcError as exc:
            raise self._error(exc, "PullModel") from exc
        return int(first.header.model_version), params, decoder.bytes_received

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
        timeout_s: float = 600.0,
    ) -> PushResult:
        """Streams an update (header, then chunks) and returns the PS's verdict.

        Args:
            kind: what ``update`` holds, announced in the header for the PS to check.
            extensions: opaque per-stage data for the header; the PS refuses maps
                over the limits in :mod:`enclavefl.transport.wire`.

        Raises:
            ProtocolError: the PS refused the header (for example extensions over their limits).
        """
        self._check_open()
        header = StreamHeader.of(update)
        meta = UpdateMeta(
            worker_id=worker_id,
            round=round_,
            model_version=model_version,
            num_samples=num_samples,
            tensors=header,
            metrics=metrics,
            kind=kind,
            extensions=extensions or {},
        )
        envelope = update_meta_to_proto(meta)

        def messages() -> Iterator[pb.UpdateChunk | bytes]:
            yield pb.UpdateChunk(header=envelope)
            for chunk in iter_chunks(update, self._chunk_bytes):
                yield encode_data(chunk)

        try:
            reply = self._push(messages(), timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, "PushUpdate") from exc
        check_version(reply.protocol_version, "PushReply", sender="PS")
        return PushResult(bool(reply.accepted), reply.reason, header.total_bytes)

    def leave(self, worker_id: str, reason: str, timeout_s: float = 5.0) -> None:
        self._check_open()
        try:
            self._stub.Leave(
                pb.LeaveRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, reason=reason),
                timeout=timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, "Leave") from exc

    def secagg_exchange(self, call: SecAggCall) -> SecAggAnswer:
        """One secure-aggregation stage call (waits at most ``call.max_wait_s`` on the PS, plus a margin).

        Raises:
            ProtocolError: the PS refused the message or answered out of limits.
            Unavailable, DeadlineExceeded: the PS could not be reached in time.
        """
        self._check_open()
        try:
            reply = self._stub.SecAggExchange(call_to_proto(call), timeout=call.max_wait_s + 30.0,
                                              metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, "SecAggExchange") from exc
        check_version(reply.protocol_version, "SecAggExchange", sender="PS")
        return answer_from_proto(reply, call)

    def sign_for_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        """(certificate, signature) by the key this worker's join bound (see :meth:`Credentials.sign_secagg`)."""
        return self._credentials.sign_secagg(payload)

    def verify_for_secagg(self, certificate: bytes, payload: bytes, signature: bytes) -> bool:
        """Whether a peer's certificate is trusted here and its key signed ``payload``.

        A certificate's verdict, and its key, are kept for this channel's life (the
        certificate names the key; the signature is checked every time).
        """
        return self._peer_keys.verify(certificate, payload, signature)

    def record_secagg_refusal(self, stage: str, reason: str) -> None:
        """Audits a secure-aggregation message this worker refused (attested credentials keep an audit log)."""
        audit = self._credentials.audit_log
        if audit is None:
            return
        audit.record(AuditRecord(node=self._credentials.own_identity().label, role="worker", peer=f"ps {self.target}",
                                 decision="refused", reason=f"secure aggregation stage {stage}: {reason}"[:400],
                                 field=f"secagg.{stage}"))

    def heartbeat(self, worker_id: str, timeout_s: float = 5.0) -> None:
        """Tells the PS this worker is alive (thread-safe: the worker calls it while it trains).

        Raises:
            StaleSession: the PS dropped this worker, or restarted.
        """
        self._check_open()
        try:
            reply = self._stub.Heartbeat(
                pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id),
                timeout=timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc, f"Heartbeat {self.target}") from exc
        check_version(reply.protocol_version, "HeartbeatReply", sender="PS")


_IS_WORKER_CLIENT: type[WorkerClient] = FederationClient  # mypy checks that the gRPC client satisfies the protocol
