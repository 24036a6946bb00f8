"""The worker's noise steps: its share of distributed DP's noise, local DP's Gaussian noise and SignDS's release."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.gaussian_mechanism import analytic_gaussian_sigma
from enclavefl.messages import (
    DP_ADAPTIVE_KEY,
    DP_CLIP_NORM_KEY,
    DP_NOISE_STD_KEY,
    DP_UNCLIPPED_TENSOR,
    LOCAL_DP_CLIP_NORM_KEY,
    LOCAL_DP_DELTA_KEY,
    LOCAL_DP_DIMS_OUT_KEY,
    LOCAL_DP_EPSILON_KEY,
    LOCAL_DP_MECHANISM_KEY,
    LOCAL_DP_THRESHOLD_RATIO_KEY,
    LOCAL_DP_TOP_K_KEY,
    SIGNDS_INDICES_TENSOR,
    SIGNDS_SIGN_TENSOR,
    ClientSettings,
    ConfigValue,
)
from enclavefl.norms import update_norm
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitResult
from enclavefl.worker import ClipUpdate, DistributedNoise, LocalDp, UpdateContext
from tests.unit.worker.federation import f32

SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)


def context(task_config: dict[str, ConfigValue]) -> UpdateContext:
    empty = ParamSet()
    return UpdateContext(empty, empty, FitResult(4, steps=1), SETTINGS, 1, task_config=task_config)


def big_update() -> ParamSet:
    return ParamSet({"w": np.zeros((200, 200), dtype=np.float32), "n": np.array(7, dtype=np.int64)})


# ------------------------------------------------------------------ adaptive clipping's bit

def test_clip_appends_the_bit_measured_before_clipping() -> None:
    # norm 5 > C = 1: clipped, bit 0; norm 5 <= C = 6: unchanged, bit 1.
    update = ParamSet({"a": f32([3.0, 4.0])})
    clipped = ClipUpdate()(update, context({DP_CLIP_NORM_KEY: 1.0, DP_ADAPTIVE_KEY: True}))
    assert list(clipped) == ["a", DP_UNCLIPPED_TENSOR]
    assert float(clipped[DP_UNCLIPPED_TENSOR]) == 0.0 and clipped[DP_UNCLIPPED_TENSOR].dtype == np.float32
    assert update_norm(ParamSet({"a": clipped["a"]})) == pytest.approx(1.0, rel=1e-6)
    kept = ClipUpdate()(update, context({DP_CLIP_NORM_KEY: 6.0, DP_ADAPTIVE_KEY: True}))
    assert float(kept[DP_UNCLIPPED_TENSOR]) == 1.0


def test_clip_without_adaptive_clipping_appends_no_bit() -> None:
    assert list(ClipUpdate()(ParamSet({"a": f32([3.0, 4.0])}), context({DP_CLIP_NORM_KEY: 1.0}))) == ["a"]


# ------------------------------------------------------------------ distributed DP

def test_distributed_noise_is_a_no_op_without_the_tasks_std() -> None:
    update = big_update()
    assert DistributedNoise(np.random.default_rng(0))(update, context({})) is update


def test_distributed_noise_has_the_tasks_std_on_float_tensors_only() -> None:
    out = DistributedNoise(np.random.default_rng(0))(big_update(), context({DP_NOISE_STD_KEY: 0.5}))
    assert float(np.std(out["w"])) == pytest.approx(0.5, rel=0.01)
    assert out["w"].dtype == np.float32
    assert int(out["n"]) == 7


def test_distributed_noise_makes_sparse_rows_dense_so_untouched_rows_are_noised_too() -> None:
    table = SparseRows.from_dense(np.ones((4, 2), dtype=np.float32), np.array([1]))
    out = DistributedNoise(np.random.default_rng(0))(ParamSet({"emb": table}), context({DP_NOISE_STD_KEY: 1.0}))
    noised = out["emb"]
    assert isinstance(noised, np.ndarray) and noised.shape == (4, 2)
    assert np.all(noised[[0, 2, 3]] != 0)


def test_distributed_noise_refuses_a_negative_std() -> None:
    with pytest.raises(ValueError, match="privacy.dp.noise_std"):
        DistributedNoise()(big_update(), context({DP_NOISE_STD_KEY: -1.0}))


# ------------------------------------------------------------------ local DP

GAUSSIAN: dict[str, ConfigValue] = {LOCAL_DP_MECHANISM_KEY: "gaussian", LOCAL_DP_EPSILON_KEY: 8.0,
                                    LOCAL_DP_DELTA_KEY: 1e-5, LOCAL_DP_CLIP_NORM_KEY: 0.5}


def test_local_dp_is_a_no_op_without_a_mechanism() -> None:
    update = big_update()
    assert LocalDp()(update, context({})) is update


def test_local_gaussian_noise_is_calibrated_for_sensitivity_twice_the_clip() -> None:
    expected = analytic_gaussian_sigma(8.0, 1e-5, 1.0)  # sensitivity 2 * 0.5
    step = LocalDp(np.random.default_rng(0))
    assert step.sigma(8.0, 1e-5, 0.5) == expected
    out = step(big_update(), context(GAUSSIAN))
    assert float(np.std(out["w"])) == pytest.approx(expected, rel=0.01)


def test_local_gaussian_clips_before_the_noise() -> None:
    # [3, 4] clipped to 0.5 is [0.3, 0.4]; the noise has mean 0, so the mean over many draws is the clipped update.
    update = ParamSet({"a": f32([3.0, 4.0])})
    step = LocalDp(np.random.default_rng(1))
    draws = np.stack([step(update, context(GAUSSIAN))["a"] for _ in range(4000)])
    sigma = step.sigma(8.0, 1e-5, 0.5)
    np.testing.assert_allclose(draws.mean(axis=0), [0.3, 0.4], atol=5 * sigma / np.sqrt(4000))


@pytest.mark.parametrize(("key", "value"), [(LOCAL_DP_EPSILON_KEY, 0.0), (LOCAL_DP_DELTA_KEY, 1.0),
                                            (LOCAL_DP_CLIP_NORM_KEY, True), (LOCAL_DP_MECHANISM_KEY, "laplace")])
def test_local_dp_refuses_a_parameter_out_of_range(key: str, value: ConfigValue) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LocalDp()(big_update(), context({**GAUSSIAN, key: value}))


def test_signds_uploads_the_indices_and_the_sign_only() -> None:
    config: dict[str, ConfigValue] = {LOCAL_DP_MECHANISM_KEY: "signds", LOCAL_DP_EPSILON_KEY: 50.0,
                                      LOCAL_DP_TOP_K_KEY: 2, LOCAL_DP_DIMS_OUT_KEY: 2,
                                      LOCAL_DP_THRESHOLD_RATIO_KEY: 1.0}
    # Flattened float values in tensor order: a = [5, -1, 0], b = [3, -4, 2]; the int counter is skipped.
    update = ParamSet({"a": f32([5.0, -1.0, 0.0]), "n": np.array(7, dtype=np.int64), "b": f32([3.0, -4.0, 2.0])})
    out = LocalDp(np.random.default_rng(3))(update, context(config))
    assert list(out) == [SIGNDS_INDICES_TENSOR, SIGNDS_SIGN_TENSOR]
    sign = int(out[SIGNDS_SIGN_TENSOR][0])
    assert out[SIGNDS_INDICES_TENSOR].tolist() == ([0, 3] if sign == 1 else [1, 4])


def test_local_dp_refuses_a_task_above_the_workers_own_limits() -> None:
    with pytest.raises(ValueError, match="above this worker's own limit 4"):
        LocalDp(max_epsilon=4.0)(big_update(), context(GAUSSIAN))  # the task asks for epsilon 8
    with pytest.raises(ValueError, match="above this worker's own limit 1e-06"):
        LocalDp(max_delta=1e-6)(big_update(), context(GAUSSIAN))  # the task asks for delta 1e-5
    assert LocalDp(max_epsilon=8.0, max_delta=1e-5)(big_update(), context(GAUSSIAN))["w"].shape == (200, 200)
