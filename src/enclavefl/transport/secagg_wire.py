"""The SecAggExchange envelopes: protobuf <-> the stage call types, with every count and length checked.

Everything here is read from a peer: ids, nonces, keys, signatures,
certificates and sealed shares are checked against fixed sizes or limits before
they reach the protocol code, and counts are bounded by :data:`MAX_PEERS`.
The PS's limits (:func:`call_from_proto`) and the worker's
(:func:`answer_from_proto`) are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Final

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.messages import KeyAdvert, RoundTag, ShareCiphertext, UnmaskReply, UnmaskRequest
from enclavefl.privacy.secagg.stages import STAGES, SecAggAnswer, SecAggCall
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb

__all__ = ["MAX_PEERS", "answer_from_proto", "answer_to_proto", "call_from_proto", "call_to_proto"]

MAX_PEERS: Final = 1024
"""Workers one message may name (job.workers is at most 1024)."""
MAX_ID_BYTES: Final = 128
MAX_CERT_BYTES: Final = 128 * 1024
"""As the attested join allows (an RA-TLS certificate carries its quote)."""
MAX_SIGNATURE_BYTES: Final = 256
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 16
SEALED_SHARE_BYTES: Final = 12 + 2 * 33 + 16
SHARE_VALUE_BYTES: Final = 33


def _id(value: str, what: str) -> str:
    if not value or len(value.encode()) > MAX_ID_BYTES:
        raise ProtocolError(f"SecAggExchange: {what} must be 1..{MAX_ID_BYTES} bytes, got {len(value.encode())}")
    return value


def _count(items: Sized, what: str) -> None:
    n = len(items)
    if n > MAX_PEERS:
        raise ProtocolError(f"SecAggExchange: {n} {what}, at most {MAX_PEERS}")


def _advert_from_proto(a: pb.SecAggAdvert, *, certificate_required: bool) -> tuple[KeyAdvert, bytes]:
    """An advert and its certificate; in a roster the certificate may be absent (b"") for a non-neighbour."""
    if len(a.enc_public) != KEY_BYTES or len(a.mask_public) != KEY_BYTES:
        raise ProtocolError(f"SecAggExchange: advertised keys are {KEY_BYTES} bytes, got "
                            f"{len(a.enc_public)} and {len(a.mask_public)}")
    least = 1 if certificate_required else 0
    if not 0 < len(a.signature) <= MAX_SIGNATURE_BYTES or not least <= len(a.certificate) <= MAX_CERT_BYTES:
        raise ProtocolError(f"SecAggExchange: a signature of 1..{MAX_SIGNATURE_BYTES} bytes and a certificate of "
                            f"{least}..{MAX_CERT_BYTES} bytes, got {len(a.signature)} and {len(a.certificate)}")
    return KeyAdvert(_id(a.sender, "advert sender"), bytes(a.enc_public), bytes(a.mask_public),
                     bytes(a.signature)), bytes(a.certificate)


def _advert_to_proto(advert: KeyAdvert, certificate: bytes) -> pb.SecAggAdvert:
    return pb.SecAggAdvert(sender=advert.sender, enc_public=advert.enc_public, mask_public=advert.mask_public,
                           signature=advert.signature, certificate=certificate)


def _share_from_proto(s: pb.SecAggShare) -> ShareCiphertext:
    if len(s.sealed) != SEALED_SHARE_BYTES:
        raise ProtocolError(f"SecAggExchange: a sealed share is {SEALED_SHARE_BYTES} bytes, got {len(s.sealed)}")
    return ShareCiphertext(_id(s.sender, "share sender"), _id(s.recipient, "share recipient"), bytes(s.sealed))


def _share_values(entries: Mapping[str, bytes], what: str) -> dict[str, bytes]:
    _count(entries, what)
    out = {}
    for owner, value in entries.items():
        if len(value) != SHARE_VALUE_BYTES:
            raise ProtocolError(f"SecAggExchange: a share value is {SHARE_VALUE_BYTES} bytes, got {len(value)}")
        out[_id(owner, "share owner")] = bytes(value)
    return out


def call_from_proto(request: pb.SecAggRequest) -> SecAggCall:
    """The stage call a worker sent (PS side).

    Raises:
        ProtocolError: an unknown stage, a bad nonce, or a field out of its limits.
    """
    if request.stage not in STAGES:
        raise ProtocolError(f"SecAggExchange: unknown stage {request.stage[:32]!r} (expected one of {', '.join(STAGES)})")
    if len(request.nonce) != NONCE_BYTES:
        raise ProtocolError(f"SecAggExchange: the nonce is {NONCE_BYTES} bytes, got {len(request.nonce)}")
    worker_id = _id(request.worker_id, "worker_id")
    _count(request.shares, "shares")
    advert, certificate = (None, b"")
    if request.HasField("advert") and not request.poll:
        advert, certificate = _advert_from_proto(request.advert, certificate_required=True)
    reply = None
    if request.stage == "unmask" and not request.poll:
        reply = UnmaskReply(worker_id, _share_values(request.seed_shares, "seed shares"),
                            _share_values(request.key_shares, "key shares"))
    max_wait = float(request.max_wait_s)
    return SecAggCall(
        worker_id=worker_id, round=int(request.round), nonce=bytes(request.nonce),
        stage=STAGES[STAGES.index(request.stage)],  # the Literal, checked above
        poll=bool(request.poll), advert=advert, certificate=certificate,
        shares=tuple(_share_from_proto(s) for s in request.shares), reply=reply,
        max_wait_s=max_wait if max_wait == max_wait else 0.0,  # NaN waits not at all
    )


def call_to_proto(call: SecAggCall) -> pb.SecAggRequest:
    """The envelope of a stage call (worker side)."""
    request = pb.SecAggRequest(protocol_version=PROTOCOL_VERSION, worker_id=call.worker_id, round=call.round,
                               nonce=call.nonce, stage=call.stage, poll=call.poll, max_wait_s=call.max_wait_s)
    if call.advert is not None:
        request.advert.CopyFrom(_advert_to_proto(call.advert, call.certificate))
    request.shares.extend(pb.SecAggShare(sender=s.sender, recipient=s.recipient, sealed=s.sealed) for s in call.shares)
    if call.reply is not None:
        request.seed_shares.update(call.reply.seed_shares)
        request.key_shares.update(call.reply.key_shares)
    return request


def answer_to_proto(answer: SecAggAnswer) -> pb.SecAggReply:
    """The envelope of the PS's answer (PS side)."""
    reply = pb.SecAggReply(protocol_version=PROTOCOL_VERSION, ready=answer.status == "ready")
    reply.roster.extend(_advert_to_proto(a, answer.certificates.get(a.sender, b"")) for a in answer.roster)
    reply.inbox.extend(pb.SecAggShare(sender=s.sender, recipient=s.recipient, sealed=s.sealed) for s in answer.inbox)
    if answer.request is not None:
        reply.survivors.extend(answer.request.survivors)
        reply.dropped.extend(answer.request.dropped)
    return reply


def answer_from_proto(reply: pb.SecAggReply, call: SecAggCall) -> SecAggAnswer:
    """The PS's answer to ``call`` (worker side), checked like a request.

    Raises:
        ProtocolError: a field out of its limits.
    """
    if not reply.ready:
        return SecAggAnswer("pending")
    for items, what in ((reply.roster, "roster entries"), (reply.inbox, "shares"), (reply.survivors, "survivors"),
                        (reply.dropped, "dropped workers")):
        _count(items, what)
    roster = [_advert_from_proto(a, certificate_required=False) for a in reply.roster]
    request = None
    if call.stage == "ready":
        request = UnmaskRequest(RoundTag(call.round, call.nonce), tuple(_id(u, "survivor") for u in reply.survivors),
                                tuple(_id(u, "dropped worker") for u in reply.dropped))
    return SecAggAnswer("ready", roster=tuple(a for a, _ in roster), certificates={a.sender: c for a, c in roster if c},
                        inbox=tuple(_share_from_proto(s) for s in reply.inbox), request=request)
