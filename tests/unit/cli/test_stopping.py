from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from enclavefl.cli.stopping import PARENT_POLL_S, StopSignals, Stopped, exit_code_for, raise_on_stop_signals


def test_exit_codes_are_128_plus_the_signal() -> None:
    assert [exit_code_for(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == [130, 143, 129]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_run_turns_sigterm_and_sighup_into_stopped(signum: int) -> None:
    before = signal.getsignal(signum)

    with pytest.raises(Stopped) as caught, raise_on_stop_signals():
        os.kill(os.getpid(), signum)
        threading.Event().wait(1.0)  # the handler raises on this thread before the wait ends

    assert caught.value.signum == signum
    assert isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signum) is before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_calls_the_callbacks_from_another_thread(signum: int) -> None:
    called = threading.Event()
    threads: list[str] = []
    stopper = StopSignals()
    try:
        stopper.on_stop(lambda: (threads.append(threading.current_thread().name), called.set()))

        os.kill(os.getpid(), signum)

        assert called.wait(5.0)
        assert stopper.signum == signum
        assert threads == ["stop-signals"]
    finally:
        stopper.close()


def test_a_callback_added_after_the_stop_runs_at_once() -> None:
    stopper = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(PARENT_POLL_S * 2)
        calls: list[int] = []

        stopper.on_stop(lambda: calls.append(1))

        assert calls == [1]
    finally:
        stopper.close()


def test_a_parent_that_is_gone_stops_the_command_as_a_hangup() -> None:
    called = threading.Event()
    stopper = StopSignals(parent_pid=os.getppid() + 1_000_000)  # never our parent: as if it had died
    try:
        stopper.on_stop(called.set)

        assert called.wait(5 * PARENT_POLL_S)
        assert stopper.signum == signal.SIGHUP
    finally:
        stopper.close()


def test_close_restores_the_handlers_and_calls_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    calls: list[int] = []
    stopper = StopSignals(parent_pid=os.getppid())
    stopper.on_stop(lambda: calls.append(1))

    stopper.close()

    assert signal.getsignal(signal.SIGTERM) is before
    assert calls == [] and not stopper.stopped


def test_a_second_stop_signal_exits_at_once() -> None:
    # The first SIGTERM starts a stop that never ends (its callback blocks); the second exits with 143.
    code = (
        "import os, signal, threading, time\n"
        "from enclavefl.cli.stopping import StopSignals\n"
        "stopper = StopSignals()\n"
        "stopper.on_stop(threading.Event().wait)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(1.0)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(10.0)\n"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)

    assert done.returncode == 143
    assert done.stderr.endswith("SIGTERM again: exiting at once\n")
