"""The gRPC side of the parameter server: decodes envelopes, calls the handler.

How this works: grpc runs each call on a thread of a bounded pool. Every call
first asks the :class:`Credentials` who the caller is (from its TLS
certificate, or the session token an attested join issued), then hands plain values to the :class:`FederationHandler`. Our
errors become gRPC status codes here; the handler never sees grpc.

Anything a peer can send is parsed by our code, never by grpc's: each request
deserializer turns bytes that are not a valid message into a :class:`_Malformed`
value instead of raising (grpc would log a traceback for every such call, so
any peer could flood the log), and every method is wrapped by a guard that
answers it with INVALID_ARGUMENT. The same guard answers an exception that is
not one of ours with INTERNAL and a generic message (the internal text stays
in the PS log).

Calls without a valid session (Challenge, Join, or a call whose session the
credentials refuse) are limited per connection. Everything a peer can cause
(refusals, malformed requests, internal errors) is logged through one
:class:`~enclavefl.transport.ratelimit.RefusalLog`: a flood of such calls costs
the PS a bounded amount of work per connection and a bounded number of log lines.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
from google.protobuf.message import DecodeError

from enclavefl.errors import (
    ClosedError,
    ConfigError,
    EnclaveFLError,
    ProtocolError,
    RoundError,
    StaleSession,
    TransportError,
    UpdateRejected,
    VerificationError,
    VersionMismatch,
)
from enclavefl.job_digest import differing_settings
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.tensors import StreamHeader, iter_chunks
from enclavefl.transport.credentials import Credentials, JoinProof
from enclavefl.transport.framing import DataChunk, chunk_decoder, chunk_payload, encode_data, encode_message
from enclavefl.messages import FederationHandler, PeerIdentity
from enclavefl.transport.audit import AuditRecord
from enclavefl.transport.ratelimit import RATE_LIMITED, ConnectionLimiter, RefusalLog
from enclavefl.transport.secagg_wire import answer_to_proto, call_from_proto
from enclavefl.transport.wire import (
    MAX_EXTENSIONS_TOTAL_BYTES,
    SETTINGS_MISMATCH,
    check_version,
    header_to_proto,
    task_to_proto,
    update_meta_from_proto,
)

__all__ = ["SERVICE_NAME", "SESSION_METADATA_KEY", "FederationServer", "handler_threads", "message_limit",
           "method_handlers"]

log = logging.getLogger(__name__)

DOWNLOAD_SLOT_TIMEOUT_S = 300.0
"""How long a PullModel waits for one of the ``max_downloads`` streams."""

SERVICE_NAME = "enclavefl.v1.Federation"
"""The gRPC service the PS serves (as the .proto file names it)."""

SESSION_METADATA_KEY = "enclavefl-session"
"""gRPC metadata key carrying the session token of an attested join."""


def message_limit(chunk_bytes: int) -> int:
    """The largest gRPC message either side accepts: one chunk or one update header, plus envelope room.

    An update header may carry up to ``MAX_EXTENSIONS_TOTAL_BYTES`` of
    extensions, so the limit never drops below that even with small chunks.
    """
    return max(chunk_bytes, MAX_EXTENSIONS_TOTAL_BYTES) + 1024 * 1024


def handler_threads(workers: int) -> int:
    """Handler threads for a PS of ``workers`` workers: each may hold a long poll and a heartbeat at once.

    A call holds its thread while it waits, and a secure-aggregation stage answers
    only once every worker posted: with fewer threads than waiting workers the last
    posts queue behind the waits until those time out, seconds per stage.
    """
    return 2 * max(workers, 1) + 16


MAX_DETAILS_CHARS: Final = 400
"""The longest reason a refused peer reads (our messages are short; a hostile name may not be)."""
INTERNAL_DETAILS: Final = "internal error in the PS (its log says more)"
"""What a peer reads when a call failed for a reason that is not its own."""


def _details(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 3] + "..."


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, StaleSession):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, VersionMismatch):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, VerificationError):
        code = grpc.StatusCode.PERMISSION_DENIED
    elif isinstance(exc, ProtocolError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, RoundError | ClosedError | ConfigError):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, EnclaveFLError):
        code = grpc.StatusCode.INTERNAL
    else:
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
    context.abort(code, _details(exc))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class _Malformed:
    """What a request deserializer hands on instead of raising: the bytes were not a ``what``."""

    what: str
    reason: str


def _tolerant(decode: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    """A request deserializer that returns :class:`_Malformed` where ``decode`` raises."""

    def deserialize(raw: bytes) -> Any:
        try:
            return decode(raw)
        except (DecodeError, ProtocolError) as exc:
            return _Malformed(what, str(exc))
        except Exception as exc:  # noqa: BLE001 - the edge: any failure to parse peer bytes is the peer's
            return _Malformed(what, f"undecodable ({type(exc).__name__})")

    return deserialize


def _refuse_malformed(refusals: RefusalLog, context: grpc.ServicerContext, method: str, request: _Malformed) -> NoReturn:
    refusals.refused(context.peer(), "malformed request",
                     f"refused a malformed {method} request from {context.peer()}: {request.reason}")
    _abort(context, ProtocolError(f"{method}: malformed {request.what}"))


def _fail(refusals: RefusalLog, context: grpc.ServicerContext, method: str, exc: Exception) -> NoReturn:
    """Answers an exception that escaped a method: ours mapped to its status, anything else INTERNAL.

    An exception raised by ``context.abort`` (the status is set already) or by a
    broken client stream (``grpc.RpcError``) is grpc's own and goes back to it.
    """
    if context.code() is not None or isinstance(exc, grpc.RpcError):
        raise exc
    if isinstance(exc, EnclaveFLError):
        refusals.refused(context.peer(), f"{method} refused ({type(exc).__name__})",
                         f"refused {method} from {context.peer()}: {_details(exc)}")
        _abort(context, exc)
    refusals.refused(context.peer(), "internal error",
                     f"{method} from {context.peer()} failed: {type(exc).__name__}: {_details(exc)}", level=logging.ERROR)
    log.debug("%s failed", method, exc_info=exc)
    _abort(context, exc)


def _checked_stream(requests: Iterator[Any], method: str) -> Iterator[Any]:
    """The messages of a request stream; a malformed one raises ProtocolError where it arrives."""
    for message in requests:
        if isinstance(message, _Malformed):
            raise ProtocolError(f"{method}: malformed {message.what}: {message.reason}")
        yield message


def _guard_unary(refusals: RefusalLog, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            _refuse_malformed(refusals, context, method, request)
        try:
            return behaviour(request, context)
        except Exception as exc:  # noqa: BLE001 - _fail re-raises grpc's own
            _fail(refusals, context, method, exc)

    return handle


def _guard_response_stream(refusals: RefusalLog, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if isinstance(request, _Malformed):
            _refuse_malformed(refusals, context, method, request)
        try:
            yield from behaviour(request, context)
        except Exception as exc:  # noqa: BLE001 - _fail re-raises grpc's own
            _fail(refusals, context, method, exc)

    return handle


def _guard_request_stream(refusals: RefusalLog, method: str, behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(_checked_stream(requests, method), context)
        except Exception as exc:  # noqa: BLE001 - _fail re-raises grpc's own
            _fail(refusals, context, method, exc)

    return handle


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, handler: FederationHandler, credentials: Credentials, chunk_bytes: int, max_downloads: int,
                 job_settings: Mapping[str, str], limiter: ConnectionLimiter, refusals: RefusalLog) -> None:
        self._handler = handler
        self._credentials = credentials
        self._limiter = limiter
        self.refusals = refusals
        """Rate-limited lines for what any peer can trigger (refused, malformed or failed calls)."""
        self._chunk_bytes = chunk_bytes
        self._job_settings = dict(job_settings)
        # gRPC buffers a chunk or two per open stream; bounding the streams bounds that memory.
        self._download_slots = threading.BoundedSemaphore(max_downloads)

    @staticmethod
    def _cert(context: grpc.ServicerContext) -> bytes | None:
        certs = context.auth_context().get("x509_pem_cert") or [None]
        cert: bytes | None = certs[0]
        return cert

    def _seen(self, context: grpc.ServicerContext) -> None:
        self._credentials.observe_call(context.peer())

    def _check_settings(self, request: pb.JoinRequest) -> None:
        """Refuses a worker whose job settings differ from this PS's (a worker that sends none is let in)."""
        theirs = dict(request.job_settings)
        if not theirs or not self._job_settings:
            return
        differ = differing_settings(self._job_settings, theirs)
        if differ:
            raise ConfigError(f"Join refused: worker {request.worker_name[:64]!r}: {SETTINGS_MISMATCH} from the PS's "
                              f"in {', '.join(differ)}: every node must run the same job file")

    def _unauthenticated(self, context: grpc.ServicerContext, what: str) -> None:
        """Charges a call without a valid session to its connection; refuses it when the connection's bucket is empty."""
        connection = context.peer()
        if not self._limiter.allow(connection):
            reason = (f"{RATE_LIMITED}: too many calls without a valid session on this connection; "
                      f"retry in {self._limiter.retry_after_s:.1f}s")
            self.refusals.refused(connection, RATE_LIMITED, f"refused {what} from {connection}: {reason}")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

    def _refuse(self, context: grpc.ServicerContext, what: str, exc: EnclaveFLError) -> NoReturn:
        """Answers a refused unauthenticated call with its reason, and logs it rate-limited."""
        if isinstance(exc, StaleSession):
            category = "no valid session"
        elif isinstance(exc, VerificationError):
            category = f"{what} refused ({exc.field})"
        else:
            category = f"{what} refused ({type(exc).__name__})"
        self.refusals.refused(context.peer(), category, f"refused {what.lower()} from {context.peer()}: {exc}")
        _abort(context, exc)

    def _peer(self, context: grpc.ServicerContext) -> PeerIdentity:
        self._seen(context)
        session = ""
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_METADATA_KEY and isinstance(value, str):
                session = value
        try:
            return self._credentials.identify_peer(self._cert(context), session, context.peer())
        except EnclaveFLError as exc:
            self._unauthenticated(context, "call")
            self._refuse(context, "call", exc)

    def Challenge(self, request: pb.ChallengeRequest, context: grpc.ServicerContext) -> pb.ChallengeReply:
        self._seen(context)
        self._unauthenticated(context, "Challenge")
        try:
            check_version(request.protocol_version, "Challenge", sender="worker")
            nonce = self._credentials.issue_challenge(context.peer())
        except EnclaveFLError as exc:
            self._refuse(context, "Challenge", exc)
        return pb.ChallengeReply(protocol_version=PROTOCOL_VERSION, nonce=nonce)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self._seen(context)
        self._unauthenticated(context, "Join")
        try:
            check_version(request.protocol_version, "Join", sender="worker")
            self._check_settings(request)
            proof = None
            if request.HasField("attestation"):
                a = request.attestation
                proof = JoinProof(a.certificate, a.nonce, a.ps_cert_sha256, a.signature)
            peer, session = self._credentials.admit(proof, request.worker_name, self._cert(context), context.peer())
            info = self._handler.join(peer, request.worker_name, int(request.num_samples))
        except EnclaveFLError as exc:
            self._refuse(context, "Join", exc)
        return pb.JoinReply(
            protocol_version=PROTOCOL_VERSION,
            worker_id=info.worker_id,
            job_name=info.job_name,
            ps_instance=info.ps_instance,
            rounds=info.rounds,
            session_token=session,
            job_settings=self._job_settings,
            heartbeat_s=info.heartbeat_s,
        )

    def WaitTask(self, request: pb.WaitTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        try:
            check_version(request.protocol_version, "WaitTask", sender="worker")
            wait_s = min(max(float(request.max_wait_s), 0.0), 60.0)
            task = self._handler.wait_task(self._peer(context), request.worker_id, wait_s)
        except EnclaveFLError as exc:
            _abort(context, exc)
        return task_to_proto(task)

    def PullModel(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk | bytes]:
        try:
            check_version(request.protocol_version, "PullModel", sender="worker")
            version, params = self._handler.model_for(self._peer(context), request.worker_id, int(request.model_version))
        except EnclaveFLError as exc:
            _abort(context, exc)
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                protocol_version=PROTOCOL_VERSION,
                model_version=version,
                tensors=header_to_proto(StreamHeader.of(params)),
            )
        )
        if not self._download_slots.acquire(timeout=DOWNLOAD_SLOT_TIMEOUT_S):
            _abort(context, RoundError(f"PullModel: no download slot within {DOWNLOAD_SLOT_TIMEOUT_S:.0f}s"))
        try:
            for chunk in iter_chunks(params, self._chunk_bytes):
                if not context.is_active():
                    return
                yield encode_data(chunk)
        finally:
            self._download_slots.release()

    def PushUpdate(self, request_iterator: Iterator[pb.UpdateChunk | DataChunk], context: grpc.ServicerContext) -> pb.PushReply:
        peer = self._peer(context)
        try:
            first = next(request_iterator)
        except StopIteration:
            _abort(context, ProtocolError("PushUpdate: empty stream"))
        if isinstance(first, DataChunk) or first.WhichOneof("part") != "header":
            _abort(context, ProtocolError("PushUpdate: the first message must be the update header"))
        head = first.header
        try:
            check_version(head.protocol_version, "PushUpdate", sender="worker")
            meta = update_meta_from_proto(head)
            sink = self._handler.open_update(peer, meta)
        except UpdateRejected as exc:
            return pb.PushReply(protocol_version=PROTOCOL_VERSION, accepted=False, reason=str(exc))
        except EnclaveFLError as exc:
            _abort(context, exc)
        try:
            for msg in request_iterator:
                data = chunk_payload(msg)
                if data is None:
                    raise ProtocolError("PushUpdate: a second header inside one update")
                sink.feed(data)
            sink.commit()
        except UpdateRejected as exc:
            sink.abort(str(exc))
            return pb.PushReply(protocol_version=PROTOCOL_VERSION, accepted=False, reason=str(exc))
        except ProtocolError as exc:
            sink.abort(str(exc))
            return pb.PushReply(protocol_version=PROTOCOL_VERSION, accepted=False, reason=str(exc))
        except grpc.RpcError:
            sink.abort("stream broken by the client")
            raise
        except BaseException:
            sink.abort("stream ended abnormally")
            raise
        return pb.PushReply(protocol_version=PROTOCOL_VERSION, accepted=True)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        try:
            check_version(request.protocol_version, "Leave", sender="worker")
            self._handler.leave(self._peer(context), request.worker_id, request.reason[:200])
        except EnclaveFLError as exc:
            _abort(context, exc)
        return pb.LeaveReply(protocol_version=PROTOCOL_VERSION)

    def SecAggExchange(self, request: pb.SecAggRequest, context: grpc.ServicerContext) -> pb.SecAggReply:
        """A secure-aggregation stage call; a refused message is audited as a trust decision."""
        peer = self._peer(context)
        exchange = getattr(self._handler, "secagg_exchange", None)
        try:
            check_version(request.protocol_version, "SecAggExchange", sender="worker")
            call = call_from_proto(request)
            if exchange is None:
                raise ProtocolError("SecAggExchange: this PS runs no secure aggregation")
            answer = exchange(peer, call)
        except ProtocolError as exc:
            self._audit_secagg(peer, request, exc)
            _abort(context, exc)
        except EnclaveFLError as exc:
            _abort(context, exc)
        return answer_to_proto(answer)

    def _audit_secagg(self, peer: PeerIdentity, request: pb.SecAggRequest, exc: ProtocolError) -> None:
        """Records a refused secure-aggregation message (forged, replayed, out of stage) in the audit log."""
        audit = self._credentials.audit_log
        if audit is None:  # plain mTLS keeps no audit log; the refusal log still says it
            return
        stage = request.stage[:16] if request.stage else "?"
        audit.record(AuditRecord(
            node=self._credentials.own_identity().label, role="ps",
            peer=f"worker {request.worker_id[:64]!r} cert {peer.fingerprint[:16]}", decision="refused",
            reason=f"secure aggregation round {request.round} stage {stage}: {_details(exc)}",
            field=f"secagg.{stage}", evidence=peer.evidence if peer.evidence != "none" else "unknown",
            simulated=peer.evidence == "simulated", mr_enclave=peer.measurement,
        ))

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        try:
            check_version(request.protocol_version, "Heartbeat", sender="worker")
            self._handler.heartbeat(self._peer(context), request.worker_id)
        except EnclaveFLError as exc:
            _abort(context, exc)
        return pb.HeartbeatReply(protocol_version=PROTOCOL_VERSION)


