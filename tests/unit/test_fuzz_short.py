"""A short run of every fuzz target (fuzz/targets.py): seeds, mutated seeds and random bytes.

Only the project's own errors may escape a parser at the PS's boundary; the
long runs are ``make fuzz``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from enclavefl.errors import EnclaveFLError
from fuzz.run import inputs, mutate
from fuzz.targets import TARGETS, Target, quiet_logs, run_one

EXAMPLES_PER_TARGET = 25


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("enclavefl")
    level = logger.level
    quiet_logs()
    yield
    logger.setLevel(level)  # later tests read these logs


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_is_taken_or_refused_with_a_project_error(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()

    assert seeds
    for seed in seeds:
        run_one(target, seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzzed_inputs_raise_only_project_errors(name: str) -> None:
    target: Target = TARGETS[name]

    @settings(max_examples=EXAMPLES_PER_TARGET, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs(target.seeds()))
    def check(data: bytes) -> None:
        run_one(target, data)

    check()


def test_run_one_lets_a_foreign_error_through() -> None:
    def broken(data: bytes) -> None:
        raise ValueError("not ours")

    with pytest.raises(ValueError):
        run_one(Target("broken", broken, lambda: [b""]), b"x")


def test_run_one_takes_a_project_error_as_a_refusal() -> None:
    def refuses(data: bytes) -> None:
        raise EnclaveFLError("refused")

    run_one(Target("refuses", refuses, lambda: [b""]), b"x")


def test_mutate_overwrites_inserts_and_deletes() -> None:
    # "abcdef": overwrite at 1 -> "aXcdef"; insert "YY" at 0 -> "YYaXcdef"; delete 2 bytes at 6 -> "YYaXcd".
    assert mutate(b"abcdef", [(0, 1, b"X"), (1, 0, b"YY"), (2, 6, b"..")]) == b"YYaXcd"
