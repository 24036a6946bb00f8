"""QuietLog: a few lines per kind of event per window, then a count of what was left out."""

from __future__ import annotations

import logging

import pytest

from enclavefl.transport.quietlog import QuietLog

LOGGER = "enclavefl.tests.quietlog"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_beyond_the_window_budget_are_left_out_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    quiet = QuietLog(logging.getLogger(LOGGER), lines_per_window=2, window_s=10.0, clock=clock)

    written = [quiet.warning("malformed", "line %d", i) for i in range(5)]

    assert written == [True, True, False, False, False]
    assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1"]
    assert quiet.suppressed("malformed") == 3


def test_the_first_line_of_a_new_window_says_how_many_were_left_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    quiet = QuietLog(logging.getLogger(LOGGER), lines_per_window=1, window_s=10.0, clock=clock)
    for _ in range(4):
        quiet.warning("malformed", "refused")

    clock.now = 10.0
    quiet.warning("malformed", "refused")

    assert caplog.records[-1].getMessage() == "refused (3 more 'malformed' lines left out in the previous 10s)"


def test_each_kind_has_its_own_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    quiet = QuietLog(logging.getLogger(LOGGER), lines_per_window=1, window_s=10.0, clock=Clock())

    assert quiet.warning("a", "first a") and not quiet.warning("a", "second a")
    assert quiet.error("b", "first b")


def test_non_positive_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="lines_per_window >= 1"):
        QuietLog(logging.getLogger(LOGGER), lines_per_window=0)