def method_handlers(
    handler: FederationHandler,
    credentials: Credentials,
    *,
    chunk_bytes: int,
    max_downloads: int = 8,
    job_settings: Mapping[str, str] | None = None,
    limiter: ConnectionLimiter | None = None,
    refusals: RefusalLog | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """The PS's gRPC method handlers by method name, exactly as :meth:`FederationServer.start` registers them.

    The generated registration, except that requests are parsed tolerantly, every
    method is guarded and tensor chunks use the framing fast path. Public so that
    in-process drivers (the fuzz targets) reach the PS through the same entry a
    peer does.

    Args:
        limiter: the per-connection budget of calls without a valid session;
            None: :class:`~enclavefl.transport.ratelimit.ConnectionLimiter`'s defaults.
        refusals: where refused, malformed and failed calls are logged (rate-limited);
            None: a new :class:`~enclavefl.transport.ratelimit.RefusalLog` on this module's logger.
    """
    servicer = _Servicer(handler, credentials, chunk_bytes, max_downloads, job_settings or {},
                         limiter if limiter is not None else ConnectionLimiter(),
                         refusals if refusals is not None else RefusalLog(log))
    unary: dict[str, tuple[Any, Any]] = {
        "Challenge": (pb.ChallengeRequest, pb.ChallengeReply),
        "Join": (pb.JoinRequest, pb.JoinReply),
        "WaitTask": (pb.WaitTaskRequest, pb.Task),
        "Leave": (pb.LeaveRequest, pb.LeaveReply),
        "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
        "SecAggExchange": (pb.SecAggRequest, pb.SecAggReply),
    }
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            _guard_unary(servicer.refusals, name, getattr(servicer, name)),
            request_deserializer=_tolerant(req.FromString, req.__name__),
            response_serializer=rep.SerializeToString,
        )
        for name, (req, rep) in unary.items()
    }
    handlers["PullModel"] = grpc.unary_stream_rpc_method_handler(
        _guard_response_stream(servicer.refusals, "PullModel", servicer.PullModel),
        request_deserializer=_tolerant(pb.PullRequest.FromString, "PullRequest"),
        response_serializer=encode_message,
    )
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(
        _guard_request_stream(servicer.refusals, "PushUpdate", servicer.PushUpdate),
        request_deserializer=_tolerant(chunk_decoder(pb.UpdateChunk), "UpdateChunk"),
        response_serializer=pb.PushReply.SerializeToString,
    )
    return handlers


