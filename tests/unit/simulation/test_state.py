"""ClientStateStore: a client's variate survives between rounds on disk, replaced atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclavefl.errors import CheckpointError
from enclavefl.simulation import ClientStateStore
from enclavefl.tensors import ParamSet
from tests.unit.worker.federation import f32


def test_a_saved_state_loads_back(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path / "clients")
    store.save(7, ParamSet({"w": f32([1, 2])}))

    assert store.load(7) == ParamSet({"w": f32([1, 2])})
    assert store.load(8) is None


def test_a_new_state_replaces_the_old_one(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.save(0, ParamSet({"w": f32([1])}))
    store.save(0, ParamSet({"w": f32([5])}))

    assert store.load(0) == ParamSet({"w": f32([5])})
    assert [p.name for p in tmp_path.iterdir()] == ["client-000000.params"]


def test_a_corrupt_state_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "client-000003.params").write_bytes(b"not a tensor file")

    with pytest.raises(CheckpointError, match="client-000003.params"):
        ClientStateStore(tmp_path).load(3)
