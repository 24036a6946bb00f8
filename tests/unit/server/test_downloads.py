"""What one worker downloads: dense, changed rows since its version, or 8-bit blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.download_codec import NO_MODEL, QUANT_PARAMS_PREFIX, resolve_download
from enclavefl.errors import ProtocolError
from enclavefl.server.downloads import DownloadPolicy
from enclavefl.tensors import ParamSet, SparseRows


def _config(**sparse: Any) -> JobConfig:
    return parse_job({"transport": {"sparse_downloads": {"enabled": True, "max_diff_fraction": 0.5, **sparse}}})


def _model(first_row: float, last_row: float) -> ParamSet:
    table = np.zeros((4, 2), np.float32)
    table[0], table[3] = first_row, last_row
    return ParamSet({"emb": table, "bias": np.full(2, first_row, np.float32)})


def test_a_worker_one_version_behind_gets_only_the_changed_rows() -> None:
    # Prepare: version 1 changes row 0 of the table (and the bias).
    v0, v1 = _model(0, 0), _model(1, 0)
    policy = DownloadPolicy(_config(), v0, 0)
    policy.on_install(v0, v1, 1)

    # Execute
    download = policy.encode(v1, 1, 0, "w1")

    # Assert: the table as row 0 only; the untracked bias dense; the worker's copy resolves to v1.
    emb = download["emb"]
    assert isinstance(emb, SparseRows) and emb.ids.tolist() == [0] and emb.rows.tolist() == [[1, 1]]
    assert isinstance(download["bias"], np.ndarray)
    assert resolve_download(download, v0, 0) == v1


def test_a_worker_without_a_model_gets_the_dense_model() -> None:
    v0 = _model(0, 0)
    policy = DownloadPolicy(_config(), v0, 0)
    assert policy.encode(v0, 0, NO_MODEL, "w1") is v0


def test_a_worker_too_far_behind_gets_the_dense_model() -> None:
    # Prepare: three versions, each changing nothing in the table; the worker holds version 0.
    v = _model(0, 0)
    policy = DownloadPolicy(_config(max_behind_versions=2), v, 0)
    for version in (1, 2, 3):
        policy.on_install(v, v, version)

    # Execute / Assert: 3 versions behind with max_behind_versions 2: dense.
    assert policy.encode(v, 3, 0, "w1") is v
    assert isinstance(policy.encode(v, 3, 1, "w1")["emb"], SparseRows)


def test_a_table_with_more_changed_rows_than_the_fraction_goes_dense() -> None:
    # Prepare: rows 0 and 3 of 4 change: 2 / 4 = 0.5, over max_diff_fraction 0.25.
    v0, v1 = _model(0, 0), _model(1, 1)
    policy = DownloadPolicy(_config(max_diff_fraction=0.25), v0, 0)
    policy.on_install(v0, v1, 1)

    # Execute
    download = policy.encode(v1, 1, 0, "w1")

    # Assert
    assert download is v1


def test_a_version_from_the_future_is_refused() -> None:
    v0 = _model(0, 0)
    policy = DownloadPolicy(_config(), v0, 0)
    with pytest.raises(ProtocolError, match="holds model version 5, but the PS is at version 2"):
        policy.encode(v0, 2, 5, "w1")


def test_a_version_below_minus_one_is_refused() -> None:
    v0 = _model(0, 0)
    policy = DownloadPolicy(_config(), v0, 0)
    with pytest.raises(ProtocolError, match="-7"):
        policy.encode(v0, 2, -7, "w1")


def test_sparse_downloads_off_sends_the_dense_model_whatever_the_worker_holds() -> None:
    v0, v1 = _model(0, 0), _model(1, 0)
    policy = DownloadPolicy(parse_job({}), v0, 0)
    policy.on_install(v0, v1, 1)
    assert policy.encode(v1, 1, 0, "w1") is v1


def test_quantized_broadcast_is_made_once_per_version() -> None:
    # Prepare
    config = parse_job({"privacy": {"compression": {"download": {"type": "quantize"}}}})
    model = ParamSet({"w": np.linspace(0, 1, 4096, dtype=np.float32)})
    policy = DownloadPolicy(config, model, 0)

    # Execute
    first = policy.compress(policy.encode(model, 0, NO_MODEL, "w1"), 0)
    second = policy.compress(policy.encode(model, 0, NO_MODEL, "w2"), 0)

    # Assert: the same encoding for both; 4096 codes + 4 blocks x 2 float32 against 16384 bytes.
    assert first is second
    assert list(first) == ["w", f"{QUANT_PARAMS_PREFIX}w"]
    assert first.nbytes == 4096 + 32


def test_row_reports_download_bytes_against_their_dense_cost_and_resets() -> None:
    v0, v1 = _model(0, 0), _model(1, 0)
    policy = DownloadPolicy(_config(), v0, 0)
    policy.on_install(v0, v1, 1)
    policy.encode(v1, 1, 0, "w1")
    policy.encode(v1, 1, NO_MODEL, "w2")
    assert policy.row() == {"downloads": 2, "downloads_sparse": 1, "bytes_out_dense": 2 * v1.nbytes}
    assert policy.row() == {"downloads": 0, "downloads_sparse": 0, "bytes_out_dense": 0}
