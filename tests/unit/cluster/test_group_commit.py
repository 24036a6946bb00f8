"""Tests for the group commit of enclavefl.cluster.ledger: several uploads, one partial write.

Each test runs on every store (the ``store`` fixture: memory, redis, sealed redis). A
wrapper around the store holds or refuses a chosen ``accept`` call, so the uploads
that arrive meanwhile are folded and wait for the next write, as under load.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from enclavefl.cluster import MemoryStore, Store, StoreConflict, StoreUnavailable, UpdateRef
from enclavefl.cluster.ledger import LedgerTarget, StoreAggregator
from enclavefl.errors import UpdateRejected
from enclavefl.messages import UpdateMeta
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.round import Round
from enclavefl.tensors import ParamSet, StreamHeader

TEMPLATE = StreamHeader.of(ParamSet({"w": np.zeros(2, np.float32)}))

Around = Callable[[int, Callable[[], int]], int]
"""Runs ``accept`` call number n (from 1): call the second argument to let it reach the store."""


def around_accept(inner: Store, around: Around) -> Store:
    """``inner``, except that every ``accept`` goes through ``around``."""
    calls = itertools.count(1)

    def delegate(name: str) -> Any:
        def call(self: Store, *args: Any, **kwargs: Any) -> Any:
            if name == "accept":
                return around(next(calls), lambda: inner.accept(*args, **kwargs))
            return getattr(inner, name)(*args, **kwargs)
        return call

    cls = type("AroundAccept", (Store,), {name: delegate(name) for name in Store.__abstractmethods__})
    made: Store = cls()
    return made


class Gate:
    """Holds ``accept`` call ``held`` until opened; ``then`` decides what that call does once let through."""

    def __init__(self, held: int, then: Around = lambda n, proceed: proceed()) -> None:
        self.held, self.then = held, then
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, n: int, proceed: Callable[[], int]) -> int:
        if n == self.held:
            self.entered.set()
            self.opened.wait(10)
            return self.then(n, proceed)
        return proceed()


def serve(store: Store, workers: list[str], server: str = "s1") -> tuple[Round, StoreAggregator]:
    """Round 1 open in the store, and one server's local round over it."""
    if store.round_state(1) is None:
        store.publish_model(0, b"model-0")
        store.open_round(1, 0, model_version=0, sampled=workers, required=len(workers))
    agg = StoreAggregator(WeightedMean, TEMPLATE, store, number=1, attempt=0, server=server)
    return Round(1, 0, 0, frozenset(workers), len(workers), agg, TEMPLATE, 60.0), agg


def push(rnd: Round, agg: StoreAggregator, worker: str, value: float, outcome: dict[str, str]) -> None:
    """One upload as the staging code makes it: 2 samples (weight 2), 8 bytes; outcome "" or why refused."""
    rnd.admit(UpdateMeta(worker, 1, 0, 2, TEMPLATE))
    target = LedgerTarget(rnd, agg, UpdateRef(worker, f"1/{worker}"))
    try:
        target.accept(worker, ParamSet({"w": np.full(2, value, np.float32)}), 2.0, 2, 8, {"loss": 0.5})
        outcome[worker] = ""
    except UpdateRejected as exc:
        target.note_rejection(worker)
        outcome[worker] = str(exc)
    finally:
        target.end_upload(worker)


def start(rnd: Round, agg: StoreAggregator, values: dict[str, float], outcome: dict[str, str]) -> list[threading.Thread]:
    threads = [threading.Thread(target=push, args=(rnd, agg, w, v, outcome)) for w, v in values.items()]
    for t in threads:
        t.start()
    return threads


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stored_mean(store: Store, server: str = "s1") -> np.ndarray[Any, Any]:
    partial = store.partial(1, 0, server)
    assert partial is not None
    merged = WeightedMean(TEMPLATE)
    merged.merge({server: partial.blob})
    return np.asarray(merged.result()["w"])


def test_uploads_folded_during_a_write_share_the_next_write(store: Store) -> None:
    # Prepare: the first write (w0's) is held in the store while w1..w5 upload.
    gate = Gate(held=1)
    rnd, agg = serve(around_accept(store, gate), [f"w{i}" for i in range(6)])
    outcome: dict[str, str] = {}
    first = start(rnd, agg, {"w0": 0.0}, outcome)
    assert gate.entered.wait(10)

    # Execute
    others = start(rnd, agg, {f"w{i}": float(i) for i in range(1, 6)}, outcome)
    folded_meanwhile = wait_until(lambda: agg.count == 6)
    gate.opened.set()
    for t in first + others:
        t.join(10)

    # Assert: 6 updates accepted in 2 writes (w0, then w1..w5 together); the partial is their
    # mean, (0 + 1 + 2 + 3 + 4 + 5) / 6 = 2.5, and the round's record matches the store.
    assert folded_meanwhile, "uploads waited for the write in flight instead of folding"
    assert outcome == {f"w{i}": "" for i in range(6)}
    partial = store.partial(1, 0, "s1")
    assert partial is not None and partial.generation == agg.generation == 2
    assert partial.update_ids == {f"1/w{i}" for i in range(6)}
    np.testing.assert_array_equal(stored_mean(store), [2.5, 2.5])
    record, state = rnd.close(), store.round_state(1)
    assert state is not None and state.counters["accepted"] == len(record.pushed) == 6
    assert state.counters["num_samples"] == record.num_samples == 12


