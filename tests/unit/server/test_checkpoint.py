"""Tests for enclavefl.server.checkpoint: atomic, checked, pickle-free checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.errors import CheckpointError
from enclavefl.server.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    params_digest,
    save_checkpoint,
)
from enclavefl.tensors import ParamSet, SparseRows, Tensor

HISTORY: list[dict[str, Any]] = [
    {"round": 1, "train_loss": 0.75, "eval_accuracy": None, "participants": 3},
    {"round": 2, "train_loss": 0.5, "eval_accuracy": 0.8, "participants": 2},
]


def params(seed: int = 0) -> ParamSet:
    rng = np.random.default_rng(seed)
    tensors: dict[str, Tensor] = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches": np.array(17, np.int64),
        "emb": SparseRows(np.array([0, 5]), rng.standard_normal((2, 3)).astype(np.float64), (8, 3)),
        "empty": np.zeros((0, 3), np.float16),
    }
    return ParamSet(tensors)


def checkpoint(round_: int = 2, seed: int = 0) -> Checkpoint:
    return Checkpoint(round=round_, model_version=round_, params=params(seed), history=list(HISTORY))


def saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path, checkpoint())


def test_round_trip_keeps_params_and_history_identical(tmp_path: Path) -> None:
    # Prepare
    ckpt = checkpoint(round_=7)

    # Execute
    path = save_checkpoint(tmp_path / "ckpts", ckpt)
    loaded = load_checkpoint(path)

    # Assert
    assert path.name == "round-000007.ckpt"
    assert loaded.params == ckpt.params  # names, order, encodings, dtypes, bits
    assert loaded.history == HISTORY
    assert (loaded.round, loaded.model_version, loaded.path) == (7, 7, path)


def test_saving_leaves_no_temporary_files(tmp_path: Path) -> None:
    for r in (1, 2):
        save_checkpoint(tmp_path, checkpoint(r))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001.ckpt", "round-000002.ckpt"]


def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path: Path) -> None:
    # Prepare: the next checkpoint's name is taken by a non-empty directory, so the rename fails.
    previous = save_checkpoint(tmp_path, checkpoint(1))
    blocker = tmp_path / "round-000002.ckpt"
    blocker.mkdir()
    (blocker / "x").write_bytes(b"x")

    # Execute
    with pytest.raises(CheckpointError, match="round-000002.ckpt"):
        save_checkpoint(tmp_path, checkpoint(2, seed=1))

    # Assert
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert load_checkpoint(previous).params == params(0)


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    for r in range(1, 6):
        save_checkpoint(tmp_path, checkpoint(r), keep=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004.ckpt", "round-000005.ckpt"]


def test_pruning_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")

    for r in range(1, 4):
        save_checkpoint(tmp_path, checkpoint(r), keep=1)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "round-000003.ckpt"]


def test_latest_checkpoint_is_the_highest_round(tmp_path: Path) -> None:
    for r in (3, 12, 9):
        save_checkpoint(tmp_path, checkpoint(r, seed=r), keep=5)

    latest = latest_checkpoint(tmp_path)

    assert latest is not None
    assert latest.round == 12
    assert latest.params == params(12)


def test_latest_checkpoint_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_latest_checkpoint_does_not_skip_a_corrupt_newest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint(1))
    newest = save_checkpoint(tmp_path, checkpoint(2))
    newest.write_bytes(newest.read_bytes()[:-1])

    with pytest.raises(CheckpointError, match="round-000002.ckpt"):
        latest_checkpoint(tmp_path)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    # Prepare
    data = saved(tmp_path).read_bytes()
    target = tmp_path / "cut.ckpt"

    # Execute / Assert: every prefix, from empty to one byte short.
    for length in range(len(data)):
        target.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="cut.ckpt"):
            load_checkpoint(target)


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")

    with pytest.raises(CheckpointError, match="trailing"):
        load_checkpoint(path)


def test_bad_magic_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(b"PICKLE!!" + path.read_bytes()[8:])

    with pytest.raises(CheckpointError, match="bad magic"):
        load_checkpoint(path)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "round-000001.ckpt")


def test_flipped_payload_bit_is_a_digest_mismatch(tmp_path: Path) -> None:
    # Prepare: flip one bit in the last byte of the tensor payload.
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def meta_and_rest(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (meta_len,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16 : 16 + meta_len]), data[16 + meta_len :]


def write_meta(path: Path, meta: Any, rest: bytes) -> None:
    raw = json.dumps(meta).encode()
    path.write_bytes(b"EFLCKPT1" + struct.pack("<Q", len(raw)) + raw + rest)


def test_recorded_digest_must_match(tmp_path: Path) -> None:
    path = saved(tmp_path)
    meta, rest = meta_and_rest(path)
    assert meta["digest"] == params_digest(params())
    meta["digest"] = params_digest(params(1))

    write_meta(path, meta, rest)

    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "change",
    [
        {"round": "2"},
        {"round": None},
        {"history": {"round": 1}},
        {"history": [1, 2]},
        {"model_version": "two"},
        {"model_version": [2]},
    ],
)
def test_malformed_metadata_is_a_checkpoint_error(tmp_path: Path, change: dict[str, Any]) -> None:
    path = saved(tmp_path)
    meta, rest = meta_and_rest(path)
    meta.update(change)

    write_meta(path, meta, rest)

    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("meta_block", [b"{not json", b"\xff\xfe", b"[]", b"NaN"])
def test_unparsable_metadata_is_a_checkpoint_error(tmp_path: Path, meta_block: bytes) -> None:
    path = saved(tmp_path)
    _, rest = meta_and_rest(path)
    path.write_bytes(b"EFLCKPT1" + struct.pack("<Q", len(meta_block)) + meta_block + rest)

    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_huge_metadata_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "round-000001.ckpt"
    path.write_bytes(b"EFLCKPT1" + struct.pack("<Q", 2**62) + b"{}")

    with pytest.raises(CheckpointError, match="exceeds"):
        load_checkpoint(path)


def test_digest_depends_on_names_shapes_and_values() -> None:
    a = ParamSet({"w": np.zeros((2, 3), np.float32)})

    assert params_digest(a) == params_digest(a.copy())
    assert params_digest(a) != params_digest(ParamSet({"v": np.zeros((2, 3), np.float32)}))
    assert params_digest(a) != params_digest(ParamSet({"w": np.zeros((3, 2), np.float32)}))
    assert params_digest(a) != params_digest(ParamSet({"w": np.ones((2, 3), np.float32)}))


def test_list_checkpoints_by_round_oldest_first(tmp_path: Path) -> None:
    params = ParamSet({"w": np.zeros(2, dtype=np.float32)})
    for r in (3, 1, 12):
        save_checkpoint(tmp_path, Checkpoint(r, r, params), keep=10)
    (tmp_path / "round-x.ckpt").write_bytes(b"")  # not a checkpoint name

    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 3, 12]
    assert list_checkpoints(tmp_path / "missing") == []
