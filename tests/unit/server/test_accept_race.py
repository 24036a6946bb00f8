"""An update is in the model if and only if the round's record counts it.

Regression test: the PS used to fold an update into the sum and record it in
two separate critical sections. When the round closed by its window between
the two, the new model held the update while ``metrics.jsonl`` said nobody
pushed, and the worker was dropped as late. The aggregator below makes the
interleaving deterministic: its ``add`` returns only after the round's window
has expired, and the pushing thread then pauses on its next lock release until
the engine has closed the round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.ps import ParameterServer
from enclavefl.server.strategy import build_strategy
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.messages import TaskKind
from tests.unit.server.test_ps import DELTA_A, INITIAL, PEER_A, Engine, job, push

WINDOW_S = 0.6


class _SlowAdd(WeightedMean):
    """A WeightedMean whose add() finishes only after the round's window expired."""

    added = threading.Event()

    def add(self, update: ParamSet, weight: float) -> None:
        time.sleep(WINDOW_S + 0.4)
        super().add(update, weight)
        _SlowAdd.added.set()


class _PausingLock:
    """Wraps the PS lock: after add() finished, the pushing thread's next release waits for the close."""

    def __init__(self, inner: Any, pusher: Callable[[], bool], closed: Callable[[], bool]) -> None:
        self._inner = inner
        self._pusher = pusher
        self._closed = closed
        self._paused = False

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._inner.acquire(*args, **kwargs))

    def release(self) -> None:
        self._inner.release()
        if self._pusher() and _SlowAdd.added.is_set() and not self._paused:
            self._paused = True
            deadline = time.monotonic() + 5
            while not self._closed() and time.monotonic() < deadline:
                time.sleep(0.01)

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_update_folded_at_the_window_close_is_counted_or_left_out_whole(tmp_path: Path) -> None:
    # Prepare: one worker, a round that closes by its window while the update is mid-fold.
    _SlowAdd.added.clear()
    config = job(min_workers=1, update_window_s=WINDOW_S)
    strategy = replace(build_strategy(config, StreamHeader.of(INITIAL), spill_dir=tmp_path), aggregator=_SlowAdd)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, strategy=strategy)
    pusher = threading.current_thread()
    ps.core.cond = threading.Condition(_PausingLock(  # type: ignore[arg-type]
        ps.core.lock, lambda: threading.current_thread() is pusher, lambda: bool(ps.metrics.history)))
    a = ps.join(PEER_A, "a", 10).worker_id
    engine = Engine(ps)
    assert ps.wait_task(PEER_A, a, 5).kind is TaskKind.TRAIN

    # Execute
    accepted = True
    try:
        push(ps, PEER_A, a, DELTA_A, 1)
    except Exception:  # the PS may refuse the late update; then it must not be in the model
        accepted = False
    deadline = time.monotonic() + 10
    while not ps.metrics.history and time.monotonic() < deadline:
        time.sleep(0.01)

    # Assert: the model holds the update exactly when the round's record counts it.
    row = ps.metrics.history[0] if ps.metrics.history else None
    in_model = not np.array_equal(ps.params["w"], INITIAL["w"])
    if in_model:
        assert row is not None and row["participants"] == 1 and row["num_samples"] == 1, row
        assert accepted
        assert a in ps.core.registry, "a worker whose update was aggregated must not be dropped as late"
    else:
        assert not accepted
        assert row is None or row["participants"] == 0
    try:
        ps.wait_task(PEER_A, a, 5)
    except Exception:
        pass
    engine.join(15)
