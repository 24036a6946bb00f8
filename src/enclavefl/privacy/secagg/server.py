"""The PS's side of one secure-aggregation round, as a state machine without transport.

Bonawitz et al. 2017, Figure 4 (server side), with the neighbour graph of Bell et
al. 2020. The PS checks and relays, folds masked inputs into one running sum
modulo 2**32 (memory O(model), whatever the number of workers), and at the end
removes the masks: for each survivor u it rebuilds the self-mask seed b_u from t
shares and subtracts PRG(b_u); for each worker that shared but did not upload it
rebuilds the mask private key and removes the pairwise masks its surviving
neighbours added. Below the threshold it raises :class:`RoundError` before
asking anything, so nothing is unmasked and the round can be retried cleanly.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import final

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclavefl.errors import ProtocolError, RoundError
from enclavefl.privacy.secagg.client import MASK_PURPOSE
from enclavefl.privacy.secagg.graph import neighbour_graph
from enclavefl.privacy.secagg.keys import KEY_BYTES, agree
from enclavefl.privacy.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    Roster,
    RoundTag,
    ShareCiphertext,
    UnmaskReply,
    UnmaskRequest,
)
from enclavefl.privacy.secagg.params import MIN_PARTICIPANTS, SecAggParams, Verifier, graph_seed
from enclavefl.privacy.secagg.prg import add_masks
from enclavefl.privacy.secagg.shamir import SHARE_VALUE_BYTES, Share, combine_shares

__all__ = ["SEALED_SHARE_BYTES", "SecAggResult", "SecAggServer"]

_Pick = Callable[[UnmaskReply], Mapping[str, bytes]]

SEALED_SHARE_BYTES = 12 + 2 * SHARE_VALUE_BYTES + 16
"""A share ciphertext: GCM nonce, the two 33-byte share values, the 16-byte tag."""


class _Stage(enum.Enum):
    ADVERTISE = "advertise"  # collecting signed keys
    SHARE = "share"          # roster out, collecting sealed shares
    UPLOAD = "upload"        # inboxes out, folding masked inputs
    UNMASK = "unmask"        # request out, collecting shares of secrets
    DONE = "done"            # result computed (or the attempt failed)


@dataclass(frozen=True, slots=True)
class SecAggResult:
    """What the PS learns: the weighted sum of the survivors' inputs and their total weight."""

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[str, ...]

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean of the survivors' (clipped, quantized) inputs, float64."""
        return self.weighted_sum / self.total_weight


