"""Tests for enclavefl.server.metrics: the metrics.jsonl contract."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from enclavefl.server.metrics import REQUIRED_KEYS, MetricsLog


def row(round_: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {key: 0 for key in REQUIRED_KEYS}
    base.update(round=round_, train_loss=0.5, eval_accuracy=0.9)
    base.update(extra)
    return base


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_required_keys_are_the_documented_contract() -> None:
    assert REQUIRED_KEYS == (
        "round",
        "participants",
        "num_samples",
        "train_loss",
        "train_accuracy",
        "eval_loss",
        "eval_accuracy",
        "bytes_in",
        "bytes_out",
        "seconds_wait",
        "seconds_train",
        "seconds_aggregate",
    )


def test_append_writes_one_json_object_per_line(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")

    log.append(row(1))
    log.append(row(2, extra_key="kept"))

    assert read_lines(log.path) == [row(1), row(2, extra_key="kept")]
    assert log.history == [row(1), row(2, extra_key="kept")]


@pytest.mark.parametrize("missing", REQUIRED_KEYS)
def test_append_requires_every_required_key(tmp_path: Path, missing: str) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    bad = row(1)
    del bad[missing]

    with pytest.raises(ValueError, match=missing):
        log.append(bad)

    assert log.history == []
    assert log.path.read_text(encoding="utf-8") == ""


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_written_as_null(tmp_path: Path, value: float) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")

    log.append(row(1, train_loss=value))

    text = log.path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert read_lines(log.path)[0]["train_loss"] is None
    assert log.history[0]["train_loss"] is None


def test_resume_rewrites_the_file_from_the_history(tmp_path: Path) -> None:
    # Prepare: a file with rounds 1-3, of which the checkpoint knows only 1-2.
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for r in (1, 2, 3):
        first.append(row(r))
    history = first.history[:2]

    # Execute
    resumed = MetricsLog(path, history)
    resumed.append(row(3, attempt=1))

    # Assert
    assert read_lines(path) == [row(1), row(2), row(3, attempt=1)]
    assert resumed.history == read_lines(path)


def test_history_is_copied_not_shared(tmp_path: Path) -> None:
    history = [row(1)]

    log = MetricsLog(tmp_path / "metrics.jsonl", history)
    log.history[0]["round"] = 99

    assert history[0]["round"] == 1


def test_subscribers_get_each_new_row_and_a_failing_one_does_not_stop_the_log(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "m.jsonl")
    seen: list[dict[str, Any]] = []

    def broken(row: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    log.subscribe(broken)
    log.subscribe(seen.append)
    row = {k: 1 for k in REQUIRED_KEYS}
    log.append(row)
    log.append({**row, "round": 2})

    assert [r["round"] for r in seen] == [1, 2]
    assert len(log.history) == 2 and len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    seen[0]["round"] = 99  # a copy: listeners cannot change the history
    assert log.history[0]["round"] == 1
