"""Criteo TSV loader on the real samples (first lines parsed by hand), and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets import CriteoData, iter_criteo, load_criteo

CRITEO = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "criteo"
TRAIN = CRITEO / "train_sample.txt"
TEST = CRITEO / "test_sample.txt"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real data not found: {path} (the shared data folder beside the repo)")
    return path


@pytest.fixture(scope="module")
def train() -> CriteoData:
    return load_criteo(_need(TRAIN), table_size=1000)


def _by_hand(line: str, table_size: int) -> tuple[list[float], list[int]]:
    """Encode one row's 13 + 26 feature fields the documented way, field by field."""
    fields = line.rstrip("\n").split("\t")[-39:]
    dense = [math.log(1 + max(int(v), 0)) if v else 0.0 for v in fields[:13]]
    categorical = [1 + int(v, 16) % (table_size - 1) if v else 0 for v in fields[13:]]
    return dense, categorical


@pytest.mark.shared
def test_train_sample_shapes_and_labels(train: CriteoData) -> None:
    lines = TRAIN.read_text().splitlines()
    assert len(train) == len(lines) == 10800
    assert train.dense.shape == (10800, 13) and train.dense.dtype == np.float32
    assert train.categorical.shape == (10800, 26) and train.categorical.dtype == np.int64
    assert train.labels is not None and train.labels.dtype == np.float32
    np.testing.assert_array_equal(train.labels, [float(line.split("\t")[0]) for line in lines])
    assert 0.19 < float(train.labels.mean()) < 0.20  # the data README: CTR 0.196
    assert int(train.categorical.min()) == 0 and int(train.categorical.max()) < 1000
    assert float(train.dense.min()) >= 0.0
    assert train.embedding_sizes == [1000] * 26


@pytest.mark.shared
def test_train_first_line_matches_hand_parsing(train: CriteoData) -> None:
    first = TRAIN.read_text().split("\n", 1)[0]
    fields = first.split("\t")
    assert len(fields) == 40 and fields[0] == "0" and fields[1] == "1" and fields[14] == "68fd1e64"
    dense, categorical = _by_hand(first, 1000)
    np.testing.assert_allclose(train.dense[0], dense, rtol=1e-6)
    assert train.categorical[0].tolist() == categorical
    assert train.dense[0, 11] == 0.0 and fields[12] == ""  # I12 is empty on line 1
    assert train.categorical[0, 21] == 0 and fields[35] == ""  # so is C22
    assert train.dense[0, 4] == pytest.approx(math.log(1383))  # I5 = 1382


@pytest.mark.shared
def test_test_sample_has_no_labels() -> None:
    data = load_criteo(_need(TEST), has_label=False)
    assert len(data) == 1200 and data.labels is None
    first = TEST.read_text().split("\n", 1)[0]
    dense, categorical = _by_hand(first, 100_000)
    np.testing.assert_allclose(data.dense[0], dense, rtol=1e-6)
    assert data.categorical[0].tolist() == categorical
    assert data.dense[0, 0] == 0.0  # I1 is empty on the first test line


@pytest.mark.shared
def test_max_rows_and_subset(train: CriteoData) -> None:
    head = load_criteo(TRAIN, table_size=1000, max_rows=100)
    assert len(head) == 100
    np.testing.assert_array_equal(head.categorical, train.categorical[:100])
    part = train.subset(np.array([5, 2]))
    assert part.labels is not None and train.labels is not None
    np.testing.assert_array_equal(part.dense, train.dense[[5, 2]])
    np.testing.assert_array_equal(part.labels, train.labels[[5, 2]])
    with pytest.raises(DataError, match="indices must lie in"):
        train.subset([10800])


@pytest.mark.shared
def test_test_format_read_as_train_names_line_and_count() -> None:
    with pytest.raises(DataError, match=r"test_sample.txt:1: expected 40 tab-separated fields .* got 39"):
        load_criteo(_need(TEST))


def _row(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else ["3"] * 13
    cats = cats if cats is not None else ["0000000a"] * 26
    return "\t".join([label, *ints, *cats]) + "\n"


def test_wrong_field_count_names_file_line_and_count(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(_row() + _row(cats=["ab"] * 25))
    with pytest.raises(DataError, match=r"train.txt:2: expected 40 .* got 39") as info:
        load_criteo(path)
    assert str(path) in str(info.value) and "criteo" in str(info.value)


@pytest.mark.parametrize(
    "row,message",
    [
        (_row(label="2"), r":1: field 1 \(label\): label must be 0 or 1"),
        (_row(ints=["3"] * 4 + ["x1"] + ["3"] * 8), r":1: field 6 \(I5\)"),
        (_row(cats=["0000000a"] * 25 + ["zz"]), r":1: field 40 \(C26\)"),
    ],
)
def test_bad_values_name_line_and_field(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "train.txt"
    path.write_text(row)
    with pytest.raises(DataError, match=message):
        load_criteo(path)


def test_encoding_of_small_hand_made_file(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(_row("0", ["-1", "", "0"] + ["7"] * 10, ["", "00000005"] + ["0000000a"] * 24))
    data = load_criteo(path, table_size=4)
    assert data.dense[0, :4].tolist() == [0.0, 0.0, 0.0, pytest.approx(math.log(8))]
    # 0 is missing; 0x5 % 3 + 1 = 3; 0xa % 3 + 1 = 2
    assert data.categorical[0, :3].tolist() == [0, 3, 2]


def test_missing_file_and_bad_table_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: file not found") as info:
        load_criteo(tmp_path / "nope.txt")
    assert "ailab.criteo.com" in str(info.value)
    with pytest.raises(ConfigError, match="table_size must be >= 2"):
        load_criteo(tmp_path / "nope.txt", table_size=1)


def test_blocks_concatenate_to_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("".join(_row(str(i % 2), [str(i)] * 13, [f"{i:08x}"] * 26) for i in range(5)))
    blocks = list(iter_criteo(path, table_size=50, block_rows=2))
    assert [len(b) for b in blocks] == [2, 2, 1]
    whole = load_criteo(path, table_size=50)
    assert np.array_equal(np.concatenate([b.dense for b in blocks]), whole.dense)
    assert np.array_equal(np.concatenate([b.categorical for b in blocks]), whole.categorical)
    assert np.array_equal(np.concatenate([b.labels for b in blocks if b.labels is not None]), whole.labels)
    assert [len(b) for b in iter_criteo(path, table_size=50, block_rows=2, max_rows=3)] == [2, 1]
    (tmp_path / "empty.txt").write_text("")
    assert list(iter_criteo(tmp_path / "empty.txt", block_rows=2)) == []
    assert len(load_criteo(tmp_path / "empty.txt")) == 0
    with pytest.raises(ConfigError, match="block_rows must be >= 1"):
        next(iter_criteo(path, block_rows=0))


def test_block_reader_names_the_line_in_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(_row() * 3 + _row(label="2") + _row())
    with pytest.raises(DataError, match=r"train.txt:4: field 1 \(label\): label must be 0 or 1"):
        list(iter_criteo(path, block_rows=2))


@pytest.mark.shared
def test_blocks_of_the_real_sample_equal_one_read(train: CriteoData) -> None:
    blocks = list(iter_criteo(TRAIN, table_size=1000, block_rows=4000))
    assert [len(b) for b in blocks] == [4000, 4000, 2800]
    assert np.array_equal(np.concatenate([b.categorical for b in blocks]), train.categorical)
    assert np.array_equal(np.concatenate([b.dense for b in blocks]), train.dense)
