"""Per-connection budgets of unauthenticated calls, and the bounded log of refusals."""

from __future__ import annotations

import logging

import pytest

from enclavefl.transport.ratelimit import ConnectionLimiter, RefusalLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_connection_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = ConnectionLimiter(rate_per_s=2.0, burst=3.0, clock=clock)

    first = [limiter.allow("a") for _ in range(4)]
    clock.now += 0.5  # 0.5 s x 2 tokens/s = 1 token
    later = [limiter.allow("a") for _ in range(2)]

    assert first == [True, True, True, False] and later == [True, False]


def test_a_flooded_connection_leaves_another_connection_its_whole_budget() -> None:
    limiter = ConnectionLimiter(rate_per_s=1.0, burst=2.0, clock=Clock())
    for _ in range(1000):
        limiter.allow("ipv4:127.0.0.1:40000")

    assert [limiter.allow("ipv4:127.0.0.1:40001") for _ in range(3)] == [True, True, False]


def test_the_table_stays_bounded_and_a_forgotten_connection_starts_full() -> None:
    limiter = ConnectionLimiter(rate_per_s=1.0, burst=1.0, max_connections=10, clock=Clock())
    assert limiter.allow("old") and not limiter.allow("old")

    for i in range(50):
        limiter.allow(f"new-{i}")

    assert len(limiter) == 10
    assert limiter.allow("old")  # forgotten: a full bucket again, never less


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        ConnectionLimiter(rate_per_s=0.0)


def test_a_flood_of_refusals_makes_two_lines_per_interval_at_most(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("t.refusals"), interval_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="t.refusals")

    for i in range(10_000):
        clock.now = 100.0 + i * 0.003  # 10,000 refusals over 30 s: 3 intervals
        refusals.refused(f"ipv4:127.0.0.1:{40000 + i % 7}", "rate limited" if i % 2 else "no valid session", f"#{i}")
    refusals.close()

    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("#0 (more are summed up every 10 s)")
    assert 2 <= len(lines) <= 5, lines  # the first in full, then one summary per 10 s and one at close
    assert sum(int(line.split()[0]) for line in lines[1:]) == 9_999  # every other refusal is counted
    assert "from 7 source(s)" in lines[1] and "rate limited" in lines[1] and "no valid session" in lines[1]
    assert refusals.total == 10_000


def test_a_refusal_after_a_quiet_interval_is_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("t.quiet"), interval_s=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="t.quiet")

    refusals.refused("a", "x", "first")
    clock.now += 60.0
    refusals.refused("a", "x", "second, an hour of quiet later")
    refusals.close()

    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["first", "second, an hour of quiet later"]
