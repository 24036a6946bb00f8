"""LEAF FEMNIST loader on the real shards, and its errors on broken ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.errors import DataError
from enclavefl.ml.datasets import FederatedDataset, flatten_federated, load_femnist, load_leaf_json

LEAF = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "leaf-femnist"


def _need() -> Path:
    if not LEAF.is_dir():
        pytest.skip(f"real data not found: {LEAF} (the shared data folder beside the repo)")
    return LEAF


@pytest.fixture(scope="module")
def train() -> FederatedDataset:
    return load_femnist(_need(), "train")


@pytest.mark.shared
def test_train_split_matches_the_data_readme(train: FederatedDataset) -> None:
    # README of the shared data: 3 shards, 16 writers, 779 + 772 + 777 samples.
    assert len(train) == 16
    assert sum(len(d) for d in train.values()) == 2328
    for dataset in train.values():
        assert dataset.x.shape[1:] == (1, 28, 28) and dataset.x.dtype == np.float32
        assert dataset.y.dtype == np.int64
        assert 0 <= int(dataset.y.min()) and int(dataset.y.max()) <= 61


@pytest.mark.shared
def test_test_split_has_the_same_writers(train: FederatedDataset) -> None:
    test = load_femnist(_need() / "test", "test")  # the split folder itself also works
    assert sum(len(d) for d in test.values()) == 266
    assert list(test) == list(train)  # LEAF's "-t sample" keeps every writer in both splits


@pytest.mark.shared
def test_writer_order_and_first_sample_follow_the_files(train: FederatedDataset) -> None:
    shards = sorted((_need() / "train").glob("*.json"))
    users: list[str] = []
    for shard in shards:
        users += json.loads(shard.read_text())["users"]
    assert list(train) == users
    first = json.loads(shards[0].read_text())
    user = first["users"][0]
    raw = first["user_data"][user]
    assert len(train[user]) == first["num_samples"][0]
    np.testing.assert_array_equal(train[user].x[0, 0], np.asarray(raw["x"][0], np.float32).reshape(28, 28))
    np.testing.assert_array_equal(train[user].y, raw["y"])


@pytest.mark.shared
def test_values_keep_leaf_convention_background_one(train: FederatedDataset) -> None:
    flat = flatten_federated(train)
    assert float(flat.x.min()) >= 0.0 and float(flat.x.max()) == 1.0
    assert float(np.median(flat.x)) == 1.0  # most of a character image is background


@pytest.mark.shared
def test_truncated_real_shard_is_refused(tmp_path: Path) -> None:
    shard = sorted((_need() / "test").glob("*.json"))[0]
    broken = tmp_path / shard.name
    broken.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match="not valid LEAF JSON") as info:
        load_leaf_json(broken)
    assert str(broken) in str(info.value)


def _shard(users: dict[str, tuple[list[list[float]], list[Any]]]) -> dict[str, Any]:
    return {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": [list(row) for row in x], "y": list(y)} for u, (x, y) in users.items()},
    }


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


BLANK = [1.0] * 784


def test_shards_load_in_natural_order(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "all_data_10_train.json", _shard({"c": ([BLANK], [3])}))
    _write(tmp_path / "train" / "all_data_2_train.json", _shard({"b": ([BLANK], [2]), "a": ([BLANK], [1])}))
    data = load_femnist(tmp_path, "train")
    assert list(data) == ["b", "a", "c"]
    assert [int(d.y[0]) for d in data.values()] == [2, 1, 3]


def test_missing_split_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no \\*.json shard") as info:
        load_femnist(tmp_path, "train")
    assert str(tmp_path) in str(info.value) and "leaf.cmu.edu" in str(info.value)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("num_samples"), r"missing key\(s\) \['num_samples'\]"),
        (lambda d: d["num_samples"].__setitem__(0, 3), "num_samples says 3, found 2 x and 2 y"),
        (lambda d: d["user_data"]["w1"]["x"][1].pop(), r"user_data\['w1'\].x\[1\]: expected 784 values, found 783"),
        (lambda d: d["user_data"]["w1"]["y"].__setitem__(0, 62), r"labels must be in 0..61, found 61..62"),
        (lambda d: d["user_data"]["w1"]["y"].__setitem__(0, 1.5), "expected integers"),
        (lambda d: d["user_data"]["w1"]["x"][0].__setitem__(5, "0.5"), "expected numbers"),
        (lambda d: d["users"].append("w2"), "2 users but 1 num_samples"),
        (lambda d: d["user_data"].pop("w1"), "expected an object with 'x' and 'y'"),
    ],
)
def test_malformed_shard_is_refused(tmp_path: Path, mutate: Any, message: str) -> None:
    doc = _shard({"w1": ([BLANK, BLANK], [0, 61])})
    mutate(doc)
    path = _write(tmp_path / "shard.json", doc)
    with pytest.raises(DataError, match=message) as info:
        load_leaf_json(path)
    assert str(path) in str(info.value)


def test_non_finite_pixels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "shard.json"
    path.write_text(json.dumps(_shard({"w1": ([BLANK], [0])})).replace("1.0", "NaN", 1))
    with pytest.raises(DataError, match="non-finite"):
        load_leaf_json(path)


def test_writer_in_two_shards_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a_0.json", _shard({"w1": ([BLANK], [0])}))
    _write(tmp_path / "a_1.json", _shard({"w1": ([BLANK], [1])}))
    with pytest.raises(DataError, match="writer 'w1' already appeared"):
        load_femnist(tmp_path, "test")
