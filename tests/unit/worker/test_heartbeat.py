"""Tests for enclavefl.worker.heartbeat, alone and in a worker that trains longer than the PS's timeout."""

from __future__ import annotations

import time
from pathlib import Path

from enclavefl.config import parse_job
from enclavefl.errors import StaleSession, Unavailable
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import Heartbeat
from tests.unit.worker.federation import AddTrainer, f32, run_federation


def test_heartbeat_sends_every_interval_until_the_block_ends() -> None:
    sent: list[float] = []

    with Heartbeat(lambda: sent.append(time.monotonic()), 0.05, name="w"):
        time.sleep(0.32)
    count = len(sent)
    time.sleep(0.15)

    assert 4 <= count <= 7  # 0.32 s / 0.05 s, give or take scheduling
    assert len(sent) == count  # nothing after the block


def test_heartbeat_with_zero_interval_sends_nothing() -> None:
    sent: list[int] = []

    with Heartbeat(lambda: sent.append(1), 0.0, name="w"):
        time.sleep(0.1)

    assert sent == []


def test_heartbeat_stops_once_the_ps_no_longer_knows_the_worker() -> None:
    calls: list[int] = []

    def refuse() -> None:
        calls.append(1)
        raise StaleSession("worker 'w-1' is not joined to PS p; join again")

    with Heartbeat(refuse, 0.03, name="w"):
        time.sleep(0.25)

    assert calls == [1]


def test_heartbeat_goes_on_after_a_network_blip() -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Unavailable("Heartbeat 127.0.0.1:1: connection refused")

    with Heartbeat(flaky, 0.03, name="w"):
        time.sleep(0.25)

    assert len(calls) >= 3


class SlowTrainer(AddTrainer):
    """AddTrainer whose fit takes ``seconds``: longer than the PS waits for a silent worker."""

    def __init__(self, step: float, num_samples: int, seconds: float) -> None:
        super().__init__(step, num_samples)
        self.seconds = seconds

    def fit(self, config: FitConfig) -> FitResult:
        time.sleep(self.seconds)
        return super().fit(config)


def test_a_worker_training_longer_than_worker_timeout_s_is_kept_by_its_heartbeats(tmp_path: Path) -> None:
    # Prepare: the PS drops a worker silent for 0.3 s; "slow" trains for 1 s per round.
    config = parse_job({
        "job": {"rounds": 1},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0,
                  "heartbeat_s": 0.1, "worker_timeout_s": 0.3},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "attestation": {"mode": "none"},
    })
    initial = ParamSet({"w": f32([1, 2])})

    # Execute
    federation = run_federation(config, initial, [("fast", AddTrainer(1.0, 1)), ("slow", SlowTrainer(3.0, 1, 1.0))],
                                tmp_path)

    # Assert: both updates count: [1, 2] + (1 * 1 + 1 * 3) / 2 = [3, 4], by hand.
    (row,) = federation.ps.metrics.history
    assert (row["participants"], row["dropped"]) == (2, 0)
    assert federation.ps.params == ParamSet({"w": f32([3, 4])})