def test_a_duplicate_in_a_write_rejects_that_update_alone(store: Store) -> None:
    # Prepare: server s2 already accepted update 1/a; on s1 the write of x is held while a
    # (re-sending 1/a after a failover), b and c upload.
    workers = ["x", "a", "b", "c"]
    rnd2, agg2 = serve(store, workers, server="s2")
    push(rnd2, agg2, "a", 7.0, {})
    gate = Gate(held=1)
    rnd, agg = serve(around_accept(store, gate), workers)
    outcome: dict[str, str] = {}
    first = start(rnd, agg, {"x": 1.0}, outcome)
    assert gate.entered.wait(10)

    # Execute
    others = start(rnd, agg, {"a": 7.0, "b": 2.0, "c": 3.0}, outcome)
    folded_meanwhile = wait_until(lambda: agg.count == 4)
    gate.opened.set()
    for t in first + others:
        t.join(10)

    # Assert: a is "already counted"; b and c are written together in the second write; s1's
    # partial is mean(1, 2, 3) = 2; its record holds x, b, c (the store's counters add s2's a: 2 samples).
    assert folded_meanwhile
    assert "already counted" in outcome["a"]
    assert outcome["x"] == outcome["b"] == outcome["c"] == ""
    partial = store.partial(1, 0, "s1")
    assert partial is not None and partial.generation == 2 and partial.update_ids == {"1/x", "1/b", "1/c"}
    np.testing.assert_array_equal(stored_mean(store), [2.0, 2.0])
    np.testing.assert_array_equal(agg.result()["w"], [2.0, 2.0])
    record, state = rnd.close(), store.round_state(1)
    assert record.pushed == {"x", "b", "c"} and record.rejected_ids == {"a"}
    assert state is not None and state.counters["num_samples"] == record.num_samples + 2 == 8


def test_a_refused_write_rejects_its_updates_and_keeps_those_folded_meanwhile(store: Store) -> None:
    # Prepare: x is accepted; the write of a is held, then refused, while b uploads.
    def refuse(n: int, proceed: Callable[[], int]) -> int:
        raise StoreConflict("round 1 attempt 0: the partial of server s1 moved (test)")

    gate = Gate(held=2, then=refuse)
    rnd, agg = serve(around_accept(store, gate), ["x", "a", "b"])
    outcome: dict[str, str] = {}
    push(rnd, agg, "x", 1.0, outcome)
    first = start(rnd, agg, {"a": 9.0}, outcome)
    assert gate.entered.wait(10)

    # Execute
    others = start(rnd, agg, {"b": 3.0}, outcome)
    folded_meanwhile = wait_until(lambda: agg.count == 3)
    gate.opened.set()
    for t in first + others:
        t.join(10)

    # Assert: a is rejected with the store's reason; b, folded during the refused write, is
    # written next. The aggregate equals the stored partial: mean(1, 3) = 2, without a's 9.
    assert folded_meanwhile
    assert "moved (test)" in outcome["a"] and outcome["b"] == ""
    partial = store.partial(1, 0, "s1")
    assert partial is not None and partial.update_ids == {"1/x", "1/b"} and partial.generation == agg.generation == 2
    assert agg.count == 2
    np.testing.assert_array_equal(agg.result()["w"], stored_mean(store))
    np.testing.assert_array_equal(stored_mean(store), [2.0, 2.0])
    record, state = rnd.close(), store.round_state(1)
    assert record.pushed == {"x", "b"} and record.worker_metrics == ({"loss": 0.5}, {"loss": 0.5})
    assert state is not None and state.counters["num_samples"] == record.num_samples == 4


def test_a_write_that_landed_before_the_store_went_away_is_accepted(store: Store) -> None:
    # Prepare: the store applies the write, then the reply is lost.
    def lost_reply(n: int, proceed: Callable[[], int]) -> int:
        proceed()
        raise StoreUnavailable("accept: connection reset (test)")

    rnd, agg = serve(around_accept(store, lost_reply), ["a"])
    outcome: dict[str, str] = {}

    # Execute
    push(rnd, agg, "a", 4.0, outcome)

    # Assert: the stored partial holds a, so the upload is accepted and recorded once.
    assert outcome == {"a": ""}
    assert agg.generation == 1 and rnd.close().pushed == {"a"}


def test_a_write_that_did_not_land_is_rejected_and_leaves_no_record(store: Store) -> None:
    # Prepare: the store is gone before the write reaches it.
    def gone(n: int, proceed: Callable[[], int]) -> int:
        raise StoreUnavailable("accept: connection refused (test)")

    rnd, agg = serve(around_accept(store, gone), ["a"])
    outcome: dict[str, str] = {}

    # Execute
    push(rnd, agg, "a", 4.0, outcome)

    # Assert
    assert "could not be reached" in outcome["a"]
    assert agg.count == 0 and store.partial(1, 0, "s1") is None
    record = rnd.close()
    assert record.pushed == frozenset() and record.num_samples == 0 and record.rejected == 1


def test_an_update_still_waiting_when_the_round_closes_is_rejected() -> None:
    # Prepare: a is folded, not yet written, when the server closes its local round.
    store = MemoryStore()
    _, agg = serve(store, ["a"])
    ref = UpdateRef("a", "1/a")
    with agg.name(ref, {"num_samples": 2}):
        agg.add(ParamSet({"w": np.ones(2, np.float32)}), 2.0)
    agg.close()

    # Execute / Assert
    with pytest.raises(UpdateRejected, match="closed"):
        agg.commit(ref)
    assert store.accepted(1, 0) == {}
