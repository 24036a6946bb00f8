"""Fixed-point encoding into Z_2^32: hand-checked grid, wrap-around sums, error bounds."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.fixedpoint import FixedPoint

RNG = np.random.default_rng(0)


def test_deterministic_grid_by_hand() -> None:
    # bits 3: L = 3, c = 1.5, step = 0.5. Values 0.74 -> 1.48 -> 1; -1.0 -> -2;
    # 9.0 clipped to 1.5 -> 3. Weight 2 doubles them; -4 is 2**32 - 4.
    grid = FixedPoint(1.5, 3, "deterministic")
    out = grid.encode(np.array([0.74, -1.0, 9.0]), 2, RNG)
    assert out.tolist() == [2, 2**32 - 4, 6, 2]


def test_sum_of_encodings_decodes_to_weighted_mean() -> None:
    # Worker a: x = [1.0, -0.5], w = 1; worker b: x = [0.0, 0.5], w = 3 (all on the grid).
    # Weighted mean: [(1 + 0) / 4, (-0.5 + 1.5) / 4] = [0.25, 0.25].
    grid = FixedPoint(1.0, 8, "deterministic")
    total = grid.encode(np.array([1.0, -0.5]), 1, RNG) + grid.encode(np.array([0.0, 0.5]), 3, RNG)
    weighted, weight = grid.decode_sum(total)
    assert weight == 4
    np.testing.assert_allclose(weighted / weight, [0.25, 0.25], atol=grid.max_error())


def test_masks_cancel_modulo_two_to_the_32() -> None:
    grid = FixedPoint(4.0, 16, "deterministic")
    x = np.array([-3.0, 2.5, 0.001])
    mask = np.array([2**32 - 1, 123456789, 2**31], dtype=np.uint32)
    masked = grid.encode(x, 1, RNG) + np.append(mask, np.uint32(7))
    unmasked = masked - np.append(mask, np.uint32(7))
    np.testing.assert_allclose(grid.decode_mean(unmasked), x, atol=grid.max_error())


def test_stochastic_rounding_is_unbiased() -> None:
    # 0.3 steps above a grid point rounds up 30% of the time: the mean comes back.
    grid = FixedPoint(1.0, 4, "stochastic")  # step = 1/7
    x = np.full(200_000, 0.3 / 7)
    q = grid.encode(x, 1, np.random.default_rng(1))[:-1].view(np.int32)
    assert abs(q.mean() - 0.3) < 0.01
    assert set(np.unique(q).tolist()) == {0, 1}


def test_error_stays_within_the_documented_bound() -> None:
    for rounding in ("stochastic", "deterministic"):
        grid = FixedPoint(2.0, 10, rounding)  # type: ignore[arg-type]
        x = np.random.default_rng(2).uniform(-2, 2, 10_000)
        decoded = grid.decode_mean(grid.encode(x, 5, np.random.default_rng(3)))
        assert np.max(np.abs(decoded - x)) <= grid.max_error() + 1e-12


def test_weight_beyond_capacity_is_refused() -> None:
    grid = FixedPoint(1.0, 16)
    assert grid.capacity == (2**31 - 1) // 32767
    with pytest.raises(ValueError, match="weight must be"):
        grid.encode(np.zeros(2), grid.capacity + 1, RNG)


def test_zero_total_weight_is_refused() -> None:
    with pytest.raises(ProtocolError, match="total weight 0"):
        FixedPoint(1.0, 8).decode_sum(np.zeros(3, dtype=np.uint32))


def test_encoding_across_blocks_matches_the_elementwise_rule() -> None:
    # Deterministic, bits 8: L = 127, c = 1, step = 1/127. Each value i/127 - 1 (i = 0..254,
    # repeated past two blocks) is on the grid, so q = i - 127; weight 3 makes it 3(i - 127).
    from enclavefl.privacy.secagg.fixedpoint import ENCODE_BLOCK

    grid = FixedPoint(1.0, 8, "deterministic")
    i = np.arange(2 * ENCODE_BLOCK + 5) % 255
    out = grid.encode((i / 127 - 1).astype(np.float32), 3, RNG)
    assert out[-1] == 3
    np.testing.assert_array_equal(out[:-1].view(np.int32), 3 * (i - 127))


def test_stochastic_rounding_keeps_grid_values_in_every_block() -> None:
    # c = L = 127 makes step = 1, so x = q exactly; frac 0: floor(q + U) = q for every coin U in [0, 1).
    from enclavefl.privacy.secagg.fixedpoint import ENCODE_BLOCK

    grid = FixedPoint(127.0, 8, "stochastic")
    q = (np.arange(2 * ENCODE_BLOCK + 5) % 255) - 127
    out = grid.encode(q.astype(np.float64), 1, np.random.default_rng(4))
    np.testing.assert_array_equal(out[:-1].view(np.int32), q)
