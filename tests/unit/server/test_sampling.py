"""Tests for enclavefl.server.sampling: reproducible uniform client sampling."""

from __future__ import annotations

import math

import pytest

from enclavefl.server.sampling import Candidate, UniformSampler


def sample_workers(ids: list[str], fraction: float, minimum: int, seed: int, round_: int, attempt: int) -> list[str]:
    candidates = [Candidate(worker_id=i, name=f"name-{i}", num_samples=1) for i in ids]
    return UniformSampler(fraction, minimum, seed).sample(candidates, round_, attempt)


WORKERS = [f"w-{i:02d}" for i in range(10)]


def test_sample_is_deterministic() -> None:
    first = sample_workers(WORKERS, 0.5, 1, seed=3, round_=4, attempt=0)

    assert sample_workers(WORKERS, 0.5, 1, seed=3, round_=4, attempt=0) == first
    assert sample_workers(list(reversed(WORKERS)), 0.5, 1, seed=3, round_=4, attempt=0) == first


def test_sample_is_a_sorted_subset_without_repeats() -> None:
    chosen = sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=0)

    assert chosen == sorted(set(chosen))
    assert set(chosen) <= set(WORKERS)


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 1, 10),
        (10, 0.5, 1, 5),
        (10, 0.31, 1, 4),   # ceil(3.1)
        (10, 0.01, 1, 1),
        (10, 0.1, 4, 4),    # the minimum wins
        (3, 0.5, 5, 3),     # never more than there are
        (0, 1.0, 1, 0),
    ],
)
def test_sample_size(n: int, fraction: float, minimum: int, expected: int) -> None:
    chosen = sample_workers(WORKERS[:n], fraction, minimum, seed=1, round_=1, attempt=0)

    assert len(chosen) == expected
    assert expected == min(n, max(minimum, math.ceil(fraction * n)))


def test_sample_changes_with_round_seed_and_attempt() -> None:
    base = sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=0)

    by_round = {tuple(sample_workers(WORKERS, 0.3, 1, seed=0, round_=r, attempt=0)) for r in range(1, 21)}
    by_seed = {tuple(sample_workers(WORKERS, 0.3, 1, seed=s, round_=1, attempt=0)) for s in range(20)}
    by_attempt = {tuple(sample_workers(WORKERS, 0.3, 1, seed=0, round_=1, attempt=a)) for a in range(20)}

    assert tuple(base) in by_round
    assert len(by_round) > 1 and len(by_seed) > 1 and len(by_attempt) > 1


def test_sample_depends_on_names_not_on_per_ps_ids() -> None:
    # Two runs of one job: the same worker names, but each PS hands out random ids.
    first = [Candidate(f"w-{i}", f"worker-{i}", 1) for i in range(10)]
    second = [Candidate(f"x-{9 - i}", f"worker-{i}", 1) for i in range(10)]
    sampler = UniformSampler(0.3, 1, 5)

    def names(chosen: list[str], pool: list[Candidate]) -> set[str]:
        return {c.name for c in pool if c.worker_id in chosen}

    assert names(sampler.sample(first, 2, 0), first) == names(sampler.sample(second, 2, 0), second)
