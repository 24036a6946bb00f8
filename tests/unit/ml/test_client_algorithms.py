"""FedProx's proximal term and SCAFFOLD's correction in TorchTrainer's minibatch loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from enclavefl.ml.datasets import ArrayDataset, CriteoData
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.models import DLRM, mlp
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig
from enclavefl.worker.control import ScaffoldClient


def _linear_trainer() -> TorchTrainer:
    """logits = W x with W (2, 1) at zero; one sample x = 1 of class 0.

    At W = 0 the softmax is [0.5, 0.5], so the cross-entropy gradient is
    dL/dW = (softmax - onehot(0)) x^T = [[-0.5], [0.5]].
    """
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = ArrayDataset(np.array([[1.0]], dtype=np.float32), np.array([0], dtype=np.int64))
    return TorchTrainer(model, data, optimizer=OptimizerSettings("sgd"))


def _mlp_trainer(optimizer: OptimizerSettings = OptimizerSettings("sgd", 0.9)) -> TorchTrainer:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    return TorchTrainer(mlp(8, (16,), 2), ArrayDataset(x, y), optimizer=optimizer)


def _weight_correction(value: list[list[float]]) -> ParamSet:
    return ParamSet([("weight", np.array(value, dtype=np.float32))])


def test_one_sgd_step_with_correction_matches_hand_computation() -> None:
    trainer = _linear_trainer()
    # grad + correction = [[-0.5], [0.5]] + [[0.1], [0.2]] = [[-0.4], [0.7]]
    # W1 = 0 - 0.1 * [[-0.4], [0.7]] = [[0.04], [-0.07]]
    result = trainer.fit(FitConfig(1, 1, 0.1, correction=_weight_correction([[0.1], [0.2]])))
    np.testing.assert_allclose(trainer.get_parameters()["weight"], [[0.04], [-0.07]], rtol=1e-6)
    assert result.steps == 1


def test_proximal_term_is_zero_on_the_first_step() -> None:
    # w == w_global before the first step, so mu * (w - w_global) = 0.
    plain, prox = _linear_trainer(), _linear_trainer()
    plain.fit(FitConfig(1, 1, 0.1))
    prox.fit(FitConfig(1, 1, 0.1, proximal_mu=5.0))
    assert plain.get_parameters() == prox.get_parameters()


def test_proximal_term_on_the_second_step_matches_hand_computation() -> None:
    # Step 1 (both runs): W1 = -0.1 * [[-0.5], [0.5]] = [[0.05], [-0.05]].
    # Step 2 sees the same data gradient at W1 in both runs; FedProx adds
    # mu * (W1 - W0) = 2 * [[0.05], [-0.05]] = [[0.1], [-0.1]], so
    # W2(mu=2) - W2(mu=0) = -0.1 * [[0.1], [-0.1]] = [[-0.01], [0.01]].
    plain, prox = _linear_trainer(), _linear_trainer()
    plain.fit(FitConfig(2, 1, 0.1))
    result = prox.fit(FitConfig(2, 1, 0.1, proximal_mu=2.0))
    difference = prox.get_parameters()["weight"] - plain.get_parameters()["weight"]
    np.testing.assert_allclose(difference, [[-0.01], [0.01]], rtol=1e-5)
    assert result.steps == 2


def test_mu_zero_without_correction_trains_bit_for_bit_like_the_default() -> None:
    default, explicit = _mlp_trainer(), _mlp_trainer()
    a = default.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5))
    b = explicit.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5, proximal_mu=0.0, correction=None))
    assert default.get_parameters() == explicit.get_parameters()  # ParamSet == compares bits
    assert a.metrics == b.metrics and a.steps == b.steps == 16


def test_huge_mu_keeps_weights_near_the_global_ones() -> None:
    # lr * mu = 0.95 < 1: each step pulls w 95 % of the way back to w_global,
    # so the drift stays near -grad / mu instead of accumulating over 24 steps.
    drift = {}
    for mu in (0.0, 19.0):
        trainer = _mlp_trainer(OptimizerSettings("sgd"))
        start = trainer.get_parameters()
        trainer.fit(FitConfig(epochs=3, batch_size=8, lr=0.05, proximal_mu=mu))
        end = trainer.get_parameters()
        drift[mu] = max(float(np.abs(end[n] - start[n]).max()) for n in start)
    assert drift[19.0] < drift[0.0] / 5  # measured: 0.009 vs 0.109


def test_fit_counts_local_optimizer_steps() -> None:
    # 64 samples in batches of 24: 3 batches (24, 24, 16) per epoch, 2 epochs.
    result = _mlp_trainer().fit(FitConfig(epochs=2, batch_size=24, lr=0.1))
    assert result.steps == 6


def test_correction_of_wrong_shape_is_refused_naming_the_tensor() -> None:
    trainer = _linear_trainer()
    with pytest.raises(ValueError, match=r"correction 'weight': shape \(1, 2\), parameter has \(2, 1\)"):
        trainer.fit(FitConfig(1, 1, 0.1, correction=_weight_correction([[0.1, 0.2]])))


def test_correction_naming_an_unknown_tensor_is_refused() -> None:
    correction = ParamSet([("bias", np.zeros(2, dtype=np.float32))])
    with pytest.raises(ValueError, match="does not have: \\['bias'\\]"):
        _linear_trainer().fit(FitConfig(1, 1, 0.1, correction=correction))


def test_non_finite_correction_is_refused() -> None:
    with pytest.raises(ValueError, match="'weight' holds a NaN"):
        _linear_trainer().fit(FitConfig(1, 1, 0.1, correction=_weight_correction([[float("nan")], [0.0]])))


@pytest.mark.parametrize("mu", [-0.1, float("inf"), float("nan")])
def test_negative_or_non_finite_mu_is_refused(mu: float) -> None:
    with pytest.raises(ValueError, match="proximal_mu must be a finite number >= 0"):
        _linear_trainer().fit(FitConfig(1, 1, 0.1, proximal_mu=mu))


def test_buffers_take_no_correction() -> None:
    # BatchNorm's running statistics travel in get_parameters() but have no gradient.
    def bn_trainer() -> TorchTrainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        rng = np.random.default_rng(1)
        x = rng.random((16, 4), dtype=np.float32)
        return TorchTrainer(model, ArrayDataset(x, (x[:, 0] > 0.5).astype(np.int64)))

    plain, corrected = bn_trainer(), bn_trainer()
    plain.fit(FitConfig(1, 8, 0.1))
    buffers = ParamSet(
        [("1.running_mean", np.full(3, 100.0, np.float32)), ("1.running_var", np.full(3, 100.0, np.float32))]
    )
    corrected.fit(FitConfig(1, 8, 0.1, correction=buffers))
    assert plain.get_parameters() == corrected.get_parameters()


def test_scaffold_after_one_step_recovers_the_gradient_at_the_global_model() -> None:
    # With K = 1, option II gives c_i+ = c_i - c + (x - y) / lr = c_i - c + (g(x) + c - c_i) = g(x),
    # the gradient at the global model: [[-0.5], [0.5]] whatever c is.
    trainer = _linear_trainer()
    client = ScaffoldClient(trainer.get_parameters())
    server = _weight_correction([[0.3], [0.1]])
    global_params = trainer.get_parameters()
    config = FitConfig(1, 1, 0.1, correction=client.correction(server))
    result = trainer.fit(config)
    delta = client.update(global_params, trainer.get_parameters(), server, result.steps, config.lr)
    np.testing.assert_allclose(client.state()["weight"], [[-0.5], [0.5]], rtol=1e-5)
    np.testing.assert_allclose(delta["weight"], [[-0.5], [0.5]], rtol=1e-5)  # c_i was 0


TABLE = 20


def _dlrm_trainer(sparse: bool) -> DlrmTrainer:
    torch.manual_seed(0)
    model = DLRM(embedding_sizes=[TABLE] * 26, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
                 sparse_gradients=sparse)
    rng = np.random.default_rng(0)
    data = CriteoData(rng.random((32, 13), dtype=np.float32), rng.integers(0, TABLE, size=(32, 26)),
                      (rng.random(32) > 0.5).astype(np.float32), TABLE)
    return DlrmTrainer(model, data, optimizer=OptimizerSettings("sgd"))


def test_sparse_gradient_dlrm_refuses_fedprox_and_leaves_the_model_unchanged() -> None:
    trainer = _dlrm_trainer(sparse=True)
    before = trainer.get_parameters()
    with pytest.raises(ValueError, match=r"sparse gradient: FedProx .* set task\.params\.sparse_gradients: false"):
        trainer.fit(FitConfig(1, 8, 0.1, proximal_mu=0.1))
    assert trainer.get_parameters() == before


def test_sparse_gradient_dlrm_refuses_a_table_correction() -> None:
    trainer = _dlrm_trainer(sparse=True)
    correction = ParamSet([("embeddings.0.weight", np.zeros((TABLE, 4), np.float32))])
    with pytest.raises(ValueError, match="'embeddings.0.weight' has a sparse gradient"):
        trainer.fit(FitConfig(1, 8, 0.1, correction=correction))


def test_dense_gradient_dlrm_trains_with_fedprox() -> None:
    trainer = _dlrm_trainer(sparse=False)
    result = trainer.fit(FitConfig(1, 8, 0.1, proximal_mu=0.1))
    assert result.steps == 4 and np.isfinite(result.metrics["loss"])
