"""TCG DICE tagged evidence (CBOR) as Gramine writes it."""

from __future__ import annotations

import hashlib

import pytest

from enclavefl.attest.tcg_evidence import (
    PubkeyHash,
    decode_tagged_evidence,
    encode_tagged_evidence,
    pubkey_hash_claims,
)
from enclavefl.errors import VerificationError

SPKI = b"\x30\x59" + bytes(range(89))  # any bytes stand in for a DER SPKI here
QUOTE = bytes(range(256)) * 18  # 4608 bytes, the size of a real quote


def test_claims_bytes_match_gramines_libcbor_output() -> None:
    digest = hashlib.sha256(SPKI).digest()
    # map(1) { tstr(11) "pubkey-hash": bstr(36) [ 1, bstr(32) digest ] }
    expected = b"\xa1\x6bpubkey-hash\x58\x24" + b"\x82\x01\x58\x20" + digest
    assert pubkey_hash_claims(SPKI) == expected


def test_evidence_layout_and_round_trip() -> None:
    claims = pubkey_hash_claims(SPKI)
    data = encode_tagged_evidence(QUOTE, claims)
    # tag(60000) array(2) bstr(4608) ... bstr(len(claims)) ...
    assert data[:3] == b"\xd9\xea\x60" and data[3] == 0x82 and data[4:7] == b"\x59\x12\x00"
    evidence = decode_tagged_evidence(data)
    assert (evidence.quote, evidence.claims) == (QUOTE, claims)
    assert evidence.expected_report_data_prefix == hashlib.sha256(claims).digest()
    assert evidence.pubkey_hash.matches(SPKI)
    assert not evidence.pubkey_hash.matches(SPKI + b"\x00")


def test_sha384_and_sha512_pubkey_hashes_are_understood() -> None:
    assert PubkeyHash(7, hashlib.sha384(SPKI).digest()).matches(SPKI)
    assert PubkeyHash(8, hashlib.sha512(SPKI).digest()).matches(SPKI)
    assert not PubkeyHash(2, hashlib.sha256(SPKI).digest()).matches(SPKI)


def _claims_with(entry: bytes) -> bytes:
    return b"\xa1\x6bpubkey-hash" + bytes([0x40 | len(entry)]) + entry


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "needs 1 bytes"),
        (b"\xd9\xea\x61\x82\x40\x40", "expected CBOR tag 60000"),
        (b"\xd9\xea\x60\x9f\x40\x40\xff", "indefinite or reserved length"),
        (b"\xd9\xea\x60\x81\x40", "array of two byte strings"),
        (b"\xd9\xea\x60\x82\x59\xff\xff\x00", "needs 65535 bytes"),
        (encode_tagged_evidence(QUOTE, b"\xa0"), "not a non-empty map"),
        (encode_tagged_evidence(QUOTE, b"\xa1\x63abc\x40"), "no 'pubkey-hash'"),
        (encode_tagged_evidence(QUOTE, _claims_with(b"\x82\x01\x41\x00")), "sha256 has 32"),
        (encode_tagged_evidence(QUOTE, pubkey_hash_claims(SPKI)) + b"\x00", "1 bytes after the CBOR item"),
        (b"\xd9\xea\x60" + b"\x81" * 10 + b"\x40", "nested too deeply"),
        (b"\xd9\xea\x60\x99\x10\x00", "at most 64"),
    ],
)
def test_malformed_evidence_is_refused(data: bytes, detail: str) -> None:
    with pytest.raises(VerificationError) as info:
        decode_tagged_evidence(data)
    assert info.value.field == "tcg_evidence"
    assert detail in str(info.value)


def test_unknown_hash_algorithm_is_named() -> None:
    data = encode_tagged_evidence(QUOTE, _claims_with(b"\x82\x05\x41\x00"))
    with pytest.raises(VerificationError) as info:
        decode_tagged_evidence(data)
    assert (info.value.field, info.value.actual) == ("pubkey_hash.algorithm", 5)
