"""Tests for WeightedMean.partial()/merge() and the partial byte format (enclavefl.server.partials)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.errors import UpdateRejected
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.partials import decode_partial, encode_partial
from enclavefl.server.robust import CoordinateMedian
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


TEMPLATE = StreamHeader.of(ParamSet({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}))
EMB = StreamHeader.of(ParamSet({"emb": np.zeros((4, 2), np.float32)}))


def update(w: Any, b: Any) -> ParamSet:
    return ParamSet({"w": f32(w), "b": f32(b)})


def sparse(ids: list[int], rows: list[list[float]]) -> ParamSet:
    return ParamSet({"emb": SparseRows(np.array(ids, np.int64), f32(rows), (4, 2))})


def folded(updates: list[tuple[ParamSet, float]], template: StreamHeader = TEMPLATE,
           accumulate: Any = "float64") -> WeightedMean:
    agg = WeightedMean(template, accumulate=accumulate)
    for u, weight in updates:
        agg.add(u, weight)
    return agg


def random_updates(n: int, seed: int) -> list[tuple[ParamSet, float]]:
    rng = np.random.default_rng(seed)
    return [(update(rng.standard_normal((2, 2)), rng.standard_normal(2)), float(rng.integers(1, 500)))
            for _ in range(n)]


def test_three_partials_merge_bit_identical_to_one_aggregator_when_no_addition_rounds() -> None:
    # Prepare: quarters times small integer weights: every float64 partial sum is exact, so the
    # grouping of the additions cannot change a bit. 12 updates, 4 per "server".
    updates = [(update([[k / 4, -k / 2], [k, 3.25]], [k * 0.75, 1.0]), float(k % 5 + 1)) for k in range(12)]
    parts = {f"server-{i}": folded(updates[i * 4:(i + 1) * 4]).partial() for i in range(3)}

    # Execute
    merged = WeightedMean(TEMPLATE)
    merged.merge(parts)

    # Assert: the same result and the same running state as folding all 12 into one aggregator.
    single = folded(updates)
    assert merged.result().equal(single.result())
    assert merged.partial() == single.partial()
    assert (merged.count, merged.total_weight) == (12, single.total_weight)


def test_merged_random_partials_stay_within_float64_roundings_of_one_aggregator() -> None:
    # Prepare: arbitrary float32 values: float64 sums round, so grouping them per server moves
    # the sum by a few float64 roundings (about 1e-16 relative), far below float32's 6e-8.
    updates = random_updates(12, seed=3)
    parts = {f"s{i}": folded(updates[i::3]).partial() for i in range(3)}

    # Execute
    merged = WeightedMean(TEMPLATE)
    merged.merge(parts)
    single = folded(updates)

    # Assert
    for name in ("w", "b"):
        np.testing.assert_allclose(merged.result()[name], single.result()[name], rtol=1e-6, atol=1e-7)
        acc_merged = decode_partial(merged.partial())[1][f"acc/{name}"]
        acc_single = decode_partial(single.partial())[1][f"acc/{name}"]
        np.testing.assert_allclose(acc_merged, acc_single, rtol=1e-13, atol=1e-12)


def test_merge_folds_in_key_order_whatever_the_mapping_order() -> None:
    # Prepare
    updates = random_updates(9, seed=7)
    blobs = {k: folded(updates[i::3]).partial() for i, k in enumerate(["c", "a", "b"])}

    # Execute
    one, other = WeightedMean(TEMPLATE), WeightedMean(TEMPLATE)
    one.merge(blobs)
    other.merge({k: blobs[k] for k in sorted(blobs)})

    # Assert
    assert one.partial() == other.partial()


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_a_partial_reloads_into_an_empty_aggregator_bit_for_bit(accumulate: Any) -> None:
    # Prepare
    agg = folded(random_updates(5, seed=1), accumulate=accumulate)

    # Execute
    reloaded = WeightedMean(TEMPLATE, accumulate=accumulate)
    reloaded.merge({"me": agg.partial()})

    # Assert: same state, and it keeps folding the same way.
    assert reloaded.partial() == agg.partial()
    extra = update([[1, 2], [3, 4]], [5, 6])
    agg.add(extra, 2.0)
    reloaded.add(extra, 2.0)
    assert reloaded.result().equal(agg.result())


def test_float32_means_merge_to_the_weighted_mean() -> None:
    # Prepare: server A: u1 weight 1 ; server B: u2 weight 3.
    a = folded([(update([[1, 2], [3, 4]], [1, 1]), 1.0)], accumulate="float32")
    b = folded([(update([[3, 6], [7, 0]], [3, 5]), 3.0)], accumulate="float32")

    # Execute
    merged = WeightedMean(TEMPLATE, accumulate="float32")
    merged.merge({"a": a.partial(), "b": b.partial()})

    # Assert: (1*u1 + 3*u2) / 4 = w [[2.5, 5], [6, 1]], b [2.5, 4]
    result = merged.result()
    np.testing.assert_array_equal(result["w"], f32([[2.5, 5.0], [6.0, 1.0]]))
    np.testing.assert_array_equal(result["b"], f32([2.5, 4.0]))
    assert (merged.count, merged.total_weight) == (2, 4.0)


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_sparse_rows_merge_with_their_row_weights(accumulate: Any) -> None:
    # Prepare: A (weight 1) touches rows 0, 2 on server 1; B (weight 3) rows 2, 3 on server 2;
    # C (weight 2) is dense (all rows 10) on server 2.
    s1 = folded([(sparse([0, 2], [[1, 1], [2, 2]]), 1.0)], EMB, accumulate)
    s2 = folded([(sparse([2, 3], [[6, 6], [4, 4]]), 3.0),
                 (ParamSet({"emb": np.full((4, 2), 10, np.float32)}), 2.0)], EMB, accumulate)

    # Execute
    merged = WeightedMean(EMB, accumulate=accumulate)
    merged.merge({"1": s1.partial(), "2": s2.partial()})

    # Assert, per row (sum of weight * value) / (sum of weights of who touched it):
    #   row 0: (1*1 + 2*10) / 3 = 7 ; row 1: (2*10) / 2 = 10
    #   row 2: (1*2 + 3*6 + 2*10) / 6 = 40/6 ; row 3: (3*4 + 2*10) / 5 = 6.4
    expected = f32([[7, 7], [10, 10], [40 / 6, 40 / 6], [6.4, 6.4]])
    np.testing.assert_allclose(merged.result()["emb"], expected, rtol=1e-6)


def test_an_empty_partial_merges_to_nothing() -> None:
    # Prepare
    agg = folded([(update([[1, 2], [3, 4]], [1, 1]), 2.0)])

    # Execute
    agg.merge({"idle-server": WeightedMean(TEMPLATE).partial()})

    # Assert
    assert (agg.count, agg.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(agg.result()["w"], f32([[1, 2], [3, 4]]))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: WeightedMean(EMB).partial(), "template"),
        (lambda: folded([(update([[1, 1], [1, 1]], [1, 1]), 1.0)], accumulate="float32").partial(), "accumulate"),
        (lambda: folded([(update([[1, 1], [1, 1]], [1, 1]), 1.0)]).partial()[:-3], "truncated"),
        (lambda: b"EFLCKPT1" + bytes(20), "not an aggregator partial"),
        (lambda: encode_partial({"kind": "weighted_mean"}, ParamSet()), "format"),
    ],
)
def test_merge_refuses_a_foreign_or_broken_partial_and_changes_nothing(make: Any, reason: str) -> None:
    # Prepare
    agg = folded([(update([[1, 2], [3, 4]], [1, 1]), 2.0)])
    good = folded([(update([[5, 5], [5, 5]], [5, 5]), 1.0)]).partial()
    before = agg.partial()

    # Execute / Assert: a good partial listed before the bad one is not folded either.
    with pytest.raises(UpdateRejected, match=reason):
        agg.merge({"a": good, "b": make()})
    assert agg.partial() == before


def test_merge_refuses_a_partial_whose_arrays_disagree_with_its_metadata() -> None:
    # Prepare: a float64 partial whose accumulator for w was replaced by a float32 array.
    meta, arrays = decode_partial(folded([(update([[1, 1], [1, 1]], [1, 1]), 1.0)]).partial())
    forged = encode_partial(meta, ParamSet({"acc/w": np.ones((2, 2), np.float32), "acc/b": arrays["acc/b"]}))

    # Execute / Assert
    with pytest.raises(UpdateRejected, match="accumulator must be float64"):
        WeightedMean(TEMPLATE).merge({"s": forged})


def test_merge_refuses_a_negative_weight() -> None:
    # Prepare
    meta, arrays = decode_partial(folded([(update([[1, 1], [1, 1]], [1, 1]), 1.0)]).partial())
    meta["weight"] = -1.0

    # Execute / Assert
    with pytest.raises(UpdateRejected, match="weight must be a finite number >= 0"):
        WeightedMean(TEMPLATE).merge({"s": encode_partial(meta, arrays)})


def test_metadata_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_partial({"weight": float("nan")}, ParamSet())


def test_a_buffering_aggregator_is_not_mergeable(tmp_path: Any) -> None:
    agg = CoordinateMedian(TEMPLATE, spill_dir=tmp_path, max_buffered=4)

    assert (WeightedMean.mergeable, CoordinateMedian.mergeable) == (True, False)
    with pytest.raises(NotImplementedError, match="cannot be split"):
        agg.partial()
