"""Calibrating the Gaussian mechanism for one (epsilon, delta) release: analytic (Balle and Wang 2018) and classical."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from enclavefl.gaussian_mechanism import analytic_gaussian_sigma, classical_gaussian_sigma, gaussian_delta


def test_classical_sigma_is_dwork_and_roths_formula() -> None:
    # 2 * sqrt(2 ln(1.25 / 1e-5)) / 0.5 = 4 * sqrt(2 * 11.7361) = 4 * 4.84481 = 19.3792
    assert classical_gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(19.3792, abs=1e-4)


def test_classical_sigma_refuses_epsilon_of_one_or_more() -> None:
    with pytest.raises(ValueError, match="0 < epsilon < 1"):
        classical_gaussian_sigma(1.0, 1e-5, 1.0)


def test_delta_at_epsilon_zero_is_the_overlap_of_two_gaussians() -> None:
    # sigma = sensitivity = 1, epsilon = 0: Phi(1/2) - Phi(-1/2) = 2 * 0.691462 - 1 = 0.382925
    assert gaussian_delta(1.0, 0.0, 1.0) == pytest.approx(0.382925, abs=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 4.0, 50.0])
def test_analytic_sigma_meets_delta_exactly_and_never_below(epsilon: float) -> None:
    sigma = analytic_gaussian_sigma(epsilon, 1e-5, 2.0)
    assert gaussian_delta(sigma, epsilon, 2.0) <= 1e-5
    assert gaussian_delta(sigma * (1 - 1e-6), epsilon, 2.0) > 1e-5


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 0.9])
def test_analytic_sigma_is_below_the_classical_one(epsilon: float) -> None:
    assert analytic_gaussian_sigma(epsilon, 1e-5, 1.0) < classical_gaussian_sigma(epsilon, 1e-5, 1.0)


@pytest.mark.parametrize(("epsilon", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (8.0, 1e-3)])
def test_analytic_sigma_agrees_with_dp_accounting(epsilon: float, delta: float) -> None:
    # Computed independently: the PLD of one Gaussian mechanism with noise multiplier sigma / sensitivity.
    sigma = analytic_gaussian_sigma(epsilon, delta, 2.0)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma / 2.0))
    assert accountant.get_epsilon(delta) == pytest.approx(epsilon, rel=1e-3)


def test_huge_epsilon_does_not_overflow() -> None:
    sigma = analytic_gaussian_sigma(1000.0, 1e-5, 1.0)
    assert 0 < sigma < analytic_gaussian_sigma(100.0, 1e-5, 1.0)
    assert math.isfinite(gaussian_delta(sigma, 1000.0, 1.0))


@pytest.mark.parametrize(("epsilon", "delta", "sensitivity"), [(0.0, 1e-5, 1.0), (1.0, 1.0, 1.0), (1.0, 1e-5, 0.0)])
def test_analytic_sigma_refuses_settings_out_of_range(epsilon: float, delta: float, sensitivity: float) -> None:
    with pytest.raises(ValueError, match="need epsilon > 0"):
        analytic_gaussian_sigma(epsilon, delta, sensitivity)
