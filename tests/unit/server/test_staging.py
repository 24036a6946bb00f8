"""Tests for enclavefl.server.staging: the finiteness check of staged updates."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.errors import UpdateRejected
from enclavefl.server.staging import FINITE_BLOCK_VALUES, check_finite
from enclavefl.tensors import ParamSet, SparseRows


def test_check_finite_finds_a_nan_past_the_first_block() -> None:
    values = np.zeros(FINITE_BLOCK_VALUES + 3, dtype=np.float32)
    values[FINITE_BLOCK_VALUES + 1] = np.nan

    with pytest.raises(UpdateRejected, match="'big'"):
        check_finite(ParamSet({"ok": np.ones(4, np.float32), "big": values}))


def test_check_finite_finds_an_inf_in_a_multidimensional_tensor() -> None:
    values = np.zeros((3, 5), dtype=np.float64)
    values[2, 4] = -np.inf

    with pytest.raises(UpdateRejected, match="'w'"):
        check_finite(ParamSet({"w": values}))


def test_check_finite_checks_sparse_rows() -> None:
    rows = SparseRows(np.array([1]), np.array([[np.nan, 0.0]], dtype=np.float32), (3, 2))

    with pytest.raises(UpdateRejected, match="'emb'"):
        check_finite(ParamSet({"emb": rows}))


def test_check_finite_passes_finite_and_integer_tensors() -> None:
    check_finite(ParamSet({"w": np.ones((2, 2), np.float16), "n": np.array(7, np.int64),
                           "e": np.empty((0, 3), np.float32)}))
