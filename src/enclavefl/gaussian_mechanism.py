"""Calibrating the Gaussian mechanism: the noise that makes one release (epsilon, delta)-DP.

Local differential privacy (``privacy.local_dp.mechanism: gaussian``) noises each
worker's upload itself, so its noise must be calibrated for one release, not
composed by an accountant of subsampled rounds. We use the *analytic* Gaussian
mechanism of Balle and Wang 2018 ("Improving the Gaussian Mechanism for
Differential Privacy: Analytical Calibration and Optimal Denoising", Theorem 8):
adding N(0, sigma^2) to a query of L2 sensitivity ``Delta`` is (epsilon, delta)-DP
exactly when

    Phi(Delta / (2 sigma) - epsilon sigma / Delta) - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta) <= delta,

and the smallest such sigma is found by bisection (the left side falls as sigma
grows). Unlike the classical ``sigma = Delta sqrt(2 ln(1.25 / delta)) / epsilon``
(Dwork and Roth 2014, Theorem A.1), it holds for every epsilon > 0, not only
epsilon < 1, and it is never larger. Both are here; the classical one serves as
a reference and an upper bracket. Pure Python (``math``): workers load it without
the ``privacy`` extra.
"""

from __future__ import annotations

import math

__all__ = ["analytic_gaussian_sigma", "classical_gaussian_sigma", "gaussian_delta"]

_SQRT2 = math.sqrt(2.0)


def _log_erfc(x: float) -> float:
    """ln(erfc(x)), accurate where erfc itself underflows (x above about 26)."""
    if x < 20.0:
        return math.log(math.erfc(x))
    # Asymptotic series of erfc (Abramowitz and Stegun 7.1.23); at x >= 20 its terms past these are < 1e-12.
    inv = 1.0 / (2.0 * x * x)
    series = 1.0 - inv + 3.0 * inv**2 - 15.0 * inv**3
    return -x * x - math.log(x * math.sqrt(math.pi)) + math.log(series)


def _phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * math.erfc(-x / _SQRT2)


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest delta for which N(0, sigma^2) noise on a query of this L2 sensitivity is (epsilon, delta)-DP.

    Balle and Wang 2018, Theorem 8 (exact, not a bound). Raises ValueError on a
    non-positive sigma or sensitivity, or a negative epsilon.
    """
    if not (sigma > 0 and sensitivity > 0 and epsilon >= 0):
        raise ValueError(f"need sigma > 0, sensitivity > 0 and epsilon >= 0, got {sigma}, {sensitivity}, {epsilon}")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # e^eps * Phi(-(a + b)) in log space: e^eps overflows long before the product does.
    second = math.exp(epsilon + _log_erfc((a + b) / _SQRT2) - math.log(2.0))
    return max(0.0, _phi(a - b) - second)


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork and Roth's ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``; valid only for epsilon < 1.

    Raises:
        ValueError: epsilon not in (0, 1), delta not in (0, 1) or sensitivity not positive.
    """
    if not (0 < epsilon < 1 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"the classical Gaussian mechanism needs 0 < epsilon < 1, 0 < delta < 1 and a positive "
                         f"sensitivity, got {epsilon}, {delta}, {sensitivity}")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float, *, rel_tol: float = 1e-12) -> float:
    """The smallest sigma making N(0, sigma^2) noise (epsilon, delta)-DP (Balle and Wang 2018), by bisection.

    The result is within ``rel_tol`` above the exact value (never below it), so
    ``gaussian_delta(result, epsilon, sensitivity) <= delta``.

    Raises:
        ValueError: epsilon not positive, delta not in (0, 1), or sensitivity not positive.
    """
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0 and math.isfinite(epsilon)):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1 and sensitivity > 0, got {epsilon}, {delta}, {sensitivity}")
    high = sensitivity
    while gaussian_delta(high, epsilon, sensitivity) > delta:
        high *= 2.0
    low = high / 2.0
    while low > 1e-300 and gaussian_delta(low, epsilon, sensitivity) <= delta:
        low /= 2.0
    # Invariant: delta(low) > delta >= delta(high).
    while high - low > rel_tol * high:
        mid = 0.5 * (low + high)
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            low = mid
        else:
            high = mid
    return high