def _check_bindable(listen: str) -> None:
    """Binds ``listen`` once with a plain socket, to name why it cannot be used before gRPC tries.

    gRPC reports a failed bind as a generic error (and logs its own line); the
    socket's errno says "in use" or "not an address of this host". Port 0 is
    always bindable.

    Raises:
        TransportError: the address cannot be bound.
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or int(port_text) == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TransportError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            what = "the port is in use (another PS?)" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise TransportError(f"cannot listen on {listen}: {what}") from exc


@dataclass
class FederationServer:
    """A started gRPC server; ``port`` is the one actually bound. Close with stop()."""

    server: Any
    port: int
    credentials: Credentials | None = None
    refusals: RefusalLog | None = None

    @classmethod
    def start(
        cls,
        handler: FederationHandler,
        credentials: Credentials,
        *,
        listen: str,
        chunk_bytes: int,
        max_threads: int = 128,
        max_downloads: int = 8,
        job_settings: Mapping[str, str] | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> FederationServer:
        """Binds ``listen`` with TLS and starts serving.

        Args:
            job_settings: digests of the settings every node must share
                (:func:`enclavefl.job_digest.job_digests`); a worker whose digests
                differ is refused at join. None: no check.
            limiter: the per-connection budget of calls without a valid session;
                None: :class:`~enclavefl.transport.ratelimit.ConnectionLimiter`'s defaults.

        Raises:
            TransportError: the address cannot be bound (in use, or not on this host).
        """
        _check_bindable(listen)
        limit = message_limit(chunk_bytes)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.stream_lookahead_bytes", 4194304),
            ],
            maximum_concurrent_rpcs=max_threads * 4,
        )
        refusals = RefusalLog(log)
        handlers = method_handlers(handler, credentials, chunk_bytes=chunk_bytes, max_downloads=max_downloads,
                                   job_settings=job_settings, limiter=limiter, refusals=refusals)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        try:
            port = server.add_secure_port(listen, credentials.server_credentials())
        except RuntimeError as exc:  # gRPC's words for a failed bind
            raise TransportError(f"cannot listen on {listen}: {exc}") from exc
        if port == 0:
            raise TransportError(f"cannot listen on {listen}")
        server.start()
        return cls(server=server, port=port, credentials=credentials, refusals=refusals)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stops accepting calls, waits up to ``grace_s`` for running ones, stops the credentials' watchers. Idempotent.

        A summary of refused calls not yet logged is logged now.
        """
        self.server.stop(grace_s).wait(grace_s + 1)
        if self.credentials is not None:
            self.credentials.close()
        if self.refusals is not None:
            self.refusals.close()
