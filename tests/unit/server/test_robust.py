"""Tests for enclavefl.server.robust: median, trimmed mean, Krum and norm bounding."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.errors import ClosedError, UpdateRejected
from enclavefl.server import robust
from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.robust import AGGREGATORS, CoordinateMedian, Krum, NormBounded, TrimmedMean
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, Tensor


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def dense(value: Tensor) -> npt.NDArray[Any]:
    """The array behind a dense tensor (fails the test on a SparseRows)."""
    assert isinstance(value, np.ndarray), type(value)
    return value


def header(**tensors: npt.NDArray[Any]) -> StreamHeader:
    return StreamHeader.of(ParamSet(tensors))


W3 = header(w=np.zeros(3, np.float32))
W2 = header(w=np.zeros(2, np.float32))


def w(*values: float) -> ParamSet:
    return ParamSet({"w": f32(values)})


Buffering = Callable[[StreamHeader, Path], Aggregator]

# One factory per buffering aggregator, with settings that accept 3 updates.
BUFFERING: dict[str, Buffering] = {
    "median": lambda t, d: CoordinateMedian(t, spill_dir=d, max_buffered=8),
    "trimmed_mean": lambda t, d: TrimmedMean(t, spill_dir=d, max_buffered=8, trim_ratio=0.34),
    "krum": lambda t, d: Krum(t, spill_dir=d, max_buffered=8, byzantine=0),
}


# --- coordinate-wise median ---


def test_median_of_three_updates(tmp_path: Path) -> None:
    # Prepare
    agg = CoordinateMedian(W3, spill_dir=tmp_path, max_buffered=4)

    # Execute
    for update in (w(1, 5, -2), w(3, 0, 4), w(2, 9, 100)):
        agg.add(update, 1.0)
    result = agg.result()

    # Assert: per coordinate, sorted: [1,2,3] -> 2, [0,5,9] -> 5, [-2,4,100] -> 4
    np.testing.assert_array_equal(result["w"], f32([2, 5, 4]))
    assert dense(result["w"]).dtype == np.float32
    assert agg.count == 3


def test_median_of_four_updates_averages_the_two_middle_values(tmp_path: Path) -> None:
    # Prepare
    agg = CoordinateMedian(W3, spill_dir=tmp_path, max_buffered=4)

    # Execute
    for update in (w(1, 5, -2), w(3, 0, 4), w(2, 9, 100), w(10, 1, 0)):
        agg.add(update, 1.0)

    # Assert: sorted [1,2,3,10] -> (2+3)/2, [0,1,5,9] -> (1+5)/2, [-2,0,4,100] -> (0+4)/2
    np.testing.assert_array_equal(agg.result()["w"], f32([2.5, 3, 2]))


def test_median_ignores_the_claimed_weights(tmp_path: Path) -> None:
    # A huge claimed weight on the outlier must not pull the median toward it.
    agg = CoordinateMedian(W3, spill_dir=tmp_path, max_buffered=4)

    agg.add(w(1, 1, 1), 1.0)
    agg.add(w(2, 2, 2), 1.0)
    agg.add(w(1000, 1000, 1000), 1e9)

    np.testing.assert_array_equal(agg.result()["w"], f32([2, 2, 2]))


def test_median_of_sparse_updates_counts_untouched_rows_as_zero(tmp_path: Path) -> None:
    # Prepare: a (3, 2) embedding; two workers send only the rows they touched.
    agg = CoordinateMedian(header(emb=np.zeros((3, 2), np.float32)), spill_dir=tmp_path, max_buffered=4)
    u1 = ParamSet({"emb": SparseRows(np.array([0]), f32([[1, 1]]), (3, 2))})
    u2 = ParamSet({"emb": SparseRows(np.array([0, 2]), f32([[3, 3], [5, 5]]), (3, 2))})
    u3 = ParamSet({"emb": f32([[2, 2], [7, 7], [9, 9]])})

    # Execute
    for update in (u1, u2, u3):
        agg.add(update, 1.0)

    # Assert: densified, row 0: [1,3,2] -> 2; row 1: [0,0,7] -> 0; row 2: [0,5,9] -> 5
    np.testing.assert_array_equal(agg.result()["emb"], f32([[2, 2], [0, 0], [5, 5]]))


def test_integer_tensors_are_rounded_half_to_even_and_keep_their_dtype(tmp_path: Path) -> None:
    agg = CoordinateMedian(header(steps=np.zeros(2, np.int64)), spill_dir=tmp_path, max_buffered=2)

    agg.add(ParamSet({"steps": np.array([1, 3], np.int64)}), 1.0)
    agg.add(ParamSet({"steps": np.array([4, 4], np.int64)}), 1.0)
    result = dense(agg.result()["steps"])

    # (1+4)/2 = 2.5 -> 2 (half to even); (3+4)/2 = 3.5 -> 4
    np.testing.assert_array_equal(result, [2, 4])
    assert result.dtype == np.int64


def test_float64_template_keeps_float64_precision(tmp_path: Path) -> None:
    agg = CoordinateMedian(header(x=np.zeros(1, np.float64)), spill_dir=tmp_path, max_buffered=3)
    tiny = 2.0**-40  # lost in float32: 1 + 2**-40 rounds to 1

    for value in (1.0, 1.0 + tiny, 1.0 + 2 * tiny):
        agg.add(ParamSet({"x": np.array([value])}), 1.0)

    assert dense(agg.result()["x"])[0] == 1.0 + tiny


# --- trimmed mean ---


def test_trimmed_mean_drops_the_outliers_at_both_ends(tmp_path: Path) -> None:
    # Prepare: n = 5, trim_ratio 0.2 -> k = 1 dropped at each end.
    agg = TrimmedMean(W3, spill_dir=tmp_path, max_buffered=5, trim_ratio=0.2)
    updates = [w(1, -500, 5), w(2, 10, 5), w(3, 20, 5), w(4, 30, 5), w(1000, 40, 5)]

    # Execute
    for update in updates:
        agg.add(update, 1.0)

    # Assert: [1,2,3,4,1000] -> mean(2,3,4) = 3; [-500,10,20,30,40] -> mean(10,20,30) = 20; 5
    np.testing.assert_array_equal(agg.result()["w"], f32([3, 20, 5]))


def test_trimmed_mean_with_too_few_updates_to_trim_is_the_plain_mean(tmp_path: Path) -> None:
    # n = 4, trim_ratio 0.2 -> k = floor(0.8) = 0: nothing dropped.
    agg = TrimmedMean(W3, spill_dir=tmp_path, max_buffered=4, trim_ratio=0.2)

    for update in (w(0, 0, 0), w(1, 2, 3), w(2, 4, 6), w(5, 6, 7)):
        agg.add(update, 1.0)

    # (0+1+2+5)/4 = 2, (0+2+4+6)/4 = 3, (0+3+6+7)/4 = 4
    np.testing.assert_array_equal(agg.result()["w"], f32([2, 3, 4]))


def test_trimmed_mean_that_would_drop_everything_is_refused(tmp_path: Path) -> None:
    # n = 2, trim_ratio just below 0.5: k = floor(0.9999999999998 + slack) = 1, 2k >= n.
    agg = TrimmedMean(W3, spill_dir=tmp_path, max_buffered=2, trim_ratio=0.4999999999999)
    agg.add(w(1, 1, 1), 1.0)
    agg.add(w(2, 2, 2), 1.0)

    with pytest.raises(UpdateRejected, match=r"trim_ratio=0\.4999999999999.*n=2"):
        agg.result()


@pytest.mark.parametrize("ratio", [0.5, -0.1, float("nan"), True])
def test_trim_ratio_out_of_range_is_refused(tmp_path: Path, ratio: float) -> None:
    with pytest.raises(ValueError, match="trim_ratio"):
        TrimmedMean(W3, spill_dir=tmp_path, max_buffered=2, trim_ratio=ratio)


# --- Krum ---

# Five honest updates near the origin and two far away, interleaved by index:
#   0:(0,0)  1:B(100,100)  2:(1,0)  3:(0,1)  4:B(100,101)  5:(1,1)  6:(2,0)
# Squared distances between honest ones:
#   (0,0)-(1,0)=1 (0,0)-(0,1)=1 (0,0)-(1,1)=2 (0,0)-(2,0)=4
#   (1,0)-(0,1)=2 (1,0)-(1,1)=1 (1,0)-(2,0)=1
#   (0,1)-(1,1)=1 (0,1)-(2,0)=5 (1,1)-(2,0)=2
# n=7, f=2: each scores its n-f-2 = 3 nearest others:
#   0: 1+1+2=4   2: 1+1+1=3   3: 1+1+2=4   5: 1+1+2=4   6: 1+2+4=7
#   1 and 4: one neighbour at 1, two honest ones at ~2*100^2: ~39,000
SEVEN = [(0, 0), (100, 100), (1, 0), (0, 1), (100, 101), (1, 1), (2, 0)]


def krum_with_seven(tmp_path: Path, multi: int) -> Krum:
    agg = Krum(W2, spill_dir=tmp_path, max_buffered=7, byzantine=2, multi=multi)
    for point in SEVEN:
        agg.add(w(*point), 1.0)
    return agg


def test_krum_selects_the_update_closest_to_the_honest_cluster(tmp_path: Path) -> None:
    agg = krum_with_seven(tmp_path, multi=1)

    result = agg.result()

    # Lowest score is index 2, the point (1, 0).
    np.testing.assert_array_equal(result["w"], f32([1, 0]))
    assert agg.selected == (2,)
    assert agg.scores[2] == pytest.approx(3.0)


def test_multi_krum_averages_the_selected_honest_updates(tmp_path: Path) -> None:
    agg = krum_with_seven(tmp_path, multi=4)

    result = agg.result()

    # Scores 3, 4, 4, 4 -> indices 2, 0, 3, 5; mean of (1,0),(0,0),(0,1),(1,1) = (0.5, 0.5)
    assert agg.selected == (0, 2, 3, 5)
    np.testing.assert_array_equal(result["w"], f32([0.5, 0.5]))


def test_krum_ignores_the_claimed_weights(tmp_path: Path) -> None:
    agg = Krum(W2, spill_dir=tmp_path, max_buffered=7, byzantine=2)
    for index, point in enumerate(SEVEN):
        agg.add(w(*point), 1e9 if index in (1, 4) else 1.0)

    np.testing.assert_array_equal(agg.result()["w"], f32([1, 0]))


def test_krum_with_fewer_than_2f_plus_3_updates_is_refused(tmp_path: Path) -> None:
    agg = Krum(W2, spill_dir=tmp_path, max_buffered=7, byzantine=2)
    for point in SEVEN[:6]:
        agg.add(w(*point), 1.0)

    with pytest.raises(UpdateRejected, match=r"f=2.*n=6"):
        agg.result()
    assert agg.selected == ()


def test_krum_selecting_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    agg = Krum(W2, spill_dir=tmp_path, max_buffered=7, byzantine=0, multi=4)
    for point in SEVEN[:3]:
        agg.add(w(*point), 1.0)

    with pytest.raises(UpdateRejected, match=r"multi=4.*n=3"):
        agg.result()


@pytest.mark.parametrize(("byzantine", "multi"), [(-1, 1), (0, 0), (1.5, 1), (True, 1)])
def test_krum_settings_out_of_range_are_refused(tmp_path: Path, byzantine: Any, multi: Any) -> None:
    with pytest.raises(ValueError, match="Krum"):
        Krum(W2, spill_dir=tmp_path, max_buffered=7, byzantine=byzantine, multi=multi)


# --- behaviour shared by the buffering aggregators ---


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_tiny_blocks_give_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Prepare: 5 updates of a 4 + 3 = 7-coordinate model, so 2-coordinate blocks
    # cut through a tensor and the last block is short.
    rng = np.random.default_rng(7)
    template = header(a=np.zeros((2, 2), np.float32), b=np.zeros(3, np.float32))
    updates = [
        ParamSet({"a": rng.normal(size=(2, 2)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)})
        for _ in range(5)
    ]

    def run(directory: Path) -> ParamSet:
        directory.mkdir()
        agg = BUFFERING[name](template, directory)
        for update in updates:
            agg.add(update, 1.0)
        return agg.result()

    # Execute
    whole = run(tmp_path / "whole")
    monkeypatch.setattr(robust, "BLOCK_COORDS", 2)
    tiny = run(tmp_path / "tiny")

    # Assert: bit for bit
    assert tiny == whole


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_buffering_aggregators_say_so(tmp_path: Path, name: str) -> None:
    agg = BUFFERING[name](W3, tmp_path)

    assert agg.buffers is True


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_buffering_aggregator_with_zero_updates_is_refused(tmp_path: Path, name: str) -> None:
    agg = BUFFERING[name](W3, tmp_path)

    with pytest.raises(UpdateRejected, match="zero updates"):
        agg.result()


BAD_ADDS: dict[str, tuple[ParamSet, float]] = {
    "wrong shape": (ParamSet({"w": f32([1, 2])}), 1.0),
    "wrong name": (ParamSet({"v": f32([1, 2, 3])}), 1.0),
    "wrong dtype": (ParamSet({"w": np.array([1, 2, 3], np.float64)}), 1.0),
    "zero weight": (w(1, 2, 3), 0.0),
    "nan weight": (w(1, 2, 3), float("nan")),
    "nan value": (w(1, float("nan"), 3), 1.0),
    "inf value": (w(1, float("inf"), 3), 1.0),
}


@pytest.mark.parametrize("bad", sorted(BAD_ADDS))
@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_rejected_add_leaves_the_aggregate_unchanged(tmp_path: Path, name: str, bad: str) -> None:
    # Prepare
    agg = BUFFERING[name](W3, tmp_path)
    for update in (w(1, 5, -2), w(3, 0, 4), w(2, 9, 100)):
        agg.add(update, 1.0)
    before = agg.result()
    update, weight = BAD_ADDS[bad]

    # Execute
    with pytest.raises(UpdateRejected):
        agg.add(update, weight)

    # Assert
    assert agg.count == 3
    assert agg.result() == before


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_full_buffer_refuses_naming_the_setting(tmp_path: Path, name: str) -> None:
    agg = BUFFERING[name](W3, tmp_path)
    for i in range(8):  # the factories allow 8
        agg.add(w(i, i, i), 1.0)

    with pytest.raises(UpdateRejected, match=r"8 updates.*server\.max_buffered_updates"):
        agg.add(w(0, 0, 0), 1.0)
    assert agg.count == 8


@pytest.mark.parametrize("name", sorted(BUFFERING))
def test_close_deletes_the_spill_file_and_later_use_raises(tmp_path: Path, name: str) -> None:
    agg = BUFFERING[name](W3, tmp_path)
    agg.add(w(1, 2, 3), 1.0)
    assert len(list(tmp_path.iterdir())) == 1

    agg.close()
    agg.close()

    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ClosedError):
        agg.add(w(1, 2, 3), 1.0)
    with pytest.raises(ClosedError):
        agg.result()


def test_max_buffered_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_buffered must be an int >= 1"):
        CoordinateMedian(W3, spill_dir=tmp_path, max_buffered=0)


def test_concurrent_adds_are_all_kept(tmp_path: Path) -> None:
    agg = CoordinateMedian(W3, spill_dir=tmp_path, max_buffered=9)
    threads = [threading.Thread(target=agg.add, args=(w(i, -i, 2 * i), 1.0)) for i in range(9)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    # Median of 0..8 is 4; of 0..-8 is -4; of 0,2,..,16 is 8.
    assert agg.count == 9
    np.testing.assert_array_equal(agg.result()["w"], f32([4, -4, 8]))


# --- norm bounding ---


def test_norm_bounding_scales_a_large_update_down_to_the_bound() -> None:
    agg = NormBounded(W2, max_norm=1.0)

    agg.add(w(3, 4), 1.0)

    # ||(3, 4)|| = 5 > 1: scaled by 1/5 to (0.6, 0.8)
    np.testing.assert_allclose(dense(agg.result()["w"]), [0.6, 0.8], rtol=1e-6)
    assert agg.clipped == 1


def test_norm_bounding_leaves_a_small_update_untouched() -> None:
    agg = NormBounded(W2, max_norm=1.0)

    agg.add(w(0.3, 0.4), 1.0)

    # ||(0.3, 0.4)|| = 0.5 <= 1: unchanged
    assert agg.result() == w(0.3, 0.4)
    assert agg.clipped == 0


def test_norm_bounded_mean_uses_the_weights_after_bounding() -> None:
    agg = NormBounded(W2, max_norm=1.0)

    agg.add(w(30, 40), 1.0)   # norm 50 -> (0.6, 0.8)
    agg.add(w(0, 0.5), 3.0)   # norm 0.5, unchanged

    # (1*(0.6, 0.8) + 3*(0, 0.5)) / 4 = (0.15, 0.575)
    np.testing.assert_allclose(dense(agg.result()["w"]), [0.15, 0.575], rtol=1e-6)
    assert (agg.count, agg.clipped, agg.total_weight) == (2, 1, 4.0)


def test_norm_counts_every_float_tensor_and_sparse_rows() -> None:
    # (3,) on a dense tensor and (4,) in a sparse row: global norm 5, not 3 or 4.
    template = header(bias=np.zeros(1, np.float32), emb=np.zeros((3, 1), np.float32))
    agg = NormBounded(template, max_norm=1.0)
    tensors: dict[str, Tensor] = {"bias": f32([3]), "emb": SparseRows(np.array([1]), f32([[4]]), (3, 1))}
    update = ParamSet(tensors)

    agg.add(update, 1.0)
    result = agg.result()

    np.testing.assert_allclose(dense(result["bias"]), [0.6], rtol=1e-6)
    np.testing.assert_allclose(dense(result["emb"]), [[0.0], [0.8], [0.0]], rtol=1e-6)


def test_norm_bounding_leaves_integer_tensors_out() -> None:
    template = header(w=np.zeros(2, np.float32), steps=np.zeros(1, np.int64))
    agg = NormBounded(template, max_norm=1.0)

    tensors: dict[str, Tensor] = {"w": f32([0.3, 0.4]), "steps": np.array([1000], np.int64)}
    agg.add(ParamSet(tensors), 1.0)
    result = agg.result()

    # 0.5 <= 1 once the integer 1000 is left out of the norm; 1000 is not scaled either.
    assert agg.clipped == 0
    np.testing.assert_array_equal(result["steps"], [1000])


@pytest.mark.parametrize("bad", sorted(BAD_ADDS))
def test_norm_bounded_rejected_add_leaves_the_aggregate_unchanged(bad: str) -> None:
    agg = NormBounded(W3, max_norm=1.0)
    agg.add(w(3, 4, 0), 1.0)
    before = agg.result()
    update, weight = BAD_ADDS[bad]

    with pytest.raises(UpdateRejected):
        agg.add(update, weight)

    assert (agg.count, agg.clipped) == (1, 1)
    assert agg.result() == before


def test_norm_bounded_with_zero_updates_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="zero updates"):
        NormBounded(W2, max_norm=1.0).result()


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_max_norm_must_be_positive_and_finite(bound: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        NormBounded(W2, max_norm=bound)


def test_norm_bounded_streams() -> None:
    assert NormBounded.buffers is False


# --- registry ---


def test_registry_builds_each_aggregator_from_keywords(tmp_path: Path) -> None:
    built = {
        "mean": AGGREGATORS["mean"](W2),
        "median": AGGREGATORS["median"](W2, spill_dir=tmp_path, max_buffered=3),
        "trimmed_mean": AGGREGATORS["trimmed_mean"](W2, spill_dir=tmp_path, max_buffered=3, trim_ratio=0.1),
        "krum": AGGREGATORS["krum"](W2, spill_dir=tmp_path, max_buffered=3, byzantine=0, multi=1),
        "norm_bounded": AGGREGATORS["norm_bounded"](W2, max_norm=1.0),
    }

    assert set(built) == set(AGGREGATORS)
    assert type(built["mean"]) is WeightedMean
    assert [name for name, agg in sorted(built.items()) if agg.buffers] == ["krum", "median", "trimmed_mean"]
    for agg in built.values():
        agg.close()
        agg.close()
    assert list(tmp_path.iterdir()) == []
