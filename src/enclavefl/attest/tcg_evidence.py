"""TCG DICE "tagged evidence" as Gramine (v1.8+) puts it in RA-TLS certificates.

The X.509 extension ``2.23.133.5.4.9`` holds CBOR (RFC 8949)::

    tag 60000 ( [ bstr quote, bstr claims ] )
    claims = serialized map { "pubkey-hash": bstr(serialized [ hash_alg_id, bstr H(DER SPKI) ]) }

``hash_alg_id`` follows the IANA named-information registry (1 = SHA-256,
7 = SHA-384, 8 = SHA-512). The quote's report_data starts with SHA-256 of the
claims bytes, and the claim names the certificate key: two hops instead of
the legacy extension's one. (Source: gramine tools/sgx/ra-tls/ra_tls_attest.c
and ra_tls_verify_common.c.)

Only the CBOR subset that format needs is implemented: unsigned ints, byte
and text strings, arrays, maps and tags, all definite-length. Every length is
checked against the bytes that are actually there before anything is sliced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from enclavefl.errors import VerificationError

__all__ = [
    "CBOR_TAG_TEE_QUOTE",
    "HASH_ALGORITHMS",
    "PubkeyHash",
    "TaggedEvidence",
    "decode_tagged_evidence",
    "encode_tagged_evidence",
    "pubkey_hash_claims",
]

#: CBOR tag for "ECDSA SGX quotes" in TCG DICE tagged evidence (IANA registry).
CBOR_TAG_TEE_QUOTE: Final = 60000
#: IANA named-information hash ids the verifier accepts, with their hashlib names.
HASH_ALGORITHMS: Final = {1: "sha256", 7: "sha384", 8: "sha512"}
_PUBKEY_HASH: Final = "pubkey-hash"
_MAX_DEPTH = 4
_MAX_ITEMS = 64

# CBOR major types
_UINT, _BSTR, _TSTR, _ARRAY, _MAP, _TAG = 0, 2, 3, 4, 5, 6

_Item = int | bytes | str | list["_Item"] | dict[str, "_Item"] | tuple[int, "_Item"]


def _refuse(detail: str) -> VerificationError:
    return VerificationError("tcg_evidence", "TCG DICE tagged evidence (CBOR)", "malformed", detail)


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | extra]) + value.to_bytes(size, "big")
    raise ValueError(f"CBOR argument too large: {value}")


def _bstr(data: bytes) -> bytes:
    return _head(_BSTR, len(data)) + data


def _tstr(text: str) -> bytes:
    raw = text.encode()
    return _head(_TSTR, len(raw)) + raw


class _Decoder:
    """Bounded reader over one CBOR item."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise _refuse(f"item at offset {self.pos} needs {size} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def item(self, depth: int = 0) -> _Item:
        if depth > _MAX_DEPTH:
            raise _refuse("nested too deeply")
        start = self.pos
        first = self._take(1)[0]
        major, extra = first >> 5, first & 0x1F
        if extra < 24:
            value = extra
        elif extra <= 27:
            value = int.from_bytes(self._take(1 << (extra - 24)), "big")
        else:
            raise _refuse(f"indefinite or reserved length at offset {start}")
        if major == _UINT:
            return value
        if major == _BSTR:
            return self._take(value)
        if major == _TSTR:
            try:
                return self._take(value).decode()
            except UnicodeDecodeError as exc:
                raise _refuse(f"text string at offset {start} is not UTF-8") from exc
        if major in (_ARRAY, _MAP) and value > _MAX_ITEMS:
            raise _refuse(f"{value} items at offset {start}, at most {_MAX_ITEMS}")
        if major == _ARRAY:
            return [self.item(depth + 1) for _ in range(value)]
        if major == _MAP:
            result: dict[str, _Item] = {}
            for _ in range(value):
                key = self.item(depth + 1)
                if not isinstance(key, str) or key in result:
                    raise _refuse(f"map at offset {start} has a non-text or repeated key")
                result[key] = self.item(depth + 1)
            return result
        if major == _TAG:
            return (value, self.item(depth + 1))
        raise _refuse(f"unsupported CBOR major type {major} at offset {start}")

    def whole(self) -> _Item:
        result = self.item()
        if self.pos != len(self.data):
            raise _refuse(f"{len(self.data) - self.pos} bytes after the CBOR item")
        return result


