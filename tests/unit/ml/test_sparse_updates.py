"""Sparse embedding updates through the worker's update path, the wire codec and the PS aggregator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enclavefl.config import parse_job
from enclavefl.server.aggregator import WeightedMean
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, decode, iter_chunks
from enclavefl.training import FitConfig
from enclavefl.worker.runtime import compute_delta, sparsify_rows

CRITEO = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "criteo"


def test_sparsify_rows_keeps_listed_rows_only() -> None:
    update = ParamSet([("emb", np.arange(12, dtype=np.float32).reshape(4, 3)), ("bias", np.ones(2, np.float32))])
    out = sparsify_rows(update, {"emb": np.array([2, 0, 2])})
    emb = out["emb"]
    assert isinstance(emb, SparseRows) and emb.ids.tolist() == [0, 2]
    assert np.array_equal(emb.rows, [[0, 1, 2], [6, 7, 8]])
    assert isinstance(out["bias"], np.ndarray)
    with pytest.raises(ValueError, match="does not have"):
        sparsify_rows(update, {"nope": np.array([0])})


@pytest.mark.shared
def test_sparse_dlrm_round_equals_dense_row_weighted_mean() -> None:
    if not (CRITEO / "train_sample.txt").is_file():
        pytest.skip(f"real data not found: {CRITEO} (the shared data folder beside the repo)")
    config = parse_job({
        "job": {"seed": 5},
        "task": {"name": "criteo-dlrm", "data_dir": str(CRITEO),
                 "params": {"table_size": 2000, "max_train_samples": 1200, "embedding_dim": 8}},
    })
    task = load_task(config)
    initial = task.initial_parameters()
    template = StreamHeader.of(initial)
    aggregator = WeightedMean(template)
    deltas, touched_sets, weights = [], [], []
    sparse_bytes = 0
    for index in range(3):
        trainer = task.worker_trainer(index, 3)
        trainer.set_parameters(initial)
        result = trainer.fit(FitConfig(epochs=1, batch_size=64, lr=0.05, seed=1))
        delta = compute_delta(trainer.get_parameters(), initial)
        touched = trainer.touched_rows()  # type: ignore[attr-defined]
        update = sparsify_rows(delta, touched)
        # Through the wire codec, as the worker pushes it and the PS decodes it.
        header = StreamHeader.of(update)
        received = decode(header, iter_chunks(update, 1 << 16), expected=template)
        sparse_bytes += header.total_bytes
        aggregator.add(received, float(result.num_samples))
        deltas.append(delta)
        touched_sets.append(touched)
        weights.append(float(result.num_samples))
    mean = aggregator.result()
    assert sparse_bytes * 3 < 3 * template.total_bytes  # sparse uploads are smaller
    for name in initial:
        got = mean[name]
        assert isinstance(got, np.ndarray)
        if name.startswith("embeddings."):
            # Dense computation: per row, the weighted mean over the workers that touched it.
            num = np.zeros(got.shape, np.float64)
            den = np.zeros(got.shape[0], np.float64)
            for delta, touched, w in zip(deltas, touched_sets, weights):
                mask = np.zeros(got.shape[0], bool)
                mask[touched[name]] = True
                num[mask] += w * np.asarray(delta[name], np.float64)[mask]
                den[mask] += w
            expected = np.divide(num, den[:, None], out=np.zeros_like(num), where=den[:, None] > 0)
        else:
            expected = np.sum([w * np.asarray(d[name], np.float64) for d, w in zip(deltas, weights)], axis=0) / sum(weights)
        np.testing.assert_allclose(got, expected.astype(got.dtype), rtol=1e-5, atol=1e-7, err_msg=name)
