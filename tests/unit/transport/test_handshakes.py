from __future__ import annotations

import logging
import time

import pytest

from enclavefl.transport.handshakes import HandshakeWatch

GRACE_S = 0.1


def _settle() -> None:
    time.sleep(GRACE_S * 4)


def test_a_connection_that_makes_no_call_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    watch = HandshakeWatch("check ca.pem", grace_s=GRACE_S)

    with caplog.at_level(logging.WARNING, logger="enclavefl.transport.handshakes"):
        watch.connection_started()
        _settle()

    assert watch.failed_total == 1
    assert [r.getMessage() for r in caplog.records if r.name == "enclavefl.transport.handshakes"] == [
        "1 incoming connection(s) failed the TLS handshake or made no call: a worker's CA or certificate does not "
        "match this PS's, or it checks another server name; check ca.pem"
    ]


def test_a_connection_that_makes_a_call_is_not_counted() -> None:
    watch = HandshakeWatch("", grace_s=GRACE_S)

    watch.connection_started()
    watch.call_seen("ipv4:127.0.0.1:50000")
    watch.call_seen("ipv4:127.0.0.1:50000")  # later calls on the same connection change nothing
    _settle()

    assert watch.failed_total == 0


def test_two_connections_one_call_counts_one_failure() -> None:
    watch = HandshakeWatch("", grace_s=GRACE_S)

    watch.connection_started()
    watch.connection_started()
    watch.call_seen("ipv4:127.0.0.1:50001")
    _settle()

    assert watch.failed_total == 1


def test_failures_are_logged_at_most_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    watch = HandshakeWatch("", grace_s=GRACE_S, report_every_s=60.0)

    with caplog.at_level(logging.WARNING, logger="enclavefl.transport.handshakes"):
        for _ in range(3):
            watch.connection_started()
            _settle()

    assert watch.failed_total == 3
    # Only this logger's lines: a refusal summary of an earlier test may be written by its timer meanwhile.
    assert len([r for r in caplog.records if r.name == "enclavefl.transport.handshakes"]) == 1


def test_close_stops_the_checker_thread_without_reporting(caplog: pytest.LogCaptureFixture) -> None:
    watch = HandshakeWatch("hint", grace_s=30.0)
    watch.connection_started()
    checker = watch._checker
    assert checker is not None and checker.is_alive()

    watch.close()

    assert not checker.is_alive() and watch.failed_total == 0
    watch.connection_started()  # after close: nothing starts again
    assert watch._checker is None
