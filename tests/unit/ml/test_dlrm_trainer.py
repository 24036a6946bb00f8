"""DlrmTrainer with row-sparse embedding gradients: lazy optimizers, the same seam as the dense path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enclavefl.ml.datasets import CriteoData
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.models import DLRM
from enclavefl.ml.trainer import OptimizerSettings
from enclavefl.training import FitConfig

TABLE = 50


def _data(n: int, seed: int = 0) -> CriteoData:
    rng = np.random.default_rng(seed)
    categorical = rng.integers(0, TABLE // 2, size=(n, 26))  # rows >= TABLE // 2 are never looked up
    labels = (categorical[:, 0] % 3 == 0).astype(np.float32)
    return CriteoData(rng.random((n, 13), dtype=np.float32), categorical, labels, TABLE)


def _trainer(sparse: bool, optimizer: OptimizerSettings) -> DlrmTrainer:
    torch.manual_seed(0)
    model = DLRM(embedding_sizes=[TABLE] * 26, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
                 sparse_gradients=sparse)
    return DlrmTrainer(model, _data(256), _data(128, seed=1), optimizer=optimizer)


def test_sparse_gradients_are_sparse() -> None:
    model = DLRM(embedding_sizes=[TABLE] * 26, embedding_dim=4, bottom_mlp=(8, 4), sparse_gradients=True)
    data = _data(8)
    model(torch.from_numpy(data.dense), torch.from_numpy(data.categorical)).sum().backward()
    grad = model.embeddings[0].weight.grad
    assert grad is not None and grad.is_sparse
    assert model.bottom[0].weight.grad is not None and not model.bottom[0].weight.grad.is_sparse


@pytest.mark.parametrize(
    "optimizer",
    [OptimizerSettings("adam", weight_decay=1e-4), OptimizerSettings("sgd", momentum=0.9, weight_decay=1e-4)],
    ids=["adam", "sgd"],
)
def test_sparse_training_moves_only_touched_rows_and_learns(optimizer: OptimizerSettings) -> None:
    trainer = _trainer(True, optimizer)
    before = trainer.get_parameters()
    loss0 = trainer.evaluate()["loss"]
    for rnd in range(1, 4):
        trainer.fit(FitConfig(epochs=2, batch_size=32, lr=0.05 if optimizer.name == "sgd" else 0.01, round=rnd))
    after = trainer.get_parameters()
    assert trainer.evaluate()["loss"] < loss0
    for name, rows in trainer.touched_rows().items():
        moved = np.flatnonzero(np.any(after[name] != before[name], axis=1))
        assert set(moved.tolist()) <= set(rows.tolist())
        # weight decay applies to the MLPs only: untouched rows keep their values exactly
        untouched = np.setdiff1d(np.arange(TABLE), rows)
        assert np.array_equal(after[name][untouched], before[name][untouched])
    assert not np.array_equal(after["bottom.0.weight"], before["bottom.0.weight"])


def test_sparse_and_dense_gradients_exchange_the_same_parameters() -> None:
    dense = _trainer(False, OptimizerSettings("adam")).get_parameters()
    sparse = _trainer(True, OptimizerSettings("adam")).get_parameters()
    assert list(dense) == list(sparse)
    for name in dense:
        assert np.array_equal(dense[name], sparse[name])


def test_plain_sgd_is_identical_with_sparse_or_dense_gradients() -> None:
    """Without momentum or decay a sparse SGD step is the dense step restricted to the batch's rows."""
    results = []
    for sparse in (False, True):
        trainer = _trainer(sparse, OptimizerSettings("sgd"))
        trainer.fit(FitConfig(epochs=1, batch_size=32, lr=0.1, round=1))
        results.append(trainer.get_parameters())
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_lazy_decay_gradient_is_the_decay_of_the_looked_up_rows() -> None:
    model = DLRM(embedding_sizes=[TABLE] * 26, embedding_dim=4, bottom_mlp=(8, 4), sparse_gradients=True)
    categorical = torch.from_numpy(_data(16).categorical)
    categorical[:, 0] = 3  # one row looked up 16 times still decays once
    (0.5 * 0.1 * model.embedding_norm(categorical)).backward()
    grad = model.embeddings[0].weight.grad
    assert grad is not None and grad.is_sparse
    dense_grad = grad.to_dense()
    weight = model.embeddings[0].weight.detach()
    torch.testing.assert_close(dense_grad[3], 0.1 * weight[3])
    assert torch.count_nonzero(dense_grad.abs().sum(dim=1)) == 1
    grad1 = model.embeddings[1].weight.grad
    assert grad1 is not None
    rows = torch.unique(categorical[:, 1])
    torch.testing.assert_close(grad1.to_dense()[rows], 0.1 * model.embeddings[1].weight.detach()[rows])
