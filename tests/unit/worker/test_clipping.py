"""DP-FedAvg's clipping: the whole update's L2 norm, bounded by the task's privacy.dp.clip_norm."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.messages import DP_CLIP_NORM_KEY, ClientSettings, ConfigValue
from enclavefl.norms import clip_update, update_norm
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitResult
from enclavefl.worker import ClipUpdate, UpdateContext
from tests.unit.worker.federation import f32

SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)


def context(task_config: dict[str, ConfigValue]) -> UpdateContext:
    empty = ParamSet()
    return UpdateContext(empty, empty, FitResult(4, steps=1), SETTINGS, 1, task_config=task_config)


def test_norm_is_over_every_float_tensor_as_one_vector() -> None:
    # [3] and [[0, 4]] together: sqrt(3^2 + 4^2) = 5; the int counter is not measured.
    update = ParamSet({"a": f32([3.0]), "b": f32([[0.0, 4.0]]), "n": np.array(7, dtype=np.int64)})
    assert update_norm(update) == 5.0


def test_update_above_the_bound_is_scaled_to_it_as_a_whole() -> None:
    # norm 5, bound 1: every float tensor times 1/5 -> [0.6], [[0, 0.8]]; the int counter is kept.
    update = ParamSet({"a": f32([3.0]), "b": f32([[0.0, 4.0]]), "n": np.array(7, dtype=np.int64)})
    clipped = ClipUpdate()(update, context({DP_CLIP_NORM_KEY: 1.0}))
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.0, 0.8]], rtol=1e-6)
    assert clipped["a"].dtype == np.float32
    assert int(clipped["n"]) == 7
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_update_within_the_bound_passes_unchanged() -> None:
    update = ParamSet({"a": f32([3.0, 4.0])})  # norm 5 <= 5
    assert ClipUpdate()(update, context({DP_CLIP_NORM_KEY: 5.0})) is update


def test_task_without_a_bound_passes_the_update_unchanged() -> None:
    update = ParamSet({"a": f32([300.0])})
    assert ClipUpdate()(update, context({})) is update


def test_sparse_rows_are_measured_and_scaled_by_the_rows_they_send() -> None:
    # rows [[6, 8]] of a (3, 2) table: norm 10; bound 2 scales by 1/5 -> [[1.2, 1.6]].
    sparse = SparseRows(np.array([1], dtype=np.int64), f32([[6.0, 8.0]]), (3, 2))
    clipped = clip_update(ParamSet({"emb": sparse}), 2.0)["emb"]
    assert isinstance(clipped, SparseRows)
    np.testing.assert_allclose(clipped.rows, [[1.2, 1.6]], rtol=1e-6)


def test_bound_that_is_not_a_positive_number_is_refused() -> None:
    update = ParamSet({"a": f32([1.0])})
    with pytest.raises(ValueError, match="privacy.dp.clip_norm"):
        ClipUpdate()(update, context({DP_CLIP_NORM_KEY: "big"}))
    with pytest.raises(ValueError, match="clip_norm must be a positive"):
        ClipUpdate()(update, context({DP_CLIP_NORM_KEY: 0.0}))


def test_update_that_is_not_finite_cannot_be_clipped() -> None:
    with pytest.raises(ValueError, match="norm is nan"):
        clip_update(ParamSet({"a": f32([np.nan])}), 1.0)
