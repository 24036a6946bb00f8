"""The process table, read from /proc: which processes a command started, and whether they still run."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    """One process, named by its pid and its start time (a pid alone may be reused)."""

    pid: int
    start: int


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def children_of(pid: int) -> list[Proc]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.append(Proc(int(entry.name), stat[2]))
    return found


def running(proc: Proc) -> bool:
    """Whether ``proc`` still runs (a zombie waiting to be reaped does not)."""
    stat = _stat(proc.pid)
    return stat is not None and stat[2] == proc.start and stat[0] != "Z"


def kill_all(procs: list[Proc]) -> None:
    """SIGKILLs whichever of ``procs`` still run (a test's clean-up after a failure)."""
    for p in procs:
        if running(p):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
