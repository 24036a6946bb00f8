"""Tests for WeightedMean's accumulate setting: float32 running mean vs float64 running sum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.server.aggregator import BLOCK_VALUES, WeightedMean
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader

U = 2.0**-24  # unit roundoff of float32 (round to nearest)


def result_array(agg: WeightedMean, name: str) -> npt.NDArray[Any]:
    value = agg.result()[name]
    assert isinstance(value, np.ndarray), type(value)
    return value


def test_float32_error_stays_within_one_rounding_per_update_of_a_float64_reference() -> None:
    # Prepare: 100 updates of 1M values with magnitudes from 1e-3 to 1e3 and mixed
    # signs around a per-value centre (prefix means are larger than the mean, so
    # roundings do not cancel), weights from 1 to 1000.
    n_updates, size = 100, 1_000_000
    rng = np.random.default_rng(13)
    scale = (10.0 ** rng.uniform(-3, 3, size)).astype(np.float32)
    center = rng.standard_normal(size).astype(np.float32)
    weights = rng.integers(1, 1001, n_updates).astype(np.float64)
    agg = WeightedMean(StreamHeader.of(ParamSet({"w": np.zeros(size, np.float32)})), accumulate="float32")
    ref_sum = np.zeros(size)      # float64 running sum S_k: the reference
    abs_prefix = np.zeros(size)   # sum_k |S_k| = sum_k W_k |m_k|

    # Execute
    for weight in weights:
        x = (scale * (center + 3 * rng.standard_normal(size, dtype=np.float32))).astype(np.float32)
        agg.add(ParamSet({"w": x}), float(weight))
        ref_sum += weight * x.astype(np.float64)
        abs_prefix += np.abs(ref_sum)
    got = result_array(agg, "w").astype(np.float64)

    # Assert: each update rounds the float32 mean once (error <= U * |m_k|), and
    # update j's rounding is scaled by W_j / W in the final mean, so
    # |got - ref| <= U * sum_k (W_k / W) |m_k| = U * sum_k |S_k| / W.
    total = weights.sum()
    err = np.abs(got - ref_sum / total)
    bound = U * abs_prefix / total
    assert np.all(err <= bound * (1 + 1e-6) + 2.0**-149)
    # Typically far below: roundings are independent, about sqrt(N) of them add up.
    assert np.sqrt(np.mean((err / bound) ** 2)) < 0.2


def test_float64_setting_matches_a_sequential_float64_sum_bit_for_bit() -> None:
    # Prepare: a tensor bigger than one block, so several blocks are folded.
    rng = np.random.default_rng(3)
    size = BLOCK_VALUES + 1000
    updates = [rng.standard_normal(size).astype(np.float32) for _ in range(5)]
    weights = [3.0, 0.5, 7.0, 1.0, 2.0]
    agg = WeightedMean(StreamHeader.of(ParamSet({"w": updates[0]})), accumulate="float64")

    # Execute
    for x, w in zip(updates, weights):
        agg.add(ParamSet({"w": x}), w)

    # Assert: ((w1*x1 + w2*x2) + ...) / sum(w), in float64, rounded once to float32.
    total = np.zeros(size)
    for x, w in zip(updates, weights):
        total += x.astype(np.float64) * w
    np.testing.assert_array_equal(result_array(agg, "w"), (total / sum(weights)).astype(np.float32))


def test_float32_accumulator_holds_half_the_bytes_of_the_float64_one() -> None:
    # Prepare: 4M float32 values; the two float64 scratch blocks are the same either way.
    template = StreamHeader.of(ParamSet({"w": np.zeros((2048, 2048), np.float32)}))
    update = ParamSet({"w": np.ones((2048, 2048), np.float32)})
    wide, narrow = WeightedMean(template, accumulate="float64"), WeightedMean(template, accumulate="float32")

    # Execute
    wide.add(update, 1.0)
    narrow.add(update, 1.0)

    # Assert: 8 vs 4 bytes per value, plus 2 blocks of BLOCK_VALUES float64 each.
    blocks = 2 * 8 * BLOCK_VALUES
    assert wide.nbytes == 8 * 2048 * 2048 + blocks
    assert narrow.nbytes == 4 * 2048 * 2048 + blocks


def test_float64_and_integer_tensors_keep_a_float64_sum_in_float32_mode() -> None:
    # Prepare: float32 would round 1 + 2**-40 to 1.
    template = StreamHeader.of(ParamSet({"d": np.zeros(2), "n": np.zeros(1, np.int64)}))
    agg = WeightedMean(template, accumulate="float32")

    # Execute
    agg.add(ParamSet({"d": np.array([1.0, 1 + 2.0**-40]), "n": np.array([2**40], np.int64)}), 1.0)
    agg.add(ParamSet({"d": np.array([1 + 2.0**-40, 1.0]), "n": np.array([2**40 + 2], np.int64)}), 1.0)

    # Assert: (1 + 1 + 2**-40) / 2 = 1 + 2**-41 exactly; (2**41 + 2) / 2 = 2**40 + 1 exactly.
    np.testing.assert_array_equal(result_array(agg, "d"), [1 + 2.0**-41, 1 + 2.0**-41])
    np.testing.assert_array_equal(result_array(agg, "n"), [2**40 + 1])


def test_float32_mean_does_not_overflow_with_huge_weights() -> None:
    # Prepare: w * x = 1e30 * 3e38 overflows float32 (and float64 would not); a mean never exceeds its terms.
    template = StreamHeader.of(ParamSet({"w": np.zeros(2, np.float32)}))
    agg = WeightedMean(template, accumulate="float32")

    # Execute
    agg.add(ParamSet({"w": np.array([3e38, -3e38], np.float32)}), 1e30)
    agg.add(ParamSet({"w": np.array([3e38, -3e38], np.float32)}), 1e30)

    # Assert
    np.testing.assert_array_equal(result_array(agg, "w"), np.array([3e38, -3e38], np.float32))


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_same_update_order_gives_bit_identical_results(accumulate: Any) -> None:
    # Prepare
    rng = np.random.default_rng(8)
    updates = [rng.standard_normal(1000).astype(np.float32) for _ in range(6)]
    template = StreamHeader.of(ParamSet({"w": updates[0]}))
    first, second = WeightedMean(template, accumulate=accumulate), WeightedMean(template, accumulate=accumulate)

    # Execute
    for agg in (first, second):
        for k, x in enumerate(updates):
            agg.add(ParamSet({"w": x}), 1.0 + k)

    # Assert
    assert result_array(first, "w").tobytes() == result_array(second, "w").tobytes()


def test_sparse_rows_across_blocks_match_the_dense_mean_in_float32() -> None:
    # Prepare: rows of 3 values, more rows than one block holds; every row touched,
    # so the row weights equal the dense weight and the arithmetic is the same.
    rng = np.random.default_rng(21)
    shape = (BLOCK_VALUES // 3 + 7, 3)
    template = StreamHeader.of(ParamSet({"emb": np.zeros(shape, np.float32)}))
    dense_agg, sparse_agg = WeightedMean(template), WeightedMean(template)
    every_row = np.arange(shape[0])

    # Execute
    for weight in (2.0, 5.0, 1.0):
        x = rng.standard_normal(shape).astype(np.float32)
        dense_agg.add(ParamSet({"emb": x}), weight)
        sparse_agg.add(ParamSet({"emb": SparseRows(every_row, x, shape)}), weight)

    # Assert
    np.testing.assert_array_equal(result_array(sparse_agg, "emb"), result_array(dense_agg, "emb"))


def test_float16_tensors_accumulate_in_float32() -> None:
    # Prepare
    template = StreamHeader.of(ParamSet({"h": np.zeros(3, np.float16)}))
    agg = WeightedMean(template, accumulate="float32")

    # Execute
    agg.add(ParamSet({"h": np.array([1, 2, 3], np.float16)}), 1.0)
    agg.add(ParamSet({"h": np.array([3, 2, 0], np.float16)}), 1.0)

    # Assert: [(1+3)/2, (2+2)/2, (3+0)/2] = [2, 2, 1.5], in float16; 3 float32 values held.
    result = result_array(agg, "h")
    assert result.dtype == np.float16
    np.testing.assert_array_equal(result, [2, 2, 1.5])
    assert agg.nbytes == 3 * 4 + 2 * 8 * 3


def test_unknown_accumulate_setting_is_refused() -> None:
    template = StreamHeader.of(ParamSet({"w": np.zeros(1, np.float32)}))

    with pytest.raises(ValueError, match="accumulate must be 'float32' or 'float64', got 'bfloat16'"):
        WeightedMean(template, accumulate="bfloat16")  # type: ignore[arg-type]


def test_the_job_file_chooses_the_accumulation_of_the_mean_aggregator(tmp_path: Path) -> None:
    from enclavefl.config import parse_job
    from enclavefl.server.strategy import build_strategy

    template = StreamHeader.of(ParamSet({"w": np.zeros(4, dtype=np.float32)}))
    default = build_strategy(parse_job({}), template, spill_dir=tmp_path).aggregator(template)
    chosen = build_strategy(parse_job({"server": {"aggregator": {"name": "mean", "accumulate": "float32"}}}),
                            template, spill_dir=tmp_path).aggregator(template)

    assert isinstance(default, WeightedMean) and default.accumulate == "float64"
    assert isinstance(chosen, WeightedMean) and chosen.accumulate == "float32"
