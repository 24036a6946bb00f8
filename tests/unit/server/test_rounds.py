"""Tests for enclavefl.server.rounds: the phase table, round state and sampling."""

from __future__ import annotations

import itertools
import math

import pytest

from enclavefl.errors import RoundError
from enclavefl.server.rounds import Phase, RoundState, check_transition, sample_workers

# Written out independently of the module's own table.
LEGAL = {
    (Phase.WAITING, Phase.TRAINING),
    (Phase.WAITING, Phase.FINISHED),
    (Phase.TRAINING, Phase.AGGREGATING),
    (Phase.TRAINING, Phase.FINISHED),
    (Phase.AGGREGATING, Phase.WAITING),
    (Phase.AGGREGATING, Phase.FINISHED),
}
ALL_PAIRS = list(itertools.product(Phase, Phase))


@pytest.mark.parametrize(("current", "new"), sorted(LEGAL, key=str))
def test_legal_transition_is_allowed(current: Phase, new: Phase) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(("current", "new"), [p for p in ALL_PAIRS if p not in LEGAL])
def test_illegal_transition_is_refused(current: Phase, new: Phase) -> None:
    with pytest.raises(RoundError, match=f"{current.value} -> {new.value}"):
        check_transition(current, new)


def test_finished_is_final() -> None:
    for new in Phase:
        with pytest.raises(RoundError):
            check_transition(Phase.FINISHED, new)


WORKERS = [f"w-{i:02d}" for i in range(10)]


def test_sample_is_deterministic() -> None:
    first = sample_workers(WORKERS, 0.5, 1, seed=3, round_=4, attempt=0)

    assert sample_workers(WORKERS, 0.5, 1, seed=3, round_=4, attempt=0) == first
    assert sample_workers(list(reversed(WORKERS)), 0.5, 1, seed=3, round_=4, attempt=0) == first


def test_sample_is_a_sorted_subset_without_repeats() -> None:
    chosen = sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=0)

    assert chosen == sorted(set(chosen))
    assert set(chosen) <= set(WORKERS)


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 1, 10),
        (10, 0.5, 1, 5),
        (10, 0.31, 1, 4),   # ceil(3.1)
        (10, 0.01, 1, 1),
        (10, 0.1, 4, 4),    # the minimum wins
        (3, 0.5, 5, 3),     # never more than there are
        (0, 1.0, 1, 0),
    ],
)
def test_sample_size(n: int, fraction: float, minimum: int, expected: int) -> None:
    chosen = sample_workers(WORKERS[:n], fraction, minimum, seed=1, round_=1, attempt=0)

    assert len(chosen) == expected
    assert expected == min(n, max(minimum, math.ceil(fraction * n)))


def test_sample_changes_with_round_seed_and_attempt() -> None:
    base = sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=0)

    by_round = {tuple(sample_workers(WORKERS, 0.3, 1, seed=0, round_=r, attempt=0)) for r in range(1, 21)}
    by_seed = {tuple(sample_workers(WORKERS, 0.3, 1, seed=s, round_=1, attempt=0)) for s in range(20)}
    by_attempt = {tuple(sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=a)) for a in range(20)}

    assert tuple(base) in by_round
    assert len(by_round) > 1 and len(by_seed) > 1 and len(by_attempt) > 1


def round_state(sampled: set[str], required: int) -> RoundState:
    return RoundState(number=1, model_version=0, attempt=0, sampled=frozenset(sampled), required=required)


def test_round_is_done_when_enough_updates_arrived() -> None:
    rnd = round_state({"a", "b", "c"}, required=2)
    assert not rnd.done()

    rnd.pushed.add("a")
    assert not rnd.done()
    rnd.pushed.add("b")
    assert rnd.done()


def test_round_is_done_when_nobody_else_can_answer() -> None:
    rnd = round_state({"a", "b", "c"}, required=3)
    rnd.pushed.add("a")
    rnd.dropped.update({"b", "c"})

    assert rnd.done()


def test_round_is_not_done_while_an_upload_is_streaming() -> None:
    rnd = round_state({"a", "b"}, required=2)
    rnd.pushed.add("a")
    rnd.dropped.add("b")
    rnd.uploading.add("b")

    assert not rnd.done()
    rnd.uploading.discard("b")
    assert rnd.done()
