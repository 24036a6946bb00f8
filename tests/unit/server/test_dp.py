"""DP-FedAvg on the PS: the accountant, the clipped equal-weight mean, the noise, the budget stop and resume."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError, EnclaveFLError, RoundError, UpdateRejected
from enclavefl.server.accountant import PrivacyAccountant
from enclavefl.server.algorithms import CloseContext
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.dp import ClippedMean, DpFedAvg, gaussian_noise
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.worker import Delta, InMemoryClient, Worker, WorkerSettings
from enclavefl.worker.pipeline import UpdateTransform
from tests.unit.server.live_job import INITIAL, Gate, GatedTrainer, f32, peer


def independent_epsilon(q: float, z: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    accountant = dp_accounting.pld.PLDAccountant() if kind == "pld" else dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(accountant.get_epsilon(delta))


def dp_job(*, rounds: int, workers: int = 2, target_epsilon: float | None = None, z: float = 1.0,
           clip_norm: float = 1.0) -> JobConfig:
    dp: dict[str, Any] = {"enabled": True, "clip_norm": clip_norm, "noise_multiplier": z}
    if target_epsilon is not None:
        dp["target_epsilon"] = target_epsilon
    return parse_job({
        "job": {"name": "dp", "rounds": rounds, "workers": workers, "seed": 3},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "privacy": {"dp": dp},
        "management": {"enabled": False},
    })


def run_job(config: JobConfig, out_dir: Path, *, resume: bool = False,
            transforms: list[UpdateTransform] | None = None) -> ParameterServer:
    """A PS with in-memory workers (each adds 1 to every weight per round), run to its end on this thread."""
    checkpoint = latest_checkpoint(out_dir / config.server.checkpoint_dir) if resume else None
    ps = ParameterServer(config, INITIAL, out_dir=out_dir, resume_from=checkpoint)
    stop = threading.Event()
    threads = []
    errors: list[EnclaveFLError] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except EnclaveFLError as exc:  # a worker of a failed job is dropped: the job's outcome is what is tested
            errors.append(exc)

    for index in range(config.job.workers):
        who = peer(f"worker-{index}")
        worker = Worker(lambda who=who: InMemoryClient(ps, who, chunk_bytes=64), GatedTrainer(Gate()),
                        WorkerSettings(name=f"worker-{index}", seed=7, poll_s=0.1), stop=stop, transforms=transforms)
        thread = threading.Thread(target=run, args=(worker,), daemon=True)
        thread.start()
        threads.append(thread)
    try:
        ps.run()
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert not errors, errors  # reached only when the job succeeded: its workers must have too
    return ps


# ------------------------------------------------------------------ accountant

@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_after_r_rounds_matches_dp_accounting_computed_independently(kind: str) -> None:
    accountant = PrivacyAccountant(1.1, 1e-5, kind)  # type: ignore[arg-type]
    for _ in range(7):
        accountant.record(0.3)
    assert accountant.epsilon() == pytest.approx(independent_epsilon(0.3, 1.1, 7, 1e-5, kind), abs=1e-6)


def test_epsilon_of_one_more_round_is_asked_without_composing_it() -> None:
    accountant = PrivacyAccountant(1.0, 1e-5)
    accountant.record(0.5)
    assert accountant.epsilon(next_rate=0.5) == pytest.approx(independent_epsilon(0.5, 1.0, 2, 1e-5), abs=1e-6)
    assert accountant.rounds == 1


def test_accountant_state_round_trips_and_refuses_another_delta() -> None:
    accountant = PrivacyAccountant(1.0, 1e-5)
    for rate in (0.5, 0.5, 0.25):
        accountant.record(rate)
    restored = PrivacyAccountant(1.0, 1e-5)
    restored.load_state(accountant.state())
    assert restored.epsilon() == accountant.epsilon()
    from enclavefl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="delta"):
        PrivacyAccountant(1.0, 1e-6).load_state(accountant.state())


def test_no_noise_has_no_epsilon_bound() -> None:
    accountant = PrivacyAccountant(0.0, 1e-5)
    accountant.record(1.0)
    assert accountant.row() == {"dp_epsilon": None, "dp_delta": 1e-5}


def test_missing_library_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "dp_accounting", None)
    with pytest.raises(ConfigError, match=r"enclavefl\[privacy\]"):
        PrivacyAccountant(1.0, 1e-5)


# ------------------------------------------------------------ aggregation, noise

TEMPLATE = StreamHeader.of(ParamSet({"a": f32([0.0, 0.0])}))


def test_clipped_mean_weighs_every_update_equally() -> None:
    # weights 1 and 100 are ignored: ([0.6, 0] + [0, 0.8]) / 2 = [0.3, 0.4]
    mean = ClippedMean(TEMPLATE, 1.0)
    mean.add(ParamSet({"a": f32([0.6, 0.0])}), 1.0)
    mean.add(ParamSet({"a": f32([0.0, 0.8])}), 100.0)
    np.testing.assert_allclose(mean.result()["a"], [0.3, 0.4], rtol=1e-6)


def test_clipped_means_of_two_servers_merge_into_the_mean_of_all_updates() -> None:
    # server A folds [0.6, 0] and [0, 0.8], server B folds [0.2, 0.2]: (0.8, 1.0) / 3 by hand.
    a, b, merged = ClippedMean(TEMPLATE, 1.0), ClippedMean(TEMPLATE, 1.0), ClippedMean(TEMPLATE, 1.0)
    a.add(ParamSet({"a": f32([0.6, 0.0])}), 5.0)
    a.add(ParamSet({"a": f32([0.0, 0.8])}), 1.0)
    b.add(ParamSet({"a": f32([0.2, 0.2])}), 9.0)

    merged.merge({"server-0": a.partial(), "server-1": b.partial()})

    assert merged.count == 3
    np.testing.assert_allclose(merged.result()["a"], [0.8 / 3, 1.0 / 3], rtol=1e-6)


def test_clipped_mean_refuses_an_update_above_the_bound_naming_its_norm() -> None:
    mean = ClippedMean(TEMPLATE, 1.0)
    with pytest.raises(UpdateRejected, match=r"L2 norm is 5\b.*clip_norm=1"):
        mean.add(ParamSet({"a": f32([3.0, 4.0])}), 1.0)  # sqrt(9 + 16) = 5
    assert mean.count == 0


def test_noise_has_the_asked_standard_deviation() -> None:
    # 10^6 draws: the sample std's own std is std/sqrt(2n) ~ 0.07% of std, so 0.5% is ~7 of them;
    # the sample mean's std is std/sqrt(n) = 0.001*std, so 0.005*std is 5 of them.
    noise = gaussian_noise((1000, 1000), 0.25, seed=3, round_=4, index=0)
    assert abs(noise.std() - 0.25) < 0.005 * 0.25
    assert abs(noise.mean()) < 0.005 * 0.25


def test_noise_is_the_same_for_the_same_seed_and_round_only() -> None:
    first = gaussian_noise((50,), 1.0, seed=3, round_=4, index=0)
    np.testing.assert_array_equal(first, gaussian_noise((50,), 1.0, seed=3, round_=4, index=0))
    assert not np.array_equal(first, gaussian_noise((50,), 1.0, seed=3, round_=5, index=0))
    assert not np.array_equal(first, gaussian_noise((50,), 1.0, seed=4, round_=4, index=0))


def test_post_process_averages_over_the_sampled_workers_without_noise_at_z_zero() -> None:
    # 2 of 4 sampled workers sent: the mean over senders [0.4, -0.2] becomes a mean over 4: [0.2, -0.1].
    dp = DpFedAvg(dp_job(rounds=1, z=0.0).privacy.dp, seed=3)
    assert dp.may_open(1, sampled=4, joined=8) is None
    out = dp.post_process(ParamSet({"a": f32([0.4, -0.2])}), CloseContext(1, participants=2, num_workers=8))
    np.testing.assert_allclose(out["a"], [0.2, -0.1], rtol=1e-6)
    assert dp.accountant.rounds == 1


def test_post_process_adds_noise_of_std_z_clip_over_sampled() -> None:
    # z=2, C=0.5, m=4 sampled: std = 2 * 0.5 / 4 = 0.25 on the mean (tolerance as in the noise test).
    dp = DpFedAvg(dp_job(rounds=1, z=2.0, clip_norm=0.5).privacy.dp, seed=3)
    dp.may_open(1, sampled=4, joined=4)
    zeros = np.zeros((1000, 1000), dtype=np.float32)
    out = dp.post_process(ParamSet({"w": zeros}), CloseContext(1, participants=4, num_workers=4))["w"]
    assert abs(float(np.std(out)) - 0.25) < 0.005 * 0.25


# ------------------------------------------------------------------ live jobs

def test_ps_refuses_an_update_that_was_not_clipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The workers skip ClipUpdate: +1 on 6 weights has norm sqrt(6) ~ 2.449 > clip_norm 1.
    caplog.set_level(logging.WARNING)
    with pytest.raises(RoundError):
        run_job(dp_job(rounds=1), tmp_path, transforms=[Delta()])
    assert "L2 norm is 2.44949, above privacy.dp.clip_norm=1" in caplog.text


def test_every_metrics_row_reports_epsilon_and_delta(tmp_path: Path) -> None:
    ps = run_job(dp_job(rounds=2), tmp_path)
    rows = ps.metrics.history
    assert [r["dp_delta"] for r in rows] == [1e-5, 1e-5]
    # 2 of 2 workers sampled each round: q = 1.
    for r, row in enumerate(rows, start=1):
        assert row["dp_epsilon"] == pytest.approx(independent_epsilon(1.0, 1.0, r, 1e-5), abs=1e-6)


def test_budget_stops_the_job_before_the_round_that_would_exceed_it(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    two, three = independent_epsilon(1.0, 1.0, 2, 1e-5), independent_epsilon(1.0, 1.0, 3, 1e-5)
    ps = run_job(dp_job(rounds=10, target_epsilon=(two + three) / 2), tmp_path)
    assert [row["round"] for row in ps.metrics.history] == [1, 2]
    assert ps.core.outcome == "finished"
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 2
    assert f"privacy budget: round 3 would reach epsilon={three:.4g}" in caplog.text
    assert "stopping after round 2" in caplog.text


def test_resumed_job_continues_the_epsilon_it_had_spent(tmp_path: Path) -> None:
    run_job(dp_job(rounds=2), tmp_path)
    ps = run_job(dp_job(rounds=4), tmp_path, resume=True)
    rows = ps.metrics.history
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["dp_epsilon"] == pytest.approx(independent_epsilon(1.0, 1.0, 4, 1e-5), abs=1e-6)
