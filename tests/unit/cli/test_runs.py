"""Tests for enclavefl.cli.runs: how a completed round reads on the console."""

from __future__ import annotations

from typing import Any

from enclavefl.cli.runs import round_line


def row(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"round": 1, "participants": 3, "train_loss": 0.5, "eval_loss": 0.4,
                            "eval_accuracy": 0.9, "seconds_wait": 0.0, "seconds_train": 2.0,
                            "seconds_aggregate": 0.25}
    base.update(extra)
    return base


def test_round_time_leaves_out_the_wait_for_workers_and_shows_it_apart() -> None:
    line = round_line(row(seconds_wait=12.0), 10)

    # 2.0 s training + 0.25 s aggregation = 2.2 s (rounded); the 12 s of start-up apart.
    assert line.endswith("2.2s (+12.0s waiting for workers)")


def test_short_waits_are_not_shown() -> None:
    assert round_line(row(seconds_wait=0.1), 10).endswith("eval_acc 0.900  2.2s")


def test_dropped_workers_and_rejected_updates_are_shown() -> None:
    assert round_line(row(dropped=1, rejected=2), 10).endswith("2.2s  dropped 1  rejected 2")
