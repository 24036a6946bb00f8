"""TensorBoard event files: written per round, read back record by record (CRC-checked) and parsed."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")

from tensorboardX.crc32c import crc32c  # noqa: E402
from tensorboardX.proto.event_pb2 import Event  # noqa: E402

from enclavefl.app import simulate  # noqa: E402
from enclavefl.config import parse_job  # noqa: E402
from enclavefl.server.metrics import MetricsLog  # noqa: E402
from enclavefl.server.tensorboard import TensorBoardLog, scalars_of_row  # noqa: E402
from enclavefl.tensors import ParamSet  # noqa: E402
from enclavefl.training import Trainer  # noqa: E402
from tests.unit.worker.federation import AddTrainer  # noqa: E402


def unmask(masked: int) -> int:
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def read_events(path: Path) -> Iterator[Any]:
    """Parses an event file the way TensorBoard does: length, CRC of length, data, CRC of data."""
    blob = path.read_bytes()
    pos = 0
    while pos < len(blob):
        header = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        assert unmask(header_crc) == crc32c(header), f"bad length CRC at byte {pos}"
        data = blob[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
        assert unmask(data_crc) == crc32c(data), f"bad data CRC at byte {pos}"
        event = Event()
        event.ParseFromString(data)
        yield event
        pos += 16 + length


def scalars_by_step(directory: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("summary"):
                step = out.setdefault(event.step, {})
                for value in event.summary.value:
                    assert value.tag not in step, f"step {event.step} has {value.tag} twice"
                    step[value.tag] = value.simple_value
    return out


def row(round_: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "round": round_, "participants": 2, "num_samples": 20, "train_loss": 1.0 / round_,
        "train_accuracy": 0.5, "eval_loss": 0.25, "eval_accuracy": 0.75, "bytes_in": 100 * round_,
        "bytes_out": 200, "seconds_wait": 0.5, "seconds_train": 1.5, "seconds_aggregate": 0.125,
    }
    return base | extra


def test_row_keys_become_grouped_tags() -> None:
    tags = scalars_of_row(row(2, dp_epsilon=1.5, eval_f1=0.5))

    assert tags == {
        "round/participants": 2.0, "train/loss": 0.5, "train/accuracy": 0.5, "eval/loss": 0.25,
        "eval/accuracy": 0.75, "eval/f1": 0.5, "bytes/in": 200.0, "bytes/out": 200.0, "seconds/wait": 0.5,
        "seconds/train": 1.5, "seconds/aggregate": 0.125, "privacy/dp_epsilon": 1.5,
    }


def test_row_skips_missing_and_non_numeric_values() -> None:
    tags = scalars_of_row({"round": 1, "eval_loss": None, "train_loss": float("nan"), "rejected_ids": ["a"],
                           "dropped_ids": [], "train_accuracy": True, "time": 12.0})

    assert tags == {}


def test_log_writes_one_scalar_per_metric_per_round(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path / "tb")
    for r in (1, 2, 3):
        log(row(r))

    steps = scalars_by_step(tmp_path / "tb")

    assert sorted(steps) == [1, 2, 3]
    assert steps[2]["train/loss"] == pytest.approx(0.5)  # 1 / round 2
    assert steps[3]["bytes/in"] == 300.0                # 100 * round 3
    assert set(steps[1]) == set(scalars_of_row(row(1)))


def test_event_file_starts_with_the_file_version_record(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)

    first = next(read_events(log.path))

    assert first.file_version == "brain.Event:2"


def test_epsilon_is_written_when_the_row_has_it(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    log(row(1))
    log(row(2, epsilon=0.8))

    steps = scalars_by_step(tmp_path)

    assert "privacy/epsilon" not in steps[1]
    assert steps[2]["privacy/epsilon"] == pytest.approx(0.8)


def test_log_follows_a_metrics_log_as_a_listener(tmp_path: Path) -> None:
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.subscribe(TensorBoardLog(tmp_path / "tb"))
    metrics.append(row(1))
    metrics.append(row(2))

    assert sorted(scalars_by_step(tmp_path / "tb")) == [1, 2]


class OneWeightTask:
    name = "one-weight"

    def initial_parameters(self) -> ParamSet:
        return ParamSet({"w": np.zeros(2, dtype=np.float32)})

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return AddTrainer(float(index + 1), 1)

    def server_evaluator(self) -> Trainer | None:
        return None


def test_job_with_summary_tensorboard_writes_every_round(tmp_path: Path) -> None:
    config = parse_job({
        "job": {"rounds": 3, "workers": 2},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "attestation": {"mode": "none"},
        "summary": {"tensorboard": True},
    })

    result = simulate(OneWeightTask(), config, out_dir=tmp_path)

    steps = scalars_by_step(tmp_path / "tensorboard")
    assert sorted(steps) == [1, 2, 3]
    assert [steps[r]["bytes/in"] for r in (1, 2, 3)] == [float(h["bytes_in"]) for h in result.history]
    assert all("seconds/aggregate" in steps[r] and "train/loss" in steps[r] for r in (1, 2, 3))


def test_job_without_summary_tensorboard_writes_no_event_file(tmp_path: Path) -> None:
    config = parse_job({
        "job": {"rounds": 1, "workers": 2},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "attestation": {"mode": "none"},
    })

    simulate(OneWeightTask(), config, out_dir=tmp_path)

    assert not (tmp_path / "tensorboard").exists()


def test_missing_extra_is_a_config_error_naming_it(tmp_path: Path) -> None:
    # A fresh interpreter in which tensorboardX cannot be imported, as on an install without the extra.
    code = (
        "import sys, pathlib\n"
        "sys.modules['tensorboardX'] = None\n"
        "from enclavefl.errors import ConfigError\n"
        "from enclavefl.server.tensorboard import TensorBoardLog\n"
        "try:\n"
        "    TensorBoardLog(pathlib.Path(sys.argv[1]))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}

    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, env=env, check=True).stdout

    assert "enclavefl[tensorboard]" in out and "summary.tensorboard" in out
