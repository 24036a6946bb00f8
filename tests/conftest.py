"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_log_handlers_a_test_added_are_removed() -> Iterator[None]:
    """A test that calls the CLI's ``main`` in process leaves no log handler behind.

    The CLI makes a handler on the ``sys.stderr`` of that moment its root handler;
    under pytest that is the test's capture stream, closed when the test ends, so
    a thread still logging in a later test would write to a closed file.
    """
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
