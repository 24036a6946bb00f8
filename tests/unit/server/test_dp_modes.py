"""DP-FedAvg's variants on the PS: adaptive clipping (Andrew et al. 2021) and distributed noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import DpConfig, JobConfig, parse_job
from enclavefl.errors import UpdateRejected
from enclavefl.messages import DP_ADAPTIVE_KEY, DP_CLIP_NORM_KEY, DP_NOISE_STD_KEY, DP_UNCLIPPED_TENSOR, ClientSettings
from enclavefl.server.algorithms import CloseContext
from enclavefl.server.dp import ClippedMean, DpFedAvg, noise_norm_bound, with_unclipped_bit
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.training import FitResult
from enclavefl.worker import DistributedNoise, UpdateContext
from tests.unit.server.live_job import INITIAL, f32
from tests.unit.server.test_dp import independent_epsilon, run_job

BIT_TEMPLATE = with_unclipped_bit(StreamHeader.of(INITIAL))


def bit(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def adaptive(z: float = 0.0, stddev: float | None = None, **dp: Any) -> DpConfig:
    section: dict[str, Any] = {"enabled": True, "noise_multiplier": z,
                               "adaptive_clipping": {"enabled": True, "clipped_count_stddev": stddev}, **dp}
    return DpConfig.model_validate(section)


def test_unclipped_bit_is_a_float32_scalar_after_the_model() -> None:
    spec = BIT_TEMPLATE.tensors[-1]
    assert (spec.name, spec.dtype, spec.shape) == (DP_UNCLIPPED_TENSOR, "float32", ())
    assert BIT_TEMPLATE.tensors[:-1] == StreamHeader.of(INITIAL).tensors


def test_clipped_mean_averages_the_bits_and_leaves_them_out_of_the_norm() -> None:
    # Update 1 has norm exactly 1 = C (b = [0.6, 0.8]) and bit 1: counting the bit would give sqrt(2) > C.
    mean = ClippedMean(BIT_TEMPLATE, 1.0)
    zeros = f32([[0.0, 0.0], [0.0, 0.0]])
    mean.add(ParamSet({"w": zeros, "b": f32([0.6, 0.8]), DP_UNCLIPPED_TENSOR: bit(1.0)}), 10.0)
    mean.add(ParamSet({"w": zeros, "b": f32([0.0, 0.0]), DP_UNCLIPPED_TENSOR: bit(0.0)}), 1.0)
    result = mean.result()
    assert float(result[DP_UNCLIPPED_TENSOR]) == 0.5  # (1 + 0) / 2, equal weights
    np.testing.assert_allclose(result["b"], [0.3, 0.4], rtol=1e-6)


def test_clipped_mean_refuses_a_bit_other_than_zero_or_one() -> None:
    mean = ClippedMean(BIT_TEMPLATE, 1.0)
    update = ParamSet({"w": f32([[0.0, 0.0], [0.0, 0.0]]), "b": f32([0.0, 0.0]), DP_UNCLIPPED_TENSOR: bit(0.5)})
    with pytest.raises(UpdateRejected, match="must be 0 or 1"):
        mean.add(update, 1.0)
    assert mean.count == 0


def test_noise_norm_bound_is_std_times_root_d_plus_eight() -> None:
    # 0.5 * (sqrt(16) + 8) = 6
    assert noise_norm_bound(0.5, 16) == 6.0
    assert noise_norm_bound(0.0, 16) == 0.0


def test_clipped_mean_admits_the_noise_slack_and_no_more() -> None:
    # C = 1 plus slack 2: a norm of 2.9 passes ([2.9, 0]), 3.1 does not.
    mean = ClippedMean(StreamHeader.of(INITIAL), 1.0, noise_slack=2.0)
    zeros = f32([[0.0, 0.0], [0.0, 0.0]])
    mean.add(ParamSet({"w": zeros, "b": f32([2.9, 0.0])}), 1.0)
    with pytest.raises(UpdateRejected, match="plus the noise's bound 2"):
        mean.add(ParamSet({"w": zeros, "b": f32([3.1, 0.0])}), 1.0)


def test_post_process_takes_the_bit_out_and_moves_the_bound() -> None:
    # 4 of 4 sampled, mean bit 0.75 -> 3 unclipped, b = 0.75; no noise (z = 0).
    # C = 1 * exp(-0.2 * (0.75 - 0.5)) = exp(-0.05) = 0.9512294
    dp = DpFedAvg(adaptive(), seed=1)
    assert dp.may_open(1, 4, 4) is None
    out = dp.post_process(ParamSet({"b": f32([1.0, 2.0]), DP_UNCLIPPED_TENSOR: bit(0.75)}),
                          CloseContext(1, participants=4, num_workers=4))
    assert list(out) == ["b"]
    np.testing.assert_array_equal(out["b"], [1.0, 2.0])
    row = dp.row()
    assert (row["dp_clip_norm"], row["dp_unclipped_fraction"]) == (1.0, 0.75)
    assert dp.clip_norm == pytest.approx(0.9512294, abs=1e-7)
    config = dp.task_config({"other": 1})
    assert dict(config) == {"other": 1, DP_CLIP_NORM_KEY: dp.clip_norm, DP_ADAPTIVE_KEY: True}


def test_task_config_is_a_live_view_of_the_bound() -> None:
    dp = DpFedAvg(adaptive(), seed=1)
    config = dp.task_config({})
    assert config[DP_CLIP_NORM_KEY] == 1.0
    dp.may_open(1, 2, 2)
    dp.post_process(ParamSet({"b": f32([0.0, 0.0]), DP_UNCLIPPED_TENSOR: bit(0.0)}), CloseContext(1, 2, 2))
    # b = 0: C = exp(0.2 * 0.5) = exp(0.1) = 1.1051709
    assert config[DP_CLIP_NORM_KEY] == pytest.approx(1.1051709, abs=1e-7)


def test_adaptive_noise_uses_the_update_noise_multiplier() -> None:
    # z = 1, sigma_b = 1: z_delta = 1.1547005; C = 1, m = 4: std = 1.1547005 / 4 = 0.2886751
    dp = DpFedAvg(adaptive(z=1.0, stddev=1.0), seed=2)
    dp.may_open(1, 4, 4)
    zeros = np.zeros((300, 300), dtype=np.float32)
    out = dp.post_process(ParamSet({"w": zeros, DP_UNCLIPPED_TENSOR: bit(0.5)}), CloseContext(1, 4, 4))["w"]
    assert float(np.std(out)) == pytest.approx(0.2886751, rel=0.01)


def test_distributed_mode_adds_no_noise_and_tells_workers_their_share() -> None:
    # z = 1, C = 2, round.min_updates = 4: each worker adds std 1 * 2 / sqrt(4) = 1.
    dp = DpFedAvg(DpConfig(enabled=True, mode="distributed", clip_norm=2.0, noise_multiplier=1.0), seed=1,
                  min_updates=4)
    assert dp.task_config({})[DP_NOISE_STD_KEY] == 1.0
    dp.may_open(1, 4, 4)
    # 3 of 4 sampled sent: the mean over them, times 3/4, and nothing added.
    out = dp.post_process(ParamSet({"b": f32([4.0, -8.0])}), CloseContext(1, participants=3, num_workers=4))
    np.testing.assert_array_equal(out["b"], [3.0, -6.0])
    assert dp.row()["dp_worker_noise_std"] == 1.0


def test_distributed_aggregator_admits_a_workers_noise() -> None:
    # std 1 on 6 float values: slack 1 * (sqrt(6) + 8) = 10.449
    dp = DpFedAvg(DpConfig(enabled=True, mode="distributed", clip_norm=2.0, noise_multiplier=1.0), seed=1,
                  min_updates=4)
    aggregator = dp.aggregator(StreamHeader.of(INITIAL))
    assert isinstance(aggregator, ClippedMean)
    assert aggregator.noise_slack == pytest.approx(np.sqrt(6) + 8)


# ------------------------------------------------------------------ live jobs

def dp_job(rounds: int, dp: dict[str, Any], *, min_updates: int = 1) -> JobConfig:
    return parse_job({
        "job": {"name": "dpx", "rounds": rounds, "workers": 2, "seed": 3},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0,
                  "min_updates": min_updates},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "privacy": {"dp": {"enabled": True, **dp}},
        "management": {"enabled": False},
    })


ADAPTIVE = {"noise_multiplier": 1.0, "adaptive_clipping": {"enabled": True, "clipped_count_stddev": 1.0}}


def test_adaptive_job_reports_its_bound_and_resumes_bit_identically(tmp_path: Path) -> None:
    straight = run_job(dp_job(4, ADAPTIVE), tmp_path / "straight")
    run_job(dp_job(2, ADAPTIVE), tmp_path / "resumed")
    resumed = run_job(dp_job(4, ADAPTIVE), tmp_path / "resumed", resume=True)
    bounds = [row["dp_clip_norm"] for row in straight.metrics.history]
    assert bounds[0] == 1.0 and len(set(bounds)) == 4  # the bound moves every round
    assert [row["dp_clip_norm"] for row in resumed.metrics.history] == bounds
    for name in INITIAL:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    # The accountant still composes rounds at z = 1.
    assert straight.metrics.history[-1]["dp_epsilon"] == pytest.approx(independent_epsilon(1.0, 1.0, 4, 1e-5),
                                                                       abs=1e-6)


def test_distributed_job_completes_with_the_workers_noise(tmp_path: Path) -> None:
    ps = run_job(dp_job(2, {"mode": "distributed", "noise_multiplier": 1.0}, min_updates=2), tmp_path)
    rows = ps.metrics.history
    assert [row["dp_worker_noise_std"] for row in rows] == [pytest.approx(1 / np.sqrt(2))] * 2
    assert rows[-1]["dp_epsilon"] == pytest.approx(independent_epsilon(1.0, 1.0, 2, 1e-5), abs=1e-6)
    # Each round moves every weight by the clipped mean (1/sqrt(6) each) plus the workers' noise: not exactly.
    assert not np.allclose(ps.params["w"], 2 / np.sqrt(6))


def test_min_updates_worker_shares_sum_to_central_noise() -> None:
    # z = 1, C = 2, u = 4: each worker adds std 1; the sum of 4 workers' noise has std sqrt(4 * 1^2) = 2 = z C,
    # the standard deviation central mode adds to the sum.
    dp = DpFedAvg(DpConfig(enabled=True, mode="distributed", clip_norm=2.0, noise_multiplier=1.0), seed=1,
                  min_updates=4)
    empty = ParamSet()
    context = UpdateContext(empty, empty, FitResult(4, steps=1), ClientSettings(epochs=1, batch_size=4, lr=0.5), 1,
                            task_config=dict(dp.task_config({})))
    zeros = ParamSet({"w": np.zeros((200, 200), dtype=np.float64)})
    total = sum(DistributedNoise(np.random.default_rng(i))(zeros, context)["w"] for i in range(4))
    assert float(np.std(total)) == pytest.approx(2.0, rel=0.01)