@dataclass(frozen=True, slots=True)
class PubkeyHash:
    """The ``pubkey-hash`` claim: which hash, and its value over the DER SPKI."""

    algorithm_id: int
    digest: bytes

    def matches(self, spki_der: bytes) -> bool:
        """Whether this claim names the key with this DER SubjectPublicKeyInfo."""
        name = HASH_ALGORITHMS.get(self.algorithm_id)
        return name is not None and hashlib.new(name, spki_der).digest() == self.digest


@dataclass(frozen=True, slots=True)
class TaggedEvidence:
    """Decoded extension value: the raw quote, the raw claims, and the pubkey-hash claim."""

    quote: bytes
    claims: bytes
    pubkey_hash: PubkeyHash

    @property
    def expected_report_data_prefix(self) -> bytes:
        """What the quote's report_data[0:32] must be: SHA-256 of the claims bytes."""
        return hashlib.sha256(self.claims).digest()


def pubkey_hash_claims(spki_der: bytes) -> bytes:
    """Serialized claims map naming a key by SHA-256 of its DER SPKI (as Gramine emits)."""
    hash_entry = _head(_ARRAY, 2) + _head(_UINT, 1) + _bstr(hashlib.sha256(spki_der).digest())
    return _head(_MAP, 1) + _tstr(_PUBKEY_HASH) + _bstr(hash_entry)


def encode_tagged_evidence(quote: bytes, claims: bytes) -> bytes:
    """Wrap a quote and its claims as ``tag 60000([bstr quote, bstr claims])``."""
    return _head(_TAG, CBOR_TAG_TEE_QUOTE) + _head(_ARRAY, 2) + _bstr(quote) + _bstr(claims)


def decode_tagged_evidence(data: bytes) -> TaggedEvidence:
    """Parse the extension value and the claims it carries.

    Raises:
        VerificationError: field ``tcg_evidence``; not the expected CBOR shape,
            no ``pubkey-hash`` claim, or an unsupported hash algorithm.
    """
    outer = _Decoder(bytes(data)).whole()
    if not (isinstance(outer, tuple) and outer[0] == CBOR_TAG_TEE_QUOTE):
        raise _refuse(f"expected CBOR tag {CBOR_TAG_TEE_QUOTE}")
    match outer[1]:
        case [bytes() as quote, bytes() as claims]:
            pass
        case _:
            raise _refuse("expected an array of two byte strings [quote, claims]")
    claims_map = _Decoder(claims).whole()
    if not isinstance(claims_map, dict) or not claims_map:
        raise _refuse("claims are not a non-empty map")
    entry_bytes = claims_map.get(_PUBKEY_HASH)
    if not isinstance(entry_bytes, bytes):
        raise _refuse("claims have no 'pubkey-hash' byte string")
    match _Decoder(entry_bytes).whole():
        case [int() as algorithm_id, bytes() as digest]:
            pass
        case _:
            raise _refuse("'pubkey-hash' is not [hash_alg_id, bstr hash]")
    name = HASH_ALGORITHMS.get(algorithm_id)
    if name is None:
        raise VerificationError("pubkey_hash.algorithm", f"one of {sorted(HASH_ALGORITHMS)}", algorithm_id)
    if len(digest) != hashlib.new(name).digest_size:
        raise _refuse(f"pubkey-hash has {len(digest)} bytes, {name} has {hashlib.new(name).digest_size}")
    return TaggedEvidence(quote=quote, claims=claims, pubkey_hash=PubkeyHash(algorithm_id, digest))
