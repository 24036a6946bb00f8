"""Key agreement and sealing: both ends derive one key; altered or rebound ciphertext is refused."""

from __future__ import annotations

import pytest

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.keys import KeyPair, agree, open_sealed, seal


def test_both_ends_agree_and_purpose_separates_keys() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    assert agree(a.private, b.public, b"p", b"r1") == agree(b.private, a.public, b"p", b"r1")
    assert agree(a.private, b.public, b"p", b"r1") != agree(a.private, b.public, b"q", b"r1")
    assert agree(a.private, b.public, b"p", b"r1") != agree(a.private, b.public, b"p", b"r2")


def test_sealed_opens_with_the_same_associated_data_only() -> None:
    key = b"k" * 32
    sealed = seal(key, b"share", b"round 1|a->b")
    assert open_sealed(key, sealed, b"round 1|a->b") == b"share"
    with pytest.raises(ProtocolError, match="tag mismatch"):
        open_sealed(key, sealed, b"round 2|a->b")


def test_flipped_bit_is_refused() -> None:
    key = b"k" * 32
    sealed = bytearray(seal(key, b"share", b"ad"))
    sealed[-1] ^= 1
    with pytest.raises(ProtocolError, match="tag mismatch"):
        open_sealed(key, bytes(sealed), b"ad")


def test_small_order_public_key_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unusable X25519"):
        agree(KeyPair.generate().private, bytes(32), b"p", b"r")


def test_repr_hides_the_private_key() -> None:
    pair = KeyPair.generate()
    assert pair.private.hex() not in repr(pair)
