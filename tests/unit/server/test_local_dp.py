"""Local DP on the PS: the composed epsilon, SignDS's checks and reconstruction, and live jobs with both mechanisms."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from enclavefl.config import JobConfig, LocalDpConfig, parse_job
from enclavefl.errors import RoundError, UpdateRejected
from enclavefl.gaussian_mechanism import analytic_gaussian_sigma
from enclavefl.messages import LOCAL_DP_DIMS_OUT_KEY, LOCAL_DP_MECHANISM_KEY, LOCAL_DP_TOP_K_KEY, SIGNDS_INDICES_TENSOR, \
    SIGNDS_SIGN_TENSOR
from enclavefl.server.local_dp import LocalDpRelease, composed_epsilon
from enclavefl.server.signds import SignDsSum, float_values, signds_template
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.worker import Delta
from tests.unit.server.live_job import INITIAL
from tests.unit.server.test_dp import run_job

MODEL = StreamHeader.of(ParamSet({"w": np.zeros((2, 2), dtype=np.float32), "n": np.array(0, dtype=np.int64)}))


def upload(indices: list[int], sign: int) -> ParamSet:
    return ParamSet({SIGNDS_INDICES_TENSOR: np.array(indices, dtype=np.int64),
                     SIGNDS_SIGN_TENSOR: np.array([sign], dtype=np.int64)})


# ------------------------------------------------------------------ composed epsilon

def test_one_gaussian_upload_spends_its_epsilon() -> None:
    config = LocalDpConfig(enabled=True, epsilon=2.0, delta=1e-5, clip_norm=1.0)
    assert composed_epsilon(config, 1) == pytest.approx(2.0, rel=1e-3)
    assert composed_epsilon(config, 0) == 0.0


def test_gaussian_uploads_compose_as_one_gaussian_with_root_r_less_noise() -> None:
    # R Gaussian mechanisms with noise multiplier z compose exactly into one with z / sqrt(R).
    config = LocalDpConfig(enabled=True, epsilon=2.0, delta=1e-5, clip_norm=1.0)
    z = analytic_gaussian_sigma(2.0, 1e-5, 2.0) / 2.0
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(9)))
    assert composed_epsilon(config, 9) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)


def test_signds_uploads_compose_to_at_most_r_times_epsilon() -> None:
    config = LocalDpConfig(enabled=True, mechanism="signds", epsilon=1.0, delta=1e-5)
    assert composed_epsilon(config, 1) == pytest.approx(1.0, abs=1e-3)
    assert 1.0 < composed_epsilon(config, 10) <= 10.0


def test_release_state_round_trips_its_round_count() -> None:
    release = LocalDpRelease(LocalDpConfig(enabled=True), StreamHeader.of(INITIAL))
    release.rounds = 3
    restored = LocalDpRelease(LocalDpConfig(enabled=True), StreamHeader.of(INITIAL))
    restored.load_state(release.state())
    assert restored.rounds == 3
    assert restored.row()["local_dp_epsilon"] == release.row()["local_dp_epsilon"]


def test_signds_release_resolves_k_and_h_from_the_model() -> None:
    # d = 4 float values (the int counter is not selected): k = max(1, floor(0.25 * 4)) = 1; h as given.
    release = LocalDpRelease(LocalDpConfig(enabled=True, mechanism="signds", sparse_rate=0.25, dims_out=2), MODEL)
    assert float_values(MODEL) == 4
    assert (release.task_config[LOCAL_DP_MECHANISM_KEY], release.task_config[LOCAL_DP_TOP_K_KEY],
            release.task_config[LOCAL_DP_DIMS_OUT_KEY]) == ("signds", 1, 2)


# ------------------------------------------------------------------ SignDS reconstruction

def test_signds_sum_rebuilds_global_lr_times_the_mean_signed_selection() -> None:
    # +1 on {0, 3} and -1 on {1, 3}: sum [1, -1, 0, 0]; global_lr 2 over 2 uploads: [1, -1, 0, 0].
    aggregate = SignDsSum(MODEL, dims_out=2, global_lr=2.0)
    aggregate.add(upload([0, 3], 1), 100.0)
    aggregate.add(upload([1, 3], -1), 1.0)
    result = aggregate.result()
    np.testing.assert_array_equal(result["w"], [[1.0, -1.0], [0.0, 0.0]])
    assert result["w"].dtype == np.float32
    assert result["n"].dtype == np.int64 and int(result["n"]) == 0


def test_two_servers_signds_sums_merge_into_the_sum_of_all_uploads() -> None:
    # server A: +1 on {0, 3}; server B: -1 on {1, 3} and +1 on {0, 2}: sum [2, -1, 1, 0] over 3 uploads,
    # global_lr 3: [2, -1, 1, 0].
    a, b, merged = (SignDsSum(MODEL, dims_out=2, global_lr=3.0) for _ in range(3))
    a.add(upload([0, 3], 1), 1.0)
    b.add(upload([1, 3], -1), 1.0)
    b.add(upload([0, 2], 1), 1.0)

    merged.merge({"server-0": a.partial(), "server-1": b.partial()})

    assert merged.count == 3
    np.testing.assert_array_equal(merged.result()["w"], [[2.0, -1.0], [1.0, 0.0]])


def test_a_signds_partial_no_uploads_can_make_is_refused_and_changes_nothing() -> None:
    forged = SignDsSum(MODEL, dims_out=2, global_lr=1.0)
    forged._sum[:] = [5.0, 0.0, 0.0, 0.0]  # 5 at one index from a single upload of +-1
    forged._count = 1
    merged = SignDsSum(MODEL, dims_out=2, global_lr=1.0)

    with pytest.raises(UpdateRejected, match="not one that 1 SignDS uploads can make"):
        merged.merge({"server-0": forged.partial()})
    assert merged.count == 0


@pytest.mark.parametrize(("indices", "sign", "match"), [
    ([0, 4], 1, r"in \[0, 4\)"), ([-1, 2], 1, r"in \[0, 4\)"), ([2, 2], 1, "sorted and distinct"),
    ([3, 1], 1, "sorted and distinct"), ([0, 1], 0, "-1 or \\+1"), ([0, 1, 2], 1, "shape"),
])
def test_signds_sum_refuses_a_malformed_upload_and_stays_unchanged(indices: list[int], sign: int, match: str) -> None:
    aggregate = SignDsSum(MODEL, dims_out=2, global_lr=1.0)
    with pytest.raises(UpdateRejected, match=match):
        aggregate.add(upload(indices, sign), 1.0)
    assert aggregate.count == 0


def test_signds_template_bounds_the_upload_to_h_plus_one_int64() -> None:
    assert signds_template(5).total_bytes == 8 * 6


# ------------------------------------------------------------------ live jobs

def local_job(rounds: int, local: dict[str, Any]) -> JobConfig:
    return parse_job({
        "job": {"name": "ldp", "rounds": rounds, "workers": 2, "seed": 3},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "privacy": {"local_dp": {"enabled": True, **local}},
        "management": {"enabled": False},
    })


def test_gaussian_job_reports_per_round_and_composed_epsilon_and_resumes_them(tmp_path: Path) -> None:
    local = {"epsilon": 4.0, "delta": 1e-5, "clip_norm": 1.0}
    run_job(local_job(2, local), tmp_path)
    ps = run_job(local_job(3, local), tmp_path, resume=True)
    rows = ps.metrics.history
    config = LocalDpConfig(enabled=True, **local)
    assert [row["local_dp_epsilon_round"] for row in rows] == [4.0] * 3
    for r, row in enumerate(rows, start=1):
        assert row["local_dp_epsilon"] == pytest.approx(composed_epsilon(config, r), abs=1e-9)
    # Noise of std ~1.3 per coordinate on top of the clipped update: the model is not the noiseless one.
    assert not np.allclose(ps.params["w"], 3 / np.sqrt(6))


def test_signds_job_moves_only_the_selected_coordinates_by_global_lr_steps(tmp_path: Path) -> None:
    # d = 6; 2 workers x 2 indices, global_lr 3: after one round each value is 3 * (sum of signs) / 2.
    ps = run_job(local_job(1, {"mechanism": "signds", "epsilon": 10.0, "sparse_rate": 0.25, "dims_out": 2,
                               "global_lr": 3.0}), tmp_path)
    values = np.concatenate([ps.params["w"].ravel(), ps.params["b"].ravel()])
    assert np.count_nonzero(values) <= 4
    assert set(np.round(values / 1.5).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert ps.metrics.history[0]["local_dp_epsilon"] == pytest.approx(10.0, abs=1e-3)
    assert ps.metrics.history[0]["bytes_in"] < 2 * 200


def test_signds_job_refuses_a_plain_delta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(RoundError):
        run_job(local_job(1, {"mechanism": "signds", "sparse_rate": 0.25, "dims_out": 2}), tmp_path,
                transforms=[Delta()])
    assert "tensor names differ" in caplog.text