@final
class SecAggServer:
    """One round attempt on the PS. Refused messages raise :class:`ProtocolError` and change nothing.

    Args:
        tag: the attempt's round tag (a fresh nonce per attempt).
        params: the round's public parameters.
        participants: the workers sampled for this round; nobody else is heard.
        verifier: checks an advert's signature against the key bound to the worker at join.
        length: the number of update values (the weight word comes on top).
    """

    def __init__(self, tag: RoundTag, params: SecAggParams, participants: Collection[str], verifier: Verifier,
                 length: int) -> None:
        self._tag = tag
        self._params = params
        self._participants = frozenset(participants)
        self._verifier = verifier
        self._length = length + 1
        self._stage = _Stage.ADVERTISE
        self._adverts: dict[str, KeyAdvert] = {}
        self._neighbours: Mapping[str, tuple[str, ...]] = {}
        self._positions: dict[str, int] = {}
        self._threshold = 0
        self._shares: dict[str, dict[str, ShareCiphertext]] = {}  # sender -> recipient -> ciphertext
        self._sum = np.zeros(self._length, dtype=np.uint32)
        self._uploaded: set[str] = set()
        self._request: UnmaskRequest | None = None
        self._replies: dict[str, UnmaskReply] = {}

    @property
    def tag(self) -> RoundTag:
        """The attempt this server state belongs to."""
        return self._tag

    @property
    def threshold(self) -> int:
        """t, once the roster is out (0 before)."""
        return self._threshold

    def _expect(self, stage: _Stage, sender: str, what: str) -> None:
        if sender not in self._participants:
            raise ProtocolError(f"round {self._tag.round}: {what} from {sender}, which is not a participant")
        if self._stage is not stage:
            raise ProtocolError(f"round {self._tag.round}: {what} from {sender} in stage {self._stage.value}, "
                                f"expected {stage.value}")

    def receive_advert(self, advert: KeyAdvert) -> None:
        """Stage 1: accepts one worker's signed keys.

        Raises:
            ProtocolError: wrong stage, not a participant, a second advert, malformed keys, or a
                signature that the worker's attested key did not make (forged, or replayed from
                another round or worker).
        """
        self._expect(_Stage.ADVERTISE, advert.sender, "keys")
        if advert.sender in self._adverts:
            raise ProtocolError(f"round {self._tag.round}: second key advert from {advert.sender}")
        if len(advert.enc_public) != KEY_BYTES or len(advert.mask_public) != KEY_BYTES:
            raise ProtocolError(f"round {self._tag.round}: keys of {advert.sender} are not {KEY_BYTES}-byte X25519 keys")
        if not self._verifier(advert.sender, advert.signed_payload(self._tag), advert.signature):
            raise ProtocolError(f"round {self._tag.round}: key advert of {advert.sender} is not signed by its "
                                "attested key (forged or replayed)")
        self._adverts[advert.sender] = advert

    def roster(self) -> Roster:
        """Closes stage 1: the accepted adverts, and the graph every participant will rebuild.

        Raises:
            RoundError: fewer than 3 workers, or a graph whose threshold cannot be met.
        """
        if self._stage is not _Stage.ADVERTISE:
            raise ProtocolError(f"round {self._tag.round}: roster asked in stage {self._stage.value}")
        n = len(self._adverts)
        if n < MIN_PARTICIPANTS:
            self._stage = _Stage.DONE
            raise RoundError(f"round {self._tag.round}: {n} workers advertised keys, secure aggregation needs "
                             f"at least {MIN_PARTICIPANTS}")
        ids = sorted(self._adverts)
        k = self._params.degree(n)
        try:
            self._threshold = self._params.threshold_count(k + 1)  # k neighbours and the owner hold shares
        except ValueError as exc:
            self._stage = _Stage.DONE
            raise RoundError(f"round {self._tag.round}: {exc}") from exc
        adverts = tuple(self._adverts[u] for u in ids)
        self._neighbours = neighbour_graph(ids, k, graph_seed(self._tag, adverts))
        self._positions = {u: i + 1 for i, u in enumerate(ids)}
        self._stage = _Stage.SHARE
        return Roster(self._tag, adverts)

    def neighbours(self, worker: str) -> tuple[str, ...]:
        """A worker's share holders (after :meth:`roster`)."""
        return self._neighbours[worker]

    def receive_shares(self, sender: str, packets: Sequence[ShareCiphertext]) -> None:
        """Stage 2: accepts one worker's sealed shares, exactly one per neighbour.

        Raises:
            ProtocolError: wrong stage, a sender not in the roster, a second bundle, or a bundle
                that does not address each neighbour once with a well-sized ciphertext.
        """
        self._expect(_Stage.SHARE, sender, "shares")
        if sender not in self._adverts:
            raise ProtocolError(f"round {self._tag.round}: shares from {sender}, which advertised no keys")
        if sender in self._shares:
            raise ProtocolError(f"round {self._tag.round}: second share bundle from {sender}")
        by_recipient = {p.recipient: p for p in packets}
        if any(p.sender != sender for p in packets):
            raise ProtocolError(f"round {self._tag.round}: {sender} sent shares under another sender's name")
        if len(by_recipient) != len(packets) or set(by_recipient) != set(self._neighbours[sender]):
            raise ProtocolError(f"round {self._tag.round}: {sender} must send one share to each of its "
                                f"{len(self._neighbours[sender])} neighbours, got {len(packets)}")
        bad = [p.recipient for p in packets if len(p.sealed) != SEALED_SHARE_BYTES]
        if bad:
            raise ProtocolError(f"round {self._tag.round}: shares of {sender} for {bad} are not "
                                f"{SEALED_SHARE_BYTES} bytes")
        self._shares[sender] = by_recipient

    def inboxes(self) -> dict[str, list[ShareCiphertext]]:
        """Closes stage 2: for each worker that shared, the ciphertexts its neighbours sent it.

        Raises:
            RoundError: fewer workers shared than the threshold or ``min_share_ratio`` needs.
        """
        if self._stage is not _Stage.SHARE:
            raise ProtocolError(f"round {self._tag.round}: inboxes asked in stage {self._stage.value}")
        shared = sorted(self._shares)
        needed = max(self._threshold, math.ceil(self._params.min_share_ratio * len(self._adverts)))
        if len(shared) < needed:
            self._stage = _Stage.DONE
            raise RoundError(f"round {self._tag.round}: {len(shared)} of {len(self._adverts)} workers shared keys, "
                             f"{needed} needed")
        self._stage = _Stage.UPLOAD
        return {v: [self._shares[u][v] for u in self._neighbours[v] if u in self._shares] for v in shared}

    def receive_masked(self, masked: MaskedInput) -> None:
        """Stage 3: folds one masked input into the running sum (mod 2**32).

        Raises:
            ProtocolError: wrong stage, a worker that did not share, a second upload, or a
                vector that is not ``length + 1`` uint32 words.
        """
        self._expect(_Stage.UPLOAD, masked.sender, "masked input")
        if masked.sender not in self._shares:
            raise ProtocolError(f"round {self._tag.round}: masked input from {masked.sender}, which shared no keys")
        if masked.sender in self._uploaded:
            raise ProtocolError(f"round {self._tag.round}: second masked input from {masked.sender}")
        vector = masked.vector
        if vector.dtype != np.uint32 or vector.shape != (self._length,):
            raise ProtocolError(f"round {self._tag.round}: masked input of {masked.sender} must be "
                                f"{self._length} uint32 words, got {vector.dtype} {vector.shape}")
        self._sum += vector  # uint32 arithmetic wraps: addition in Z_{2^32}
        self._uploaded.add(masked.sender)

    def adopt_uploads(self, survivors: Collection[str], total: np.ndarray) -> None:
        """Stage 3 for drivers that fold uploads themselves: the survivors and their running sum.

        The PS's round folds masked vectors as they stream in (one transition with its
        record); this hands that sum over in place of :meth:`receive_masked` calls.

        Raises:
            ProtocolError: wrong stage, uploads already received, a survivor that did not
                share keys, or a sum that is not ``length + 1`` uint32 words.
        """
        if self._stage is not _Stage.UPLOAD or self._uploaded:
            raise ProtocolError(f"round {self._tag.round}: uploads adopted in stage {self._stage.value}")
        strangers = set(survivors) - set(self._shares)
        if strangers:
            raise ProtocolError(f"round {self._tag.round}: uploads from {sorted(strangers)}, which shared no keys")
        if total.dtype != np.uint32 or total.shape != (self._length,):
            raise ProtocolError(f"round {self._tag.round}: the masked sum must be {self._length} uint32 words, "
                                f"got {total.dtype} {total.shape}")
        self._sum = total.copy()
        self._uploaded = set(survivors)

    @property
    def shared(self) -> frozenset[str]:
        """The workers whose share bundles were accepted (stage 2)."""
        return frozenset(self._shares)

    @property
    def length(self) -> int:
        """Words of a masked input: the update's values and the weight."""
        return self._length

    def unmask_request(self) -> UnmaskRequest:
        """Closes stage 3: the one unmask question, naming survivors and dropped workers.

        Raises:
            RoundError: fewer survivors than the threshold; nothing is asked, nothing unmasked.
        """
        if self._stage is not _Stage.UPLOAD:
            raise ProtocolError(f"round {self._tag.round}: unmask request asked in stage {self._stage.value}")
        survivors = tuple(sorted(self._uploaded))
        if len(survivors) < self._threshold:
            self._stage = _Stage.DONE
            raise RoundError(f"round {self._tag.round}: {len(survivors)} workers uploaded, threshold is "
                             f"{self._threshold}: no mask is removed")
        dropped = tuple(sorted(set(self._shares) - self._uploaded))
        self._request = UnmaskRequest(self._tag, survivors, dropped)
        self._stage = _Stage.UNMASK
        return self._request

    def receive_unmask(self, reply: UnmaskReply) -> None:
        """Stage 4: accepts one survivor's shares of secrets.

        Raises:
            ProtocolError: wrong stage, not a survivor, a second reply, or shares of workers the
                request did not ask about (or of the wrong kind), or malformed share values.
        """
        self._expect(_Stage.UNMASK, reply.sender, "unmask reply")
        request = self._request
        if request is None or reply.sender not in request.survivors:
            raise ProtocolError(f"round {self._tag.round}: unmask reply from {reply.sender}, which is no survivor")
        if reply.sender in self._replies:
            raise ProtocolError(f"round {self._tag.round}: second unmask reply from {reply.sender}")
        if not set(reply.seed_shares) <= set(request.survivors) or not set(reply.key_shares) <= set(request.dropped):
            raise ProtocolError(f"round {self._tag.round}: {reply.sender} revealed shares the request did not ask for")
        holders_of = {*self._neighbours[reply.sender], reply.sender}
        if not (set(reply.seed_shares) | set(reply.key_shares)) <= holders_of:
            raise ProtocolError(f"round {self._tag.round}: {reply.sender} sent shares of workers it holds none of")
        if any(len(v) != SHARE_VALUE_BYTES for v in (*reply.seed_shares.values(), *reply.key_shares.values())):
            raise ProtocolError(f"round {self._tag.round}: share values of {reply.sender} are not "
                                f"{SHARE_VALUE_BYTES} bytes")
        self._replies[reply.sender] = reply

    def finish(self) -> SecAggResult:
        """Removes the masks and decodes: the survivors' weighted sum and total weight.

        Raises:
            RoundError: some secret has fewer than t shares, or a rebuilt key does not match
                its advert (a corrupt share); the sum stays masked.
        """
        request = self._request
        if self._stage is not _Stage.UNMASK or request is None:
            raise ProtocolError(f"round {self._tag.round}: finish asked in stage {self._stage.value}")
        self._stage = _Stage.DONE
        total = self._sum
        masks: list[tuple[bytes, int]] = []
        for u in request.survivors:
            masks.append((self._rebuild(u, lambda reply: reply.seed_shares), -1))
        for u in request.dropped:
            private = self._rebuild(u, lambda reply: reply.key_shares)
            public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if public != self._adverts[u].mask_public:
                raise RoundError(f"round {self._tag.round}: the mask key rebuilt for {u} does not match its advert")
            for v in self._neighbours[u]:
                if v not in self._uploaded:
                    continue
                # v added +PRG(s_uv) if v < u, else -PRG(s_uv); X25519 is symmetric.
                seed = agree(private, self._adverts[v].mask_public, MASK_PURPOSE, self._tag.encode())
                masks.append((seed, -1 if v < u else 1))
        add_masks(total, masks)
        weighted_sum, weight = self._params.fixed_point().decode_sum(total)
        return SecAggResult(weighted_sum, weight, request.survivors)

    def _rebuild(self, owner: str, pick: _Pick) -> bytes:
        shares = [
            Share.from_value_bytes(self._positions[holder], pick(reply)[owner])
            for holder, reply in sorted(self._replies.items())
            if owner in pick(reply)
        ]
        if len(shares) < self._threshold:
            raise RoundError(f"round {self._tag.round}: {len(shares)} shares of {owner}'s secret came back, "
                             f"threshold is {self._threshold}: the sum stays masked")
        try:
            return combine_shares(shares, self._threshold)
        except ProtocolError as exc:
            raise RoundError(f"round {self._tag.round}: cannot rebuild {owner}'s secret: {exc}") from exc
