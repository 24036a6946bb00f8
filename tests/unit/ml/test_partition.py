"""Partitioners: coverage, determinism, measurable skew, the registry and the summaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets import ArrayDataset, flatten_federated, load_femnist
from enclavefl.ml.partition import (
    PARTITIONERS,
    by_writer,
    dirichlet,
    iid,
    label_histogram,
    label_skew,
    partition_summary,
    quantity_skew,
)

LEAF = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "leaf-femnist"
# 10 classes of uneven size, 3000 samples, fixed.
LABELS = np.random.default_rng(123).choice(10, size=3000, p=np.linspace(1, 2, 10) / 15).astype(np.int64)


def _dataset(n: int = 3000) -> ArrayDataset:
    return ArrayDataset(x=np.arange(n, dtype=np.float32).reshape(n, 1), y=LABELS[:n])


def _assert_exact_cover(parts: Sequence[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert sum(len(p) for p in parts) == n
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == n  # no index twice
    assert int(joined.min()) == 0 and int(joined.max()) == n - 1


def _same(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_is_an_even_exact_cover() -> None:
    parts = iid(1003, 4, seed=0)
    _assert_exact_cover(parts, 1003)
    assert sorted(len(p) for p in parts) == [250, 251, 251, 251]


@pytest.mark.parametrize(
    "split",
    [
        lambda seed: iid(3000, 5, seed),
        lambda seed: dirichlet(LABELS, 5, 0.3, seed),
        lambda seed: quantity_skew(3000, 5, seed, alpha=0.5),
    ],
    ids=["iid", "dirichlet", "quantity"],
)
def test_deterministic_by_seed_and_seeds_differ(split: object) -> None:
    assert callable(split)
    first, again, other = split(7), split(7), split(8)
    _assert_exact_cover(first, 3000)
    assert _same(first, again)
    assert not _same(first, other)


def test_dirichlet_small_alpha_skews_labels_more_than_iid() -> None:
    skew = {alpha: label_skew(dirichlet(LABELS, 10, alpha, seed=1), LABELS, 10) for alpha in (0.1, 1.0, 1000.0)}
    iid_skew = label_skew(iid(3000, 10, seed=1), LABELS, 10)
    assert skew[0.1] > 0.5 > 0.1 > iid_skew
    assert skew[0.1] > skew[1.0] > skew[1000.0]
    assert skew[1000.0] < 0.1


def test_dirichlet_respects_min_size() -> None:
    parts = dirichlet(LABELS, 20, 0.1, seed=3, min_size=10)
    _assert_exact_cover(parts, 3000)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_impossible_min_size_is_a_config_error() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ConfigError, match="no split with min_size=30 .* lower min_size or raise alpha"):
        dirichlet(labels, 3, 0.01, seed=0, min_size=30)
    with pytest.raises(ConfigError, match="min_size must be in 0..50"):
        dirichlet(labels, 2, 0.5, seed=0, min_size=51)


def test_quantity_skew_varies_sizes_but_not_labels() -> None:
    parts = quantity_skew(3000, 10, seed=2, alpha=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    assert label_skew(parts, LABELS, 10) < label_skew(dirichlet(LABELS, 10, 0.1, seed=2), LABELS, 10)


def _federated() -> dict[str, ArrayDataset]:
    sizes = {"w0": 3, "w1": 1, "w2": 4, "w3": 2, "w4": 5}
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = ArrayDataset(
            x=np.arange(start, start + size, dtype=np.float32).reshape(size, 1),
            y=np.full(size, int(name[1]), dtype=np.int64),
        )
        start += size
    return out


def test_by_writer_deals_whole_writers_round_robin() -> None:
    federated = _federated()
    parts = by_writer(federated, 2)
    _assert_exact_cover(parts, 15)
    flat = flatten_federated(federated)
    # worker 0: w0, w2, w4; worker 1: w1, w3 (each the concatenation of its writers)
    assert flat.subset(parts[0]).y.tolist() == [0] * 3 + [2] * 4 + [4] * 5
    assert flat.subset(parts[1]).y.tolist() == [1] + [3] * 2
    with pytest.raises(ConfigError, match=r"num_workers must be in 1..5"):
        by_writer(federated, 6)


@pytest.mark.shared
def test_by_writer_on_real_femnist_keeps_writers_whole() -> None:
    if not LEAF.is_dir():
        pytest.skip(f"real data not found: {LEAF} (the shared data folder beside the repo)")
    federated = load_femnist(LEAF, "test")
    parts = by_writer(federated, 4)
    _assert_exact_cover(parts, 266)
    assert [len(p) for p in parts] == [
        sum(len(d) for d in list(federated.values())[w::4]) for w in range(4)
    ]
    flat = flatten_federated(federated)
    first_writer = next(iter(federated.values()))
    np.testing.assert_array_equal(flat.subset(parts[0]).x[: len(first_writer)], first_writer.x)


def test_registry_calls_every_partitioner_the_same_way() -> None:
    assert sorted(PARTITIONERS) == ["dirichlet", "iid", "quantity", "writer"]
    data = _dataset()
    for name in ("iid", "dirichlet", "quantity"):
        parts = PARTITIONERS[name](data, 3, seed=4)
        _assert_exact_cover(parts, 3000)
    assert _same(PARTITIONERS["dirichlet"](data, 3, seed=4, alpha=0.2), dirichlet(LABELS, 3, 0.2, 4))
    assert _same(PARTITIONERS["quantity"](data, 3, seed=4, alpha=2.0), quantity_skew(3000, 3, 4, alpha=2.0))
    federated = _federated()
    assert _same(PARTITIONERS["writer"](federated, 2), by_writer(federated, 2))
    assert _same(PARTITIONERS["iid"](federated, 2, seed=1), iid(15, 2, 1))  # flattened


def test_registry_refuses_unknown_options_and_wrong_inputs() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['beta'\]"):
        PARTITIONERS["dirichlet"](_dataset(), 3, seed=0, beta=0.5)
    with pytest.raises(ConfigError, match="needs per-writer data"):
        PARTITIONERS["writer"](_dataset(), 3)
    with pytest.raises(ConfigError, match="min_size must be an integer"):
        PARTITIONERS["quantity"](_dataset(), 3, min_size=1.5)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: iid(10, 0, 0), "num_workers must be >= 1"),
        (lambda: iid(3, 4, 0), "cannot split 3 samples among 4 workers"),
        (lambda: dirichlet(LABELS, 3, 0.0, 0), "alpha must be a positive"),
        (lambda: quantity_skew(100, 3, 0, alpha=float("nan")), "alpha must be a positive"),
    ],
)
def test_bad_arguments_are_config_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ConfigError, match=message):
        call()


def test_bad_labels_are_data_errors() -> None:
    with pytest.raises(DataError, match="1-D integer"):
        dirichlet(np.array([0.5, 1.5]), 2, 1.0, 0)
    with pytest.raises(DataError, match="non-negative"):
        label_histogram(np.array([0, -1]), 3)
    with pytest.raises(DataError, match="below num_classes=3, found 3"):
        label_histogram(np.array([0, 3]), 3)


def test_histogram_and_summary_add_up() -> None:
    assert label_histogram(np.array([2, 0, 2]), 4).tolist() == [1, 0, 2, 0]
    parts = dirichlet(LABELS, 4, 0.5, seed=9)
    rows = partition_summary(parts, LABELS, 10)
    assert [r.worker for r in rows] == [0, 1, 2, 3]
    assert [r.size for r in rows] == [len(p) for p in parts]
    assert all(int(r.histogram.sum()) == r.size for r in rows)
    np.testing.assert_array_equal(sum(r.histogram for r in rows), label_histogram(LABELS, 10))


def test_label_skew_extremes() -> None:
    labels = np.repeat(np.arange(2), 50)
    assert label_skew([np.arange(0, 100, 2), np.arange(1, 100, 2)], labels, 2) == 0.0
    assert label_skew([np.arange(50), np.arange(50, 100)], labels, 2) == pytest.approx(0.5)
