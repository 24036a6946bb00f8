"""The trainers obey the optimizer settings the worker passes down in FitConfig.

The worker fills FitConfig.optimizer/momentum/weight_decay from the PS's task;
these tests pin the trainer side of that contract: a setting given in FitConfig
wins over the construction-time one, and giving the construction-time values
explicitly changes nothing, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enclavefl.ml.datasets import ArrayDataset, CriteoData
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.models import DLRM, mlp
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig

TABLE = 50


def mlp_trainer(optimizer: OptimizerSettings) -> TorchTrainer:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((48, 8), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    return TorchTrainer(mlp(8, (16,), 2), ArrayDataset(x, y), optimizer=optimizer)


def criteo(n: int) -> CriteoData:
    rng = np.random.default_rng(0)
    categorical = rng.integers(0, TABLE // 2, size=(n, 26))
    labels = (categorical[:, 0] % 3 == 0).astype(np.float32)
    return CriteoData(rng.random((n, 13), dtype=np.float32), categorical, labels, TABLE)


def dlrm_trainer(optimizer: OptimizerSettings, *, sparse: bool) -> DlrmTrainer:
    torch.manual_seed(0)
    model = DLRM(embedding_sizes=[TABLE] * 26, embedding_dim=4, bottom_mlp=(8, 4), top_mlp=(8, 1),
                 sparse_gradients=sparse)
    return DlrmTrainer(model, criteo(96), optimizer=optimizer)


def trained(trainer: TorchTrainer, **settings: object) -> ParamSet:
    trainer.fit(FitConfig(epochs=2, batch_size=16, lr=0.05, round=1, seed=3, **settings))  # type: ignore[arg-type]
    return trainer.get_parameters()


SGD = OptimizerSettings("sgd", momentum=0.9, weight_decay=1e-3)
ADAM = OptimizerSettings("adam", weight_decay=1e-3)


def test_torch_trainer_with_settings_equal_to_its_own_trains_bit_identically() -> None:
    plain = trained(mlp_trainer(SGD))
    explicit = trained(mlp_trainer(SGD), optimizer="sgd", momentum=0.9, weight_decay=1e-3)

    assert plain == explicit  # ParamSet equality compares every bit


def test_torch_trainer_uses_the_fit_config_optimizer_over_its_own() -> None:
    # A trainer built with stale settings (Adam) told SGD with momentum trains as one built with SGD.
    told = trained(mlp_trainer(ADAM), optimizer="sgd", momentum=0.9, weight_decay=1e-3)

    assert told == trained(mlp_trainer(SGD))
    assert told != trained(mlp_trainer(ADAM))


def test_torch_trainer_overrides_momentum_and_weight_decay_separately() -> None:
    told = trained(mlp_trainer(OptimizerSettings("sgd")), momentum=0.9, weight_decay=1e-3)

    assert told == trained(mlp_trainer(SGD))


def test_torch_trainer_refuses_an_unknown_optimizer_before_training() -> None:
    trainer = mlp_trainer(SGD)
    before = trainer.get_parameters()

    with pytest.raises(ValueError, match=r"FitConfig.optimizer must be one of \['adam', 'sgd'\], got 'rmsprop'"):
        trainer.fit(FitConfig(epochs=1, batch_size=16, lr=0.05, optimizer="rmsprop"))
    assert trainer.get_parameters() == before


@pytest.mark.parametrize("sparse", [False, True])
def test_dlrm_trainer_with_settings_equal_to_its_own_trains_bit_identically(sparse: bool) -> None:
    plain = trained(dlrm_trainer(SGD, sparse=sparse))
    explicit = trained(dlrm_trainer(SGD, sparse=sparse), optimizer="sgd", momentum=0.9, weight_decay=1e-3)

    assert plain == explicit


@pytest.mark.parametrize("sparse", [False, True])
def test_dlrm_trainer_uses_the_fit_config_optimizer_over_its_own(sparse: bool) -> None:
    # With sparse tables the weight decay is the lazy penalty: it must follow FitConfig too.
    told = trained(dlrm_trainer(OptimizerSettings("sgd"), sparse=sparse), optimizer="adam", weight_decay=1e-3)

    assert told == trained(dlrm_trainer(ADAM, sparse=sparse))
    assert told != trained(dlrm_trainer(OptimizerSettings("sgd"), sparse=sparse))
