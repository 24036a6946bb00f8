from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.server.live_job import LiveJob


@pytest.fixture
def live() -> Iterator[list[LiveJob]]:
    """Jobs a test started (with :func:`~tests.unit.server.live_job.start`); closed after it, pass or fail."""
    jobs: list[LiveJob] = []
    yield jobs
    for j in jobs:  # a failed test must not leave threads running
        j.close()
