"""Tests for enclavefl.server.spill: the file-backed store of flattened updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ClosedError, UpdateRejected
from enclavefl.server.spill import UpdateSpill


def test_round_trip_of_rows_and_blocks(tmp_path: Path) -> None:
    # Prepare
    spill = UpdateSpill(tmp_path, dim=4, capacity=3)
    a = np.array([1, 2, 3, 4], np.float32)
    b = np.array([5, 6, 7, 8], np.float32)

    # Execute
    indices = [spill.append(a), spill.append(b)]

    # Assert: rows in append order; block [1, 3) is columns 1..2 of both rows
    assert indices == [0, 1]
    assert len(spill) == 2
    np.testing.assert_array_equal(spill.row(1), b)
    np.testing.assert_array_equal(spill.block(1, 3), np.array([[2, 3], [6, 7]], np.float32))
    assert spill.block(0, 4).dtype == np.float32
    spill.close()


def test_block_is_a_copy_not_a_view_of_the_file(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=2, capacity=1) as spill:
        spill.append(np.array([1.0, 2.0]))

        block = spill.block(0, 2)
        block[0, 0] = 99.0

        np.testing.assert_array_equal(spill.row(0), [1.0, 2.0])


def test_float64_spill_keeps_float64_precision(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=1, capacity=1, dtype=np.float64) as spill:
        spill.append(np.array([1 + 2**-40]))

        assert spill.row(0)[0] == 1 + 2**-40


def test_full_spill_refuses_naming_capacity_and_setting(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=2, capacity=2) as spill:
        spill.append(np.zeros(2))
        spill.append(np.ones(2))

        with pytest.raises(UpdateRejected, match=r"2 updates.*server\.max_buffered_updates"):
            spill.append(np.ones(2))

        assert len(spill) == 2


def test_wrong_vector_length_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=3, capacity=2) as spill:
        with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)"):
            spill.append(np.zeros(2))

        assert len(spill) == 0


@pytest.mark.parametrize(("dim", "capacity"), [(0, 1), (1, 0), (-1, 1)])
def test_dim_and_capacity_must_be_positive(tmp_path: Path, dim: int, capacity: int) -> None:
    with pytest.raises(ValueError, match="must be an int >= 1"):
        UpdateSpill(tmp_path, dim=dim, capacity=capacity)

    assert list(tmp_path.iterdir()) == []


def test_close_deletes_the_file_and_is_idempotent(tmp_path: Path) -> None:
    spill = UpdateSpill(tmp_path, dim=2, capacity=2)
    spill.append(np.ones(2))
    assert spill.path.parent == tmp_path and spill.path.exists()

    spill.close()
    spill.close()

    assert not spill.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_use_after_close_raises_closed_error(tmp_path: Path) -> None:
    spill = UpdateSpill(tmp_path, dim=2, capacity=2)
    spill.close()

    with pytest.raises(ClosedError):
        spill.append(np.ones(2))
    with pytest.raises(ClosedError):
        spill.block(0, 2)


def test_context_manager_deletes_the_file_on_exit(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=2, capacity=2) as spill:
        path = spill.path

    assert not path.exists()


def test_two_spills_in_one_directory_use_different_files(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=1, capacity=1) as one, UpdateSpill(tmp_path, dim=1, capacity=1) as two:
        assert one.path != two.path


def test_file_is_sized_for_capacity_but_starts_sparse(tmp_path: Path) -> None:
    # 1024 rows of 4096 float32: 16 MiB announced, none of it written yet.
    with UpdateSpill(tmp_path, dim=4096, capacity=1024) as spill:
        stat = spill.path.stat()

        assert stat.st_size == 1024 * 4096 * 4
        assert stat.st_blocks * 512 < stat.st_size // 4


def test_block_and_row_check_their_bounds(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=2, capacity=2) as spill:
        spill.append(np.ones(2))

        with pytest.raises(ValueError, match=r"0 <= start <= stop <= 2"):
            spill.block(1, 3)
        with pytest.raises(IndexError, match=r"not in \[0, 1\)"):
            spill.row(1)


def test_empty_spill_gives_a_block_with_no_rows(tmp_path: Path) -> None:
    with UpdateSpill(tmp_path, dim=3, capacity=2) as spill:
        assert spill.block(0, 3).shape == (0, 3)
