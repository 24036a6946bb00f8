"""Fixtures for the management tests: real parameter servers (see live.py), held open or run to their end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.management.live import finished_job, held_job
from tests.unit.server.live_job import LiveJob


@pytest.fixture
def held(tmp_path: Path) -> Iterator[LiveJob]:
    """A running job with round 1 held open, for a test that controls it (pause, stop, new settings)."""
    with held_job(tmp_path / "ps") as live:
        yield live


@pytest.fixture(scope="module")
def reading(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveJob]:
    """A running job with round 1 held open, shared by the tests of a module that only read it."""
    with held_job(tmp_path_factory.mktemp("reading")) as live:
        yield live


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveJob]:
    """A job that ran its 3 rounds to the end, shared by the tests of a module (none can change it)."""
    with finished_job(tmp_path_factory.mktemp("finished"), rounds=3) as live:
        yield live
