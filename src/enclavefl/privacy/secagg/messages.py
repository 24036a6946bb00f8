"""The messages of one secure-aggregation round, as plain values (no transport).

Stages (Bonawitz et al. 2017, with the neighbour graph of Bell et al. 2020):

1. advertise: each worker sends a :class:`KeyAdvert`, signed with its attested key;
2. share: the PS broadcasts the :class:`Roster`; each worker sends one
   :class:`ShareCiphertext` per neighbour (its seed and mask-key shares, sealed);
   the PS forwards each neighbour's ciphertexts to it;
3. masked upload: each worker sends a :class:`MaskedInput`;
4. unmask: the PS sends one :class:`UnmaskRequest` naming survivors and dropped
   workers; each survivor answers with an :class:`UnmaskReply`.

Every message is bound to a :class:`RoundTag` (round number plus a fresh nonce of
the attempt), so nothing is valid in another round or in a retry of this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "KeyAdvert",
    "MaskedInput",
    "Roster",
    "RoundTag",
    "ShareCiphertext",
    "UnmaskReply",
    "UnmaskRequest",
    "advert_payload",
]

@dataclass(frozen=True, slots=True)
class RoundTag:
    """Which round attempt a message belongs to: the round number and the attempt's random nonce."""

    round: int
    nonce: bytes

    def encode(self) -> bytes:
        """A canonical byte form, bound into signatures, key derivations and associated data."""
        return b"enclavefl-secagg-v1|" + self.round.to_bytes(8, "big") + b"|" + self.nonce


@dataclass(frozen=True, slots=True)
class KeyAdvert:
    """A worker's two public keys for the round, signed with the key its certificate binds."""

    sender: str
    enc_public: bytes
    mask_public: bytes
    signature: bytes

    def signed_payload(self, tag: RoundTag) -> bytes:
        """What the signature covers: the round tag, the sender and both keys."""
        return advert_payload(tag, self.sender, self.enc_public, self.mask_public)


def advert_payload(tag: RoundTag, sender: str, enc_public: bytes, mask_public: bytes) -> bytes:
    """The bytes a worker signs to advertise its keys."""
    name = sender.encode()
    return b"advertise|" + tag.encode() + b"|" + len(name).to_bytes(2, "big") + name + enc_public + mask_public


@dataclass(frozen=True, slots=True)
class Roster:
    """The advertised keys the PS accepted, which every worker checks and builds the graph from."""

    tag: RoundTag
    adverts: tuple[KeyAdvert, ...]


@dataclass(frozen=True, slots=True)
class ShareCiphertext:
    """One worker's shares for one neighbour, sealed under their pairwise key."""

    sender: str
    recipient: str
    sealed: bytes


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """A worker's masked, quantized, weighted update (uint32 words, the weight last)."""

    sender: str
    vector: np.ndarray = field(compare=False)


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """The PS's one question per round: whose self-mask seeds and whose mask keys to reveal."""

    tag: RoundTag
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnmaskReply:
    """A survivor's shares: of the seed of each surviving neighbour, of the mask key of each dropped one."""

    sender: str
    seed_shares: Mapping[str, bytes]
    key_shares: Mapping[str, bytes]
