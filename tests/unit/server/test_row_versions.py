"""The PS's per-row change record: which rows are stamped with which version, compared bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.server.row_versions import RowVersions, tracked_names
from enclavefl.tensors import ParamSet


def _model(table: list[list[float]]) -> ParamSet:
    return ParamSet({"emb": np.asarray(table, dtype=np.float32), "bias": np.zeros(2, np.float32)})


def test_only_rows_that_differ_are_stamped_with_the_new_version() -> None:
    # Prepare: version 0; version 1 changes row 1, version 2 changes row 3.
    v0 = _model([[0, 0], [1, 1], [2, 2], [3, 3]])
    v1 = _model([[0, 0], [9, 1], [2, 2], [3, 3]])
    v2 = _model([[0, 0], [9, 1], [2, 2], [3, 7]])
    rows = RowVersions(v0, 0, ["emb"])

    # Execute
    rows.observe(v0, v1, 1)
    rows.observe(v1, v2, 2)

    # Assert: stamps are [0, 1, 0, 2]; a worker at 0 needs rows 1 and 3, at 1 only row 3, at 2 none.
    assert rows.changed_since("emb", 0).tolist() == [1, 3]
    assert rows.changed_since("emb", 1).tolist() == [3]
    assert rows.changed_since("emb", 2).tolist() == []
    assert rows.version == 2


def test_a_sign_flip_of_zero_counts_as_a_change() -> None:
    # -0.0 == 0.0 as floats, but a worker's copy must match bit for bit.
    v0 = _model([[0.0, 0.0], [1, 1]])
    v1 = _model([[-0.0, 0.0], [1, 1]])
    rows = RowVersions(v0, 4, ["emb"])
    rows.observe(v0, v1, 5)
    assert rows.changed_since("emb", 4).tolist() == [0]


def test_a_tensor_whose_shape_changed_is_changed_in_every_row() -> None:
    v0 = _model([[0, 0], [1, 1]])
    v1 = ParamSet({"emb": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)})
    rows = RowVersions(v0, 0, ["emb"])
    rows.observe(v0, v1, 1)
    assert rows.changed_since("emb", 0).tolist() == [0, 1]


def test_a_version_that_is_not_newer_is_refused() -> None:
    v0 = _model([[0, 0]])
    rows = RowVersions(v0, 3, ["emb"])
    with pytest.raises(ValueError, match="version 3 is not after 3"):
        rows.observe(v0, v0, 3)


def test_tracking_a_tensor_the_model_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        RowVersions(_model([[0, 0]]), 0, ["nope"])


def test_tracked_names_default_to_every_tensor_of_rank_two_or_more() -> None:
    params = ParamSet({"emb": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32),
                       "conv": np.zeros((2, 2, 3, 3), np.float32), "step": np.zeros((), np.int64)})
    assert tracked_names(params, []) == ("emb", "conv")
    assert tracked_names(params, ["em*", "bias"]) == ("emb", "bias")
