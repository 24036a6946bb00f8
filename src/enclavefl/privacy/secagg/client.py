"""The worker's side of one secure-aggregation round, as a state machine without transport.

Bonawitz et al. 2017 (Practical Secure Aggregation for Privacy-Preserving Machine
Learning), Figure 4, with the k-regular neighbour graph of Bell et al. 2020. The
worker's masked input is

    y_u = x_u + PRG(b_u) + sum_{v in N(u)} +-PRG(s_uv)   (mod 2**32)

where b_u is a fresh self-mask seed and s_uv the seed agreed with neighbour v
(+ when u sorts before v, - otherwise, so the pair cancels in the sum). b_u and
the mask private key are Shamir-shared among the neighbours and the worker itself
(k + 1 holders, as Bell et al. do, so a survivor's own share counts). The honest-worker
rules that keep the PS from unmasking one input live here: the roster must carry
this worker's own keys unchanged and only signed keys; every share is
authenticated; and the unmask question is answered once, never revealing both
the seed share and the key share of the same worker, and never for fewer
survivors than the threshold.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import final

import numpy as np

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.graph import neighbours_of
from enclavefl.privacy.secagg.keys import KeyPair, agree, open_sealed, seal
from enclavefl.privacy.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    Roster,
    RoundTag,
    ShareCiphertext,
    UnmaskReply,
    UnmaskRequest,
    advert_payload,
)
from enclavefl.privacy.secagg.params import MIN_PARTICIPANTS, SecAggParams, Signer, Verifier, graph_seed
from enclavefl.privacy.secagg.prg import add_masks
from enclavefl.privacy.secagg.shamir import SHARE_VALUE_BYTES, Share, split_secret

__all__ = ["SecAggClient", "share_associated_data"]

SHARE_PURPOSE = b"share-encryption"
MASK_PURPOSE = b"pairwise-mask"


class _Stage(enum.Enum):
    NEW = "new"                # nothing sent
    ADVERTISED = "advertised"  # keys sent, waiting for the roster
    SHARED = "shared"          # shares sent, waiting for the neighbours' shares
    UPLOADED = "uploaded"      # masked input sent, waiting for the unmask request
    DONE = "done"              # unmask answered: nothing more this round
    FAILED = "failed"          # refused something: the worker leaves the round


def share_associated_data(tag: RoundTag, sender: str, recipient: str) -> bytes:
    """What a share ciphertext is bound to: the round attempt, its sender and its recipient."""
    s, r = sender.encode(), recipient.encode()
    return b"share|" + tag.encode() + len(s).to_bytes(2, "big") + s + len(r).to_bytes(2, "big") + r


@final
class SecAggClient:
    """One worker in one round attempt; call the stage methods in order, each once.

    Any refusal (:class:`ProtocolError`) moves the client to a failed state: it
    answers nothing more in this attempt, so a PS cannot retry a refused question.
    """

    def __init__(self, worker_id: str, tag: RoundTag, params: SecAggParams, signer: Signer, verifier: Verifier) -> None:
        self._id = worker_id
        self._tag = tag
        self._params = params
        self._signer = signer
        self._verifier = verifier
        self._stage = _Stage.NEW
        self._enc = KeyPair.generate()
        self._mask = KeyPair.generate()
        self._seed = os.urandom(32)
        self._adverts: dict[str, KeyAdvert] = {}
        self._positions: dict[str, int] = {}
        self._neighbours: tuple[str, ...] = ()
        self._threshold = 0
        self._held: dict[str, tuple[Share, Share]] = {}  # owner -> (seed share, key share) held for it
        self._share_keys: dict[str, bytes] = {}

    @property
    def worker_id(self) -> str:
        """This worker's id."""
        return self._id

    def _enter(self, expected: _Stage, then: _Stage, what: str) -> None:
        if self._stage is not expected:
            found, self._stage = self._stage, _Stage.FAILED
            raise ProtocolError(f"worker {self._id} round {self._tag.round}: asked to {what} in stage "
                                f"{found.value}, expected {expected.value}")
        self._stage = then

    def _refuse(self, message: str) -> ProtocolError:
        self._stage = _Stage.FAILED
        return ProtocolError(f"worker {self._id} round {self._tag.round}: {message}")

    def advertise(self) -> KeyAdvert:
        """Stage 1: this worker's two public keys, signed."""
        self._enter(_Stage.NEW, _Stage.ADVERTISED, "advertise")
        payload = advert_payload(self._tag, self._id, self._enc.public, self._mask.public)
        return KeyAdvert(self._id, self._enc.public, self._mask.public, self._signer(payload))

    def share(self, roster: Roster) -> list[ShareCiphertext]:
        """Stage 2: checks the roster and seals shares of the seed and mask key for each neighbour.

        Raises:
            ProtocolError: another round's roster, a missing or altered own advert, a repeated
                sender, a bad signature, or too few workers.
        """
        self._enter(_Stage.ADVERTISED, _Stage.SHARED, "share")
        if roster.tag != self._tag:
            raise self._refuse(f"roster is for round {roster.tag.round} with another nonce")
        adverts = {a.sender: a for a in roster.adverts}
        if len(adverts) != len(roster.adverts):
            raise self._refuse("roster repeats a worker")
        own = adverts.get(self._id)
        if own is None or (own.enc_public, own.mask_public) != (self._enc.public, self._mask.public):
            raise self._refuse("roster does not carry this worker's own keys unchanged")
        if len(adverts) < MIN_PARTICIPANTS:
            raise self._refuse(f"{len(adverts)} workers in the roster, at least {MIN_PARTICIPANTS} needed")
        ids = sorted(adverts)
        k = self._params.degree(len(ids))
        try:
            self._threshold = self._params.threshold_count(k + 1)  # the k neighbours and this worker hold shares
        except ValueError as exc:
            raise self._refuse(str(exc)) from exc
        neighbours = neighbours_of(ids, k, graph_seed(self._tag, roster.adverts), self._id)
        # Only the neighbours' keys are ever used (Bell et al.: O(log n) checks, not n); a key of
        # anyone else changes only the graph seed, which every worker computes from the same roster.
        for v in neighbours:
            advert = adverts[v]
            if not self._verifier(advert.sender, advert.signed_payload(self._tag), advert.signature):
                raise self._refuse(f"advertised keys of {advert.sender} are not signed by its attested key")
        self._adverts = adverts
        self._positions = {u: i + 1 for i, u in enumerate(ids)}
        self._neighbours = neighbours
        xs = [self._positions[v] for v in self._neighbours] + [self._positions[self._id]]
        seed_shares = split_secret(self._seed, self._threshold, xs)
        key_shares = split_secret(self._mask.private, self._threshold, xs)
        self._held[self._id] = (seed_shares[-1], key_shares[-1])  # its own share is never sent
        out = []
        for v, b, s in zip(self._neighbours, seed_shares[:-1], key_shares[:-1], strict=True):
            key = self._share_key(v)
            sealed = seal(key, b.value_bytes() + s.value_bytes(), share_associated_data(self._tag, self._id, v))
            out.append(ShareCiphertext(self._id, v, sealed))
        return out

    def upload(self, inbox: Sequence[ShareCiphertext], update: np.ndarray, weight: int) -> MaskedInput:
        """Stage 3: opens the neighbours' shares and masks the quantized, weighted update.

        Args:
            inbox: the shares the PS relayed to this worker (one per neighbour that shared).
            update: the flat float update (already clipped by the worker pipeline if DP is on).
            weight: the worker's integer weight (num_samples), capped here at ``weight_cap``.

        Raises:
            ProtocolError: a share not for this worker, from a non-neighbour, repeated, or
                failing its authentication tag; or fewer shares than the threshold.
        """
        self._enter(_Stage.SHARED, _Stage.UPLOADED, "upload")
        me = self._positions[self._id]
        for packet in inbox:
            if packet.recipient != self._id or packet.sender not in self._neighbours:
                raise self._refuse(f"share from {packet.sender} to {packet.recipient} is not for this worker")
            if packet.sender in self._held:  # includes this worker's own id
                raise self._refuse(f"second share from {packet.sender}")
            key = self._share_key(packet.sender)
            try:
                plain = open_sealed(key, packet.sealed, share_associated_data(self._tag, packet.sender, self._id))
            except ProtocolError as exc:
                raise self._refuse(f"share from {packet.sender} refused: {exc}") from exc
            if len(plain) != 2 * SHARE_VALUE_BYTES:
                raise self._refuse(f"share from {packet.sender} has {len(plain)} bytes")
            self._held[packet.sender] = (
                Share.from_value_bytes(me, plain[:SHARE_VALUE_BYTES]),
                Share.from_value_bytes(me, plain[SHARE_VALUE_BYTES:]),
            )
        if len(self._held) < self._threshold:
            raise self._refuse(f"{len(self._held) - 1} neighbours shared, threshold is {self._threshold} holders")
        grid = self._params.fixed_point()
        capped = max(1, min(int(weight), self._params.weight_cap))
        vector = grid.encode(update, capped, np.random.default_rng(int.from_bytes(os.urandom(16), "big")))
        # The self-mask, and +-PRG(s_uv) for each neighbour that shared (the PS removes exactly these pairs).
        masks = [(self._seed, 1)] + [(self.pairwise_seed(v), 1 if self._id < v else -1)
                                     for v in self._held if v != self._id]
        add_masks(vector, masks)
        return MaskedInput(self._id, vector)

    def pairwise_seed(self, peer: str) -> bytes:
        """The mask seed this worker shares with ``peer`` (after :meth:`share`)."""
        return agree(self._mask.key or self._mask.private, self._adverts[peer].mask_public, MASK_PURPOSE,
                     self._tag.encode())

    def _share_key(self, peer: str) -> bytes:
        """The AES key of the shares exchanged with ``peer`` (one agreement per peer and round)."""
        key = self._share_keys.get(peer)
        if key is None:
            key = agree(self._enc.key or self._enc.private, self._adverts[peer].enc_public, SHARE_PURPOSE,
                        self._tag.encode())
            self._share_keys[peer] = key
        return key

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 4: answers the PS's only unmask question of the round.

        Raises:
            ProtocolError: a second question, another round's, a worker named both survivor
                and dropped, this worker named dropped, an unknown worker, or fewer survivors
                than the threshold.
        """
        self._enter(_Stage.UPLOADED, _Stage.DONE, "unmask")
        if request.tag != self._tag:
            raise self._refuse(f"unmask request is for round {request.tag.round} with another nonce")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise self._refuse(f"the PS asked for both the seed and the key shares of {sorted(both)}: refused")
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise self._refuse("unmask request repeats a worker")
        if self._id not in survivors:
            raise self._refuse("unmask request does not count this worker as a survivor")
        unknown = (survivors | dropped) - self._adverts.keys()
        if unknown:
            raise self._refuse(f"unmask request names workers outside the roster: {sorted(unknown)}")
        if len(survivors) < self._threshold:
            raise self._refuse(f"{len(survivors)} survivors, threshold is {self._threshold}: nothing is revealed")
        seed_shares = {u: self._held[u][0].value_bytes() for u in survivors if u in self._held}
        key_shares = {u: self._held[u][1].value_bytes() for u in dropped if u in self._held}
        return UnmaskReply(self._id, seed_shares, key_shares)
