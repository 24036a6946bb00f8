"""Tests for enclavefl.server.round: one atomic accept, done(), close()."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.errors import UpdateRejected
from enclavefl.messages import UpdateMeta
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.round import Round
from enclavefl.tensors import ParamSet, StreamHeader

MODEL = ParamSet({"w": np.zeros(2, dtype=np.float32)})
TEMPLATE = StreamHeader.of(MODEL)


def round_state(sampled: set[str], required: int) -> Round:
    return Round(number=1, model_version=0, attempt=0, sampled=frozenset(sampled), required=required,
                 aggregator=WeightedMean(TEMPLATE), template=TEMPLATE, window_s=10)


def meta(worker_id: str, round_: int = 1) -> UpdateMeta:
    return UpdateMeta(worker_id, round_, 0, 1, TEMPLATE)


def push(rnd: Round, worker_id: str, value: float = 1.0) -> None:
    rnd.admit(meta(worker_id))
    try:
        rnd.accept(worker_id, ParamSet({"w": np.full(2, value, dtype=np.float32)}), 1.0, 1, 8, {})
    finally:
        rnd.end_upload(worker_id)


def test_round_is_done_when_enough_updates_arrived() -> None:
    rnd = round_state({"a", "b", "c"}, required=2)
    assert not rnd.done()

    push(rnd, "a")
    assert not rnd.done()
    push(rnd, "b")
    assert rnd.done()


def test_round_is_done_when_nobody_else_can_answer() -> None:
    rnd = round_state({"a", "b", "c"}, required=3)
    push(rnd, "a")
    rnd.mark_dropped("b")
    rnd.mark_dropped("c")

    assert rnd.done()


def test_round_is_not_done_while_an_upload_is_streaming() -> None:
    rnd = round_state({"a", "b"}, required=2)
    push(rnd, "a")
    rnd.mark_dropped("b")
    rnd.admit(meta("b"))

    assert not rnd.done()
    rnd.end_upload("b")
    assert rnd.done()


def test_accept_after_close_is_refused_and_leaves_no_trace() -> None:
    rnd = round_state({"a", "b"}, required=2)
    push(rnd, "a", 2.0)
    rnd.admit(meta("b"))
    record = rnd.close()

    with pytest.raises(UpdateRejected, match="closed"):
        rnd.accept("b", ParamSet({"w": np.full(2, 100.0, dtype=np.float32)}), 1.0, 1, 8, {})

    assert record.pushed == {"a"} and record.num_samples == 1
    assert rnd.aggregator.count == 1
    np.testing.assert_array_equal(rnd.aggregator.result()["w"], [2.0, 2.0])


def test_a_refused_fold_is_not_recorded() -> None:
    rnd = round_state({"a"}, required=1)
    rnd.admit(meta("a"))
    with pytest.raises(UpdateRejected):
        rnd.accept("a", ParamSet({"w": np.zeros(3, dtype=np.float32)}), 1.0, 1, 12, {})

    record = rnd.close()
    assert record.pushed == frozenset() and record.bytes_in == 0 and rnd.aggregator.count == 0


@pytest.mark.parametrize(("worker", "round_", "reason"), [
    ("z", 1, "was not sampled"),
    ("a", 2, "update for round 2"),
])
def test_admit_refuses_and_counts(worker: str, round_: int, reason: str) -> None:
    rnd = round_state({"a"}, required=1)
    with pytest.raises(UpdateRejected, match=reason):
        rnd.admit(meta(worker, round_))
    assert rnd.close().rejected == 1


def test_second_upload_of_one_worker_is_refused() -> None:
    rnd = round_state({"a"}, required=1)
    push(rnd, "a")
    with pytest.raises(UpdateRejected, match="already pushed"):
        rnd.admit(meta("a"))


def test_a_retracted_update_leaves_the_record_as_if_it_never_arrived() -> None:
    # Prepare: a (1 sample, 8 bytes, loss 0.5) and b (1 sample, 8 bytes, loss 0.25) pushed.
    rnd = round_state({"a", "b"}, required=2)
    for worker, loss in (("a", 0.5), ("b", 0.25)):
        rnd.admit(meta(worker))
        rnd.accept(worker, ParamSet({"w": np.ones(2, dtype=np.float32)}), 1.0, 1, 8, {"loss": loss})
        rnd.end_upload(worker)

    # Execute: b's update is taken back (its aggregator dropped it after the fold).
    rnd.retract("b", 1.0, 1, 8, {"loss": 0.25})

    # Assert: only a is recorded (1 sample, weight 1, 8 bytes, its metrics); b may upload again.
    assert not rnd.done()
    rnd.admit(meta("b"))
    record = rnd.close()
    assert record.pushed == {"a"} and record.num_samples == 1 and record.weight == 1.0 and record.bytes_in == 8
    assert record.worker_metrics == ({"loss": 0.5},)


def test_retracting_a_worker_without_an_accepted_update_is_refused() -> None:
    rnd = round_state({"a"}, required=1)

    with pytest.raises(UpdateRejected, match="no accepted update"):
        rnd.retract("a", 1.0, 1, 8, {})
