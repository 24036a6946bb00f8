"""Shamir sharing: exact recovery from t shares, any t, and refusal of too few."""

from __future__ import annotations

import itertools

import pytest

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.shamir import PRIME, Share, combine_shares, split_secret


def test_two_of_three_by_hand() -> None:
    # f(x) = 5 + 3x over GF(p): shares (1, 8), (2, 11), (3, 14).
    # Lagrange at 0 from (1, 8), (3, 14): 8 * 3/(3-1) + 14 * 1/(1-3) = 12 - 7 = 5.
    secret = (5).to_bytes(32, "big")
    assert combine_shares([Share(1, 8), Share(3, 14)], 2) == secret
    assert combine_shares([Share(2, 11), Share(1, 8)], 2) == secret


def test_any_threshold_subset_recovers_the_secret() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset), 3) == secret


def test_all_ones_secret_round_trips() -> None:
    # 2**256 - 1 is the largest 32-byte value; the field (p > 2**256) holds it.
    secret = b"\xff" * 32
    assert combine_shares(split_secret(secret, 2, [7, 9]), 2) == secret


def test_fewer_shares_than_threshold_are_refused() -> None:
    shares = split_secret(b"\x01" * 32, 3, [1, 2, 3])
    with pytest.raises(ProtocolError, match="3 shares are needed"):
        combine_shares(shares[:2], 3)


def test_shares_below_threshold_do_not_determine_the_secret() -> None:
    # Two shares of a 3-of-n sharing fit a degree-2 polynomial through any f(0):
    # reading them as a 2-of-n sharing gives an unrelated value (equal with probability 1/p).
    secret = b"\x42" * 32
    shares = split_secret(secret, 3, [1, 2, 3])
    try:
        recovered = combine_shares(shares[:2], 2)
    except ProtocolError:  # the line through them may leave 32 bytes: also not the secret
        return
    assert recovered != secret


def test_share_value_bytes_round_trip_and_out_of_field_refused() -> None:
    share = Share(4, PRIME - 1)
    assert Share.from_value_bytes(4, share.value_bytes()) == share
    with pytest.raises(ProtocolError, match="outside the field"):
        Share.from_value_bytes(4, PRIME.to_bytes(33, "big"))


def test_repeated_points_are_refused() -> None:
    with pytest.raises(ProtocolError, match="repeat"):
        combine_shares([Share(1, 8), Share(1, 8)], 2)
