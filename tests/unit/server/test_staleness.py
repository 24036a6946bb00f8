"""Tests for enclavefl.server.staleness: the s(tau) functions on hand-computed values."""

from __future__ import annotations

from typing import Any

import pytest

from enclavefl.config import parse_job
from enclavefl.server.staleness import Constant, Hinge, Polynomial, make_staleness


def staleness_of(setting: Any) -> Any:
    return parse_job({"round": {"mode": "async", "staleness": setting}}).round.staleness


def test_constant_counts_every_update_fully() -> None:
    s = Constant()

    assert [s(0), s(1), s(1000)] == [1.0, 1.0, 1.0]


def test_polynomial_is_one_over_a_power_of_one_plus_tau() -> None:
    # (1 + tau) ** -0.5: tau 0 -> 1, tau 3 -> 4 ** -0.5 = 1/2, tau 8 -> 9 ** -0.5 = 1/3.
    s = Polynomial(0.5)

    assert s(0) == 1.0
    assert s(3) == 0.5
    assert s(8) == pytest.approx(1 / 3)


def test_polynomial_with_exponent_one_is_the_reciprocal() -> None:
    # (1 + tau) ** -1: tau 1 -> 1/2, tau 4 -> 1/5.
    s = Polynomial(1.0)

    assert s(1) == 0.5
    assert s(4) == pytest.approx(0.2)


def test_hinge_is_one_up_to_the_cutoff_then_falls() -> None:
    # slope 10, cutoff 4: tau <= 4 -> 1; tau 5 -> 1 / (10 * 1 + 1) = 1/11; tau 6 -> 1 / (10 * 2 + 1) = 1/21.
    s = Hinge(slope=10.0, cutoff=4)

    assert [s(0), s(4)] == [1.0, 1.0]
    assert s(5) == pytest.approx(1 / 11)
    assert s(6) == pytest.approx(1 / 21)


@pytest.mark.parametrize("s", [Constant(), Polynomial(0.5), Hinge(10.0, 4)], ids=["constant", "polynomial", "hinge"])
def test_negative_staleness_is_refused(s: Any) -> None:
    with pytest.raises(ValueError, match="tau=-1"):
        s(-1)


def test_default_setting_is_fedbuffs_square_root() -> None:
    s = make_staleness(staleness_of({"name": "polynomial"}))

    assert s == Polynomial(0.5)
    assert s(3) == 0.5


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("constant", Constant()),
        ({"name": "polynomial", "exponent": 2.0}, Polynomial(2.0)),
        ({"name": "hinge", "slope": 2.0, "cutoff": 1}, Hinge(2.0, 1)),
    ],
    ids=["constant", "polynomial", "hinge"],
)
def test_make_staleness_builds_the_configured_function(setting: Any, expected: Any) -> None:
    assert make_staleness(staleness_of(setting)) == expected


def test_configured_hinge_gives_its_hand_value() -> None:
    # slope 2, cutoff 1: tau 3 -> 1 / (2 * (3 - 1) + 1) = 1/5.
    s = make_staleness(staleness_of({"name": "hinge", "slope": 2.0, "cutoff": 1}))

    assert s(1) == 1.0
    assert s(3) == pytest.approx(0.2)
