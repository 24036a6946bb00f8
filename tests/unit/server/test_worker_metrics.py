"""A worker's reported metrics are data from a peer: checked at receipt, bad ones dropped and counted."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from enclavefl.messages import UpdateMeta
from enclavefl.server.ps import ParameterServer
from enclavefl.server.worker_metrics import WORKER_METRICS, check_worker_metrics
from enclavefl.tensors import StreamHeader, iter_chunks
from tests.unit.server.test_ps import (  # noqa: F401  (engines is the shared fixture)
    DELTA_A,
    DELTA_B,
    INITIAL,
    PEER_A,
    PEER_B,
    Engine,
    engines,
    finish,
    job,
    open_round,
)


def push_with_metrics(ps: ParameterServer, peer: object, worker_id: str, metrics: dict[str, float]) -> None:
    update = DELTA_A if peer is PEER_A else DELTA_B
    meta = UpdateMeta(worker_id, 1, 0, 1, StreamHeader.of(update), metrics)
    sink = ps.open_update(peer, meta)  # type: ignore[arg-type]
    for chunk in iter_chunks(update, 8):
        sink.feed(bytes(chunk))
    sink.commit()


def test_non_finite_and_absurd_metrics_are_dropped_counted_and_kept_out_of_metrics_jsonl(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO)
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)
    engine, a, b = open_round(ps, engines)

    # Execute: A reports NaN and 3.3e307; B honest values.
    push_with_metrics(ps, PEER_A, a, {"loss": math.nan, "accuracy": 3.3e307})
    push_with_metrics(ps, PEER_B, b, {"loss": 0.5, "accuracy": 0.75})
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert: only B's values count (means of one value each).
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (row["train_loss"], row["train_accuracy"]) == (0.5, 0.75)
    assert row["metrics_dropped"] == 2
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage() and "metric" in r.getMessage()]
    assert len(lines) == 1 and a in lines[0]


@pytest.mark.parametrize(
    "metrics, dropped",
    [
        ({"loss": 0.25, "accuracy": 1.0, "seconds_fit": 3.0}, []),
        ({"loss": -0.1}, ["loss"]),  # a loss is never negative
        ({"loss": math.inf}, ["loss"]),
        ({"accuracy": 1.5}, ["accuracy"]),  # a fraction
        ({"seconds_fit": -1.0}, ["seconds_fit"]),
        ({"made_up": 1.0}, ["made_up"]),  # unknown keys are not written to metrics.jsonl
    ],
)
def test_check_worker_metrics_keeps_known_finite_values_in_range(metrics: dict[str, float], dropped: list[str]) -> None:
    kept, refused = check_worker_metrics(metrics)

    assert sorted(refused) == dropped
    assert kept == {k: v for k, v in metrics.items() if k not in dropped}


def test_every_known_metric_has_a_finite_range() -> None:
    for name, (low, high) in WORKER_METRICS.items():
        assert math.isfinite(low) and math.isfinite(high) and low < high, name
