"""Tests for enclavefl.server.aggregator: the streaming weighted mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.errors import ClosedError, UpdateRejected
from enclavefl.server.aggregator import WeightedMean
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, Tensor


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def dense(value: Tensor) -> npt.NDArray[Any]:
    """The array behind a dense tensor (fails the test on a SparseRows)."""
    assert isinstance(value, np.ndarray), type(value)
    return value


def header(**tensors: npt.NDArray[Any]) -> StreamHeader:
    return StreamHeader.of(ParamSet(tensors))


TEMPLATE = header(w=np.zeros((2, 2), np.float32), b=np.zeros(2, np.float32))


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_weighted_mean_of_two_dense_updates(accumulate: Any) -> None:
    # Prepare
    agg = WeightedMean(TEMPLATE, accumulate=accumulate)
    u1 = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])})
    u2 = ParamSet({"w": f32([[3, 6], [7, 0]]), "b": f32([3, 5])})

    # Execute
    agg.add(u1, 1.0)
    agg.add(u2, 3.0)
    result = agg.result()

    # Assert: (1*u1 + 3*u2) / 4
    assert list(result) == ["w", "b"]
    np.testing.assert_array_equal(result["w"], f32([[2.5, 5.0], [6.0, 1.0]]))
    np.testing.assert_array_equal(result["b"], f32([2.5, 4.0]))
    assert dense(result["w"]).dtype == np.float32
    assert (agg.count, agg.total_weight) == (2, 4.0)


def test_equal_weights_give_the_plain_mean() -> None:
    # Prepare
    agg = WeightedMean(TEMPLATE)

    # Execute
    agg.add(ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])}), 5.0)
    agg.add(ParamSet({"w": f32([[3, 6], [7, 0]]), "b": f32([3, 5])}), 5.0)

    # Assert
    np.testing.assert_array_equal(agg.result()["w"], f32([[2, 4], [5, 2]]))
    np.testing.assert_array_equal(agg.result()["b"], f32([2, 3]))


def test_single_update_is_its_own_mean() -> None:
    agg = WeightedMean(TEMPLATE)
    update = ParamSet({"w": f32([[0.1, -2], [3e-3, 4]]), "b": f32([7, -7])})

    agg.add(update, 42.0)

    assert agg.result() == update


def test_integer_tensors_are_rounded_and_keep_their_dtype() -> None:
    # Prepare
    agg = WeightedMean(header(count=np.zeros(3, np.int64)))

    # Execute
    agg.add(ParamSet({"count": np.array([1, 4, 10], np.int64)}), 1.0)
    agg.add(ParamSet({"count": np.array([2, 8, 10], np.int64)}), 3.0)
    result = agg.result()["count"]

    # Assert: [(1+6)/4, (4+24)/4, 10] = [1.75, 7, 10] -> [2, 7, 10]
    assert isinstance(result, np.ndarray)
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, [2, 7, 10])


def test_result_does_not_share_memory_with_the_running_sum() -> None:
    agg = WeightedMean(TEMPLATE)
    agg.add(ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])}), 1.0)
    first = agg.result()

    first["w"][...] = 99  # type: ignore[index]

    np.testing.assert_array_equal(agg.result()["w"], f32([[1, 2], [3, 4]]))


def test_zero_updates_raise_update_rejected() -> None:
    agg = WeightedMean(TEMPLATE)

    with pytest.raises(UpdateRejected, match="zero updates"):
        agg.result()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"w": f32([[1, 1], [1, 1]])}, "missing 'b'"),
        ({"w": f32([[1, 1], [1, 1]]), "b": f32([1, 1]), "c": f32([1])}, "unexpected 'c'"),
        ({"w": f32([[1, 1], [1, 1]]), "bias": f32([1, 1])}, "missing 'b'"),
        ({"b": f32([1, 1]), "w": f32([[1, 1], [1, 1]])}, "order differs"),
        ({"w": f32([1, 1, 1, 1]), "b": f32([1, 1])}, "shape (4,) != expected (2, 2)"),
        ({"w": f32([[1, 1], [1, 1]]), "b": np.ones(2, np.float64)}, "dtype float64 != expected float32"),
        ({"w": f32([[1, 1], [1, 1]]), "b": np.ones(2, np.int32)}, "dtype int32 != expected float32"),
        (
            {"w": SparseRows(np.array([0]), f32([[1, 1, 1]]), (2, 3)), "b": f32([1, 1])},
            "shape (2, 3) != expected (2, 2)",
        ),
    ],
)
def test_mismatched_update_is_rejected_and_leaves_the_aggregate_unchanged(
    bad: dict[str, Any], reason: str
) -> None:
    # Prepare
    agg = WeightedMean(TEMPLATE)
    agg.add(ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])}), 2.0)
    before = agg.result()

    # Execute
    with pytest.raises(UpdateRejected) as info:
        agg.add(ParamSet(bad), 100.0)

    # Assert
    assert reason in str(info.value)
    assert agg.result() == before
    assert (agg.count, agg.total_weight) == (1, 2.0)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weight_is_rejected_and_leaves_the_aggregate_unchanged(weight: float) -> None:
    agg = WeightedMean(TEMPLATE)
    agg.add(ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])}), 1.0)
    before = agg.result()

    with pytest.raises(UpdateRejected, match="weight"):
        agg.add(ParamSet({"w": f32([[9, 9], [9, 9]]), "b": f32([9, 9])}), weight)

    assert agg.result() == before
    assert agg.count == 1


# ------------------------------------------------------------------ sparse rows

EMB = header(emb=np.zeros((4, 2), np.float32))


def sparse(ids: list[int], rows: Any) -> ParamSet:
    return ParamSet({"emb": SparseRows(np.array(ids, np.int64), f32(rows).reshape(len(ids), 2), (4, 2))})


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_sparse_rows_are_averaged_over_the_workers_that_touched_them(accumulate: Any) -> None:
    # Prepare
    agg = WeightedMean(EMB, accumulate=accumulate)

    # Execute: A (weight 1) touches rows 0 and 2, B (weight 3) rows 2 and 3.
    agg.add(sparse([0, 2], [[1, 1], [2, 2]]), 1.0)
    agg.add(sparse([2, 3], [[6, 6], [4, 4]]), 3.0)
    result = agg.result()["emb"]

    # Assert: row 0 is A's alone (not 1/4 of it), row 1 nobody's, row 2 (1*2+3*6)/4, row 3 B's alone.
    np.testing.assert_array_equal(result, f32([[1, 1], [0, 0], [5, 5], [4, 4]]))


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
@pytest.mark.parametrize("sparse_first", [False, True])
def test_dense_and_sparse_updates_mix(sparse_first: bool, accumulate: Any) -> None:
    # Prepare
    agg = WeightedMean(EMB, accumulate=accumulate)
    dense = ParamSet({"emb": f32([[1, 1], [1, 1], [1, 1], [2, 2]])})
    rows = sparse([1], [[5, 5]])
    pairs = [(rows, 3.0), (dense, 1.0)] if sparse_first else [(dense, 1.0), (rows, 3.0)]

    # Execute
    for update, weight in pairs:
        agg.add(update, weight)

    # Assert: only row 1 gets B's rows: (1*1 + 3*5)/4 = 4; the others are A's.
    np.testing.assert_array_equal(agg.result()["emb"], f32([[1, 1], [4, 4], [1, 1], [2, 2]]))


def test_sparse_with_every_row_touched_equals_dense() -> None:
    # Prepare: three workers, random values and weights.
    rng = np.random.default_rng(5)
    shape = (6, 3)
    template = header(emb=np.zeros(shape, np.float32), bias=np.zeros(3, np.float32))
    updates = [
        (rng.standard_normal(shape).astype(np.float32), rng.standard_normal(3).astype(np.float32))
        for _ in range(3)
    ]
    weights = [3.0, 10.0, 7.0]
    dense_agg, sparse_agg = WeightedMean(template), WeightedMean(template)

    # Execute
    for (emb, bias), weight in zip(updates, weights):
        dense_agg.add(ParamSet([("emb", emb), ("bias", bias)]), weight)
        every_row = SparseRows(np.arange(shape[0]), emb, shape)
        sparse_agg.add(ParamSet([("emb", every_row), ("bias", bias)]), weight)

    # Assert
    dense_result, sparse_result = dense_agg.result(), sparse_agg.result()
    expected = np.sum([w * e.astype(np.float64) for (e, _), w in zip(updates, weights)], axis=0) / sum(weights)
    np.testing.assert_allclose(dense(dense_result["emb"]), expected, rtol=1e-6)
    np.testing.assert_array_equal(sparse_result["emb"], dense_result["emb"])
    np.testing.assert_array_equal(sparse_result["bias"], dense_result["bias"])


def test_sparse_update_with_no_rows_counts_but_moves_nothing() -> None:
    agg = WeightedMean(EMB)
    agg.add(sparse([1], [[8, 8]]), 1.0)

    agg.add(sparse([], []), 5.0)

    np.testing.assert_array_equal(agg.result()["emb"], f32([[0, 0], [8, 8], [0, 0], [0, 0]]))
    assert agg.count == 2


def test_close_frees_the_running_state() -> None:
    agg = WeightedMean(TEMPLATE)
    agg.add(ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])}), 1.0)
    assert agg.nbytes > 0

    agg.close()

    assert agg.nbytes == 0


def test_add_and_result_after_close_raise_closed_error() -> None:
    agg = WeightedMean(TEMPLATE)
    update = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([1, 1])})
    agg.add(update, 1.0)
    agg.close()
    agg.close()  # idempotent

    with pytest.raises(ClosedError):
        agg.add(update, 1.0)
    with pytest.raises(ClosedError):
        agg.result()
