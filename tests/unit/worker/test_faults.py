"""Fault injection for experiments: the attacks, who gets them, stragglers, and a simulated federation under attack."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.app import simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.messages import ClientSettings, UpdateKind
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet, SparseRows, Tensor
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import Delta, UpdateContext, Worker, WorkerSettings, run_pipeline
from enclavefl.worker.faults import Attack, Slowdown, faults_for
from tests.unit.worker.federation import AddTrainer, f32

SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)


def params(**tensors: Tensor) -> ParamSet:
    return ParamSet(tensors)


def context(round_: int = 3, global_params: ParamSet | None = None, local_params: ParamSet | None = None) -> UpdateContext:
    empty = ParamSet()
    return UpdateContext(global_params or empty, local_params or empty, FitResult(4, steps=2), SETTINGS, round_)


def faults(**section: Any) -> JobConfig:
    return parse_job({"job": {"seed": 11}, "faults": section})


# -------------------------------------------------------------- Attack


def test_sign_flip_sends_minus_scale_times_each_float_tensor() -> None:
    # Prepare
    update = params(w=f32([1.0, -2.0]), b=np.asarray(0.5, dtype=np.float64))

    # Execute
    out = Attack("sign_flip", 10.0)(update, context())

    # Assert: -10 * [1, -2] = [-10, 20]; -10 * 0.5 = -5 (0-d, float64 kept).
    assert out == params(w=f32([-10.0, 20.0]), b=np.asarray(-5.0, dtype=np.float64))
    assert isinstance(out["b"], np.ndarray) and out["b"].shape == ()


def test_sign_flip_with_scale_one_is_the_plain_negation() -> None:
    out = Attack("sign_flip", 1.0)(params(w=f32([0.25, -3.0])), context())

    assert out == params(w=f32([-0.25, 3.0]))


def test_scale_sends_scale_times_the_update() -> None:
    out = Attack("scale", 3.0)(params(w=f32([[0.5, -1.5], [0.0, 2.0]])), context())

    # 3 * [[0.5, -1.5], [0, 2]] = [[1.5, -4.5], [0, 6]]
    assert out == params(w=f32([[1.5, -4.5], [0.0, 6.0]]))


def test_attack_leaves_integer_and_bool_tensors_and_its_input_alone() -> None:
    update = params(w=f32([1.0]), n=np.asarray([4, -2], dtype=np.int64), m=np.asarray([True]))

    out = Attack("scale", 2.0)(update, context())

    assert out == params(w=f32([2.0]), n=np.asarray([4, -2], dtype=np.int64), m=np.asarray([True]))
    assert update == params(w=f32([1.0]), n=np.asarray([4, -2], dtype=np.int64), m=np.asarray([True]))


def test_attack_keeps_sparse_row_ids_and_attacks_the_rows() -> None:
    update = params(emb=SparseRows(np.asarray([0, 2]), f32([[1.0, 2.0], [-1.0, 0.5]]), (3, 2)))

    out = Attack("sign_flip", 2.0)(update, context())

    value = out["emb"]
    assert isinstance(value, SparseRows)
    np.testing.assert_array_equal(value.ids, [0, 2])
    # -2 * [[1, 2], [-1, 0.5]] = [[-2, -4], [2, -1]]
    np.testing.assert_array_equal(value.rows, f32([[-2.0, -4.0], [2.0, -1.0]]))
    assert value.shape == (3, 2)


def test_noise_replaces_the_update_with_gaussian_noise_of_its_shape_and_dtype() -> None:
    update = params(w=np.ones((200, 50), dtype=np.float32))

    out = Attack("noise", 2.0, seed=11, index=1)(update, context())

    noise = out["w"]
    assert isinstance(noise, np.ndarray) and noise.shape == (200, 50) and noise.dtype == np.float32
    # 10,000 draws of N(0, 2^2): mean within 0.1 and standard deviation within 0.1 of 2 (both > 4 standard errors).
    assert abs(float(noise.mean())) < 0.1
    assert abs(float(noise.std()) - 2.0) < 0.1


def test_noise_is_reproducible_for_a_seed_worker_and_round() -> None:
    update = params(w=np.zeros(8, dtype=np.float32), v=np.zeros((2, 2), dtype=np.float64))

    first = Attack("noise", 1.0, seed=11, index=1)(update, context(round_=4))
    again = Attack("noise", 1.0, seed=11, index=1)(update, context(round_=4))
    other_worker = Attack("noise", 1.0, seed=11, index=2)(update, context(round_=4))
    other_round = Attack("noise", 1.0, seed=11, index=1)(update, context(round_=5))

    assert first == again
    assert first != other_worker
    assert first != other_round


def test_attack_after_delta_flips_the_delta_and_announces_a_delta() -> None:
    # Prepare: global [1, 1], trained [2, 0]: delta [1, -1].
    old, new = params(w=f32([1.0, 1.0])), params(w=f32([2.0, 0.0]))

    # Execute
    update, kind = run_pipeline([Delta(), Attack("sign_flip", 2.0)], context(3, old, new))

    # Assert: -2 * [1, -1] = [-2, 2]
    assert update == params(w=f32([-2.0, 2.0]))
    assert kind is UpdateKind.DELTA


@pytest.mark.parametrize(("attack", "scale"), [("flip", 1.0), ("scale", 0.0), ("noise", -1.0), ("scale", float("nan"))])
def test_attack_refuses_an_unknown_name_or_a_scale_that_is_not_positive(attack: Any, scale: float) -> None:
    with pytest.raises(ValueError):
        Attack(attack, scale)


# -------------------------------------------------------------- faults_for


def test_faults_are_off_by_default() -> None:
    for index in range(3):
        assert faults_for(parse_job({}), index, 3) == ([], 1.0)


def test_the_first_byzantine_workers_attack_and_the_last_slow_ones_are_slowed() -> None:
    config = faults(byzantine=2, attack="scale", scale=4.0, slow=2, slowdown=5.0)

    picked = [faults_for(config, i, 10) for i in range(10)]

    attackers = [i for i, (transforms, _) in enumerate(picked) if transforms]
    slowed = [i for i, (_, slowdown) in enumerate(picked) if slowdown != 1.0]
    assert attackers == [0, 1]
    assert slowed == [8, 9]
    assert [s for _, s in picked[8:]] == [5.0, 5.0]
    attack = picked[1][0][0]
    assert isinstance(attack, Attack)
    assert (attack.attack, attack.scale, attack.seed, attack.index) == ("scale", 4.0, 11, 1)


def test_attackers_and_stragglers_overlap_only_when_they_must() -> None:
    config = faults(byzantine=2, slow=2)

    # 3 workers: 0 and 1 attack, 1 and 2 are slow, so worker 1 is both.
    transforms, slowdown = faults_for(config, 1, 3)

    assert len(transforms) == 1 and slowdown == 5.0


def test_faults_for_logs_fault_injection_for_an_affected_worker_only(caplog: pytest.LogCaptureFixture) -> None:
    config = faults(byzantine=1)

    with caplog.at_level(logging.WARNING, logger="enclavefl.worker.faults"):
        faults_for(config, 0, 4)
        faults_for(config, 1, 4)

    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "worker-0: FAULT INJECTION sign_flip" in lines[0]


@pytest.mark.parametrize("section", [{"byzantine": 5}, {"slow": 5}])
def test_faults_for_refuses_more_faulty_workers_than_workers(section: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="more than the 4 workers"):
        faults_for(faults(**section), 0, 4)


def test_faults_for_refuses_an_index_outside_the_workers() -> None:
    with pytest.raises(ConfigError, match="outside 0..3"):
        faults_for(parse_job({}), 4, 4)


# -------------------------------------------------------------- Slowdown


def test_slowdown_waits_factor_minus_one_times_the_fit_time() -> None:
    stop = threading.Event()

    started = time.monotonic()
    stopped = Slowdown(3.0, stop).after_fit(0.05)

    # (3 - 1) * 0.05 s = 0.1 s at least (a wait never ends early unless stopped).
    assert time.monotonic() - started >= 0.1
    assert stopped is False


def test_slowdown_returns_early_when_the_stop_event_is_set() -> None:
    # Prepare: the nominal wait is (1000 - 1) * 10 s; the stop comes after 0.05 s.
    stop = threading.Event()
    setter = threading.Timer(0.05, stop.set)
    setter.start()

    # Execute
    started = time.monotonic()
    stopped = Slowdown(1000.0, stop).after_fit(10.0)
    elapsed = time.monotonic() - started
    setter.join()

    # Assert
    assert stopped is True
    assert elapsed < 5.0


def test_slowdown_refuses_a_factor_below_one() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Slowdown(0.5, threading.Event())


def test_worker_refuses_a_slowdown_below_one() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Worker(lambda: None, AddTrainer(1.0, 4), WorkerSettings("w", slowdown=0.5))  # type: ignore[arg-type,return-value]


# -------------------------------------------------------------- in a simulated federation


def digits_job(aggregator: str, **section: Any) -> JobConfig:
    return parse_job({
        "job": {"rounds": 2, "workers": 4, "seed": 3},
        "round": {"min_workers": 4, "update_window_s": 60},
        "task": {"name": "digits-mlp"},
        "client": {"epochs": 1, "lr": 0.1, "momentum": 0.9},
        "server": {"aggregator": aggregator},
        "attestation": {"mode": "none"},
        "faults": section,
    })


def test_median_withstands_one_sign_flipping_worker_that_breaks_the_mean(tmp_path: Path) -> None:
    # Prepare: 4 digits workers, worker 0 sends -10 x its delta.
    results = {}
    for aggregator in ("mean", "median"):
        config = digits_job(aggregator, byzantine=1, attack="sign_flip", scale=10.0)

        # Execute
        result = simulate(load_task(config), config, workers=4, out_dir=tmp_path / aggregator)
        results[aggregator] = result.history[-1]["eval_accuracy"]

    # Assert: the mean moves by about (3 - 10) / 4 of an honest delta, backwards, and stays near chance
    # (0.11 here); the median of four is the mean of the two middle values, honest ones (0.68 here).
    assert results["median"] > results["mean"] + 0.3


class SlowFitTrainer(AddTrainer):
    """AddTrainer whose fit takes at least ``fit_s`` seconds."""

    def __init__(self, fit_s: float) -> None:
        super().__init__(0.0, 10)
        self.fit_s = fit_s

    def fit(self, config: FitConfig) -> FitResult:
        time.sleep(self.fit_s)
        return super().fit(config)


def test_a_straggler_in_a_simulated_federation_holds_its_round_back(tmp_path: Path) -> None:
    config = parse_job({
        "job": {"rounds": 1, "workers": 2},
        "round": {"min_workers": 2, "update_window_s": 60},
        "attestation": {"mode": "none"},
        "faults": {"slow": 1, "slowdown": 4.0},
    })

    result = simulate(load_task(config), config, workers=2, out_dir=tmp_path,
                      make_trainer=lambda i, n: SlowFitTrainer(0.1))

    # Worker 1 fits for 0.1 s, then waits (4 - 1) * 0.1 s: the round trains for at least 0.4 s.
    assert result.history[-1]["seconds_train"] >= 0.4
