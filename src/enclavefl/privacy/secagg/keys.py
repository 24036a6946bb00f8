"""Key agreement and authenticated encryption for secure aggregation.

Each worker makes two X25519 key pairs per round attempt: one to agree on the
keys that encrypt the Shamir shares it sends through the PS (AES-256-GCM, so the
PS relays ciphertext it can neither read nor alter), and one to agree on the
pairwise mask seeds. X25519 outputs go through HKDF-SHA256 with a purpose label
and the round tag, so a key never serves two purposes or two rounds. The
associated data of every ciphertext names the round tag, the sender and the
recipient: a ciphertext replayed from another round, or re-addressed from
another sender, fails its tag check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclavefl.errors import ProtocolError

__all__ = ["KEY_BYTES", "KeyPair", "agree", "open_sealed", "seal"]

KEY_BYTES = 32
_NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True, slots=True, repr=False)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings (the private half is what gets Shamir-shared)."""

    private: bytes
    public: bytes

    key: X25519PrivateKey | None = field(default=None, compare=False)
    """The loaded private key (agreements with it skip parsing the raw bytes)."""

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS's randomness."""
        key = X25519PrivateKey.generate()
        private = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return cls(private, key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw), key)

    def __repr__(self) -> str:  # never print the private half
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer_public), info=purpose|context).

    ``private`` may be the raw 32 bytes or the loaded key (cheaper when used many times).

    Raises:
        ProtocolError: the peer's public key is malformed or of small order (the shared
            secret would be all zeros, which an attacker could predict).
    """
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        key = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography refuses an all-zero result
        raise ProtocolError(f"unusable X25519 public key {peer_public.hex()[:16]}...: {exc}") from exc
    info = purpose + b"|" + context
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce followed by the ciphertext and its 16-byte tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Decrypts what :func:`seal` made, checking the tag over the ciphertext and ``associated``.

    Raises:
        ProtocolError: too short, or the tag does not verify (forged, altered, or bound to
            another round, sender or recipient).
    """
    if len(sealed) < _NONCE_BYTES + 16:
        raise ProtocolError(f"a sealed message is at least {_NONCE_BYTES + 16} bytes, got {len(sealed)}")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise ProtocolError("authentication tag mismatch: forged, altered or replayed ciphertext") from exc
