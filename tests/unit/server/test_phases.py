"""Tests for enclavefl.server.phases: the phase table."""

from __future__ import annotations

import itertools

import pytest

from enclavefl.errors import RoundError
from enclavefl.server.phases import Phase, check_transition

# Written out independently of the module's own table.
LEGAL = {
    (Phase.WAITING, Phase.TRAINING),
    (Phase.WAITING, Phase.FINISHED),
    (Phase.TRAINING, Phase.AGGREGATING),
    (Phase.TRAINING, Phase.WAITING),
    (Phase.TRAINING, Phase.FINISHED),
    (Phase.AGGREGATING, Phase.WAITING),
    (Phase.AGGREGATING, Phase.TRAINING),
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
