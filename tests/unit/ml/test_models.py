"""Models: output shapes, gradients, parameter counts, the registry and bad settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets import load_criteo
from enclavefl.ml.models import DLRM, MODELS, create_model, lenet5, mlp, resnet18, resnet_cifar

CRITEO_TRAIN = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "criteo" / "train_sample.txt"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    nn.functional.cross_entropy(logits, torch.arange(x.shape[0]) % num_classes).backward()  # type: ignore[no-untyped-call]
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("depth,version", [(20, 1), (20, 2), (32, 1), (56, 2)])
def test_cifar_resnets_train_on_32x32_rgb(depth: int, version: int) -> None:
    _forward_backward(resnet_cifar(depth, version), torch.rand(2, 3, 32, 32), 10)


@pytest.mark.parametrize("version,shortcut", [(1, "A"), (2, "B")])
def test_cifar_resnet_on_28x28_grayscale(version: int, shortcut: str) -> None:
    model = resnet_cifar(20, version, num_classes=62, in_channels=1, shortcut=shortcut)
    _forward_backward(model, torch.rand(2, 1, 28, 28), 62)


def test_parameter_counts_match_the_papers() -> None:
    # He et al. 2016, table 6: 0.27M, 0.46M, 0.85M (option A shortcuts).
    assert abs(_params(MODELS["resnet20"]()) - 0.27e6) < 0.005e6
    assert abs(_params(MODELS["resnet32"]()) - 0.46e6) < 0.01e6
    assert abs(_params(MODELS["resnet56"]()) - 0.85e6) < 0.01e6
    assert _params(resnet_cifar(20, shortcut="B")) > _params(resnet_cifar(20, shortcut="A"))
    assert abs(_params(resnet18()) - 11.17e6) < 0.01e6


@pytest.mark.parametrize("depth", [21, 19, 2, 0])
def test_depth_not_6n_plus_2_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match=f"6n\\+2 .* got {depth}$"):
        resnet_cifar(depth)
    with pytest.raises(ConfigError, match="version must be 1 or 2"):
        resnet_cifar(20, version=3)


def test_resnet18_on_cifar_and_mnist_sizes() -> None:
    _forward_backward(resnet18(10, 3), torch.rand(2, 3, 32, 32), 10)
    model = resnet18(num_classes=10, in_channels=1).eval()
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_lenet5() -> None:
    model = lenet5()
    assert model.c1.padding == (2, 2)
    _forward_backward(model, torch.rand(4, 1, 28, 28), 10)
    _forward_backward(lenet5(num_classes=62), torch.rand(3, 1, 28, 28), 62)
    assert lenet5(in_channels=3, image_size=32)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert _params(lenet5()) == 61706  # 156 + 2416 + 48120 + 10164 + 850
    with pytest.raises(ConfigError, match="image_size must be 28, 30 or 32, got 64"):
        lenet5(image_size=64)


def test_mlp() -> None:
    model = mlp(64, hidden=(32, 16), num_classes=10)
    _forward_backward(model, torch.rand(5, 64), 10)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 10]
    with pytest.raises(ConfigError, match="every size must be >= 1"):
        mlp(64, hidden=(0,))


def _dlrm_batch(batch: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    dense = torch.rand(batch, 13, generator=generator)
    categorical = torch.stack([torch.randint(0, s, (batch,), generator=generator) for s in sizes], dim=1)
    return dense, categorical


def test_dlrm_outputs_probabilities_and_trains_its_tables() -> None:
    sizes = [50 + i for i in range(26)]
    model = DLRM(embedding_sizes=sizes)
    assert model.top[0].in_features == 27 * 26 // 2 + 16  # 351 pair products + bottom output
    dense, categorical = _dlrm_batch(8, sizes)
    probs = model(dense, categorical)
    assert probs.shape == (8,)
    assert bool(((probs > 0) & (probs < 1)).all())
    nn.functional.binary_cross_entropy(probs, (torch.arange(8) % 2).float()).backward()  # type: ignore[no-untyped-call]
    for j, table in enumerate(model.embeddings):
        assert isinstance(table, nn.Embedding) and table.weight.grad is not None
        row_has_grad = table.weight.grad.abs().sum(dim=1) > 0
        used = torch.zeros(sizes[j], dtype=torch.bool)
        used[categorical[:, j]] = True
        assert torch.equal(row_has_grad, used)  # exactly the looked-up rows get gradient
    assert all(p.grad is not None for p in model.bottom.parameters())


def test_dlrm_refuses_bad_inputs_and_settings() -> None:
    model = DLRM(embedding_sizes=[10] * 26)
    dense, categorical = _dlrm_batch(2, [10] * 26)
    categorical[1, 25] = 10
    with pytest.raises(DataError, match="outside its embedding table"):
        model(dense, categorical)
    with pytest.raises(DataError, match=r"dense must be \(B, 13\)"):
        model(dense[:, :12], categorical)
    with pytest.raises(DataError, match="categorical must be int64"):
        model(dense, categorical.float())
    with pytest.raises(ConfigError, match="must end in embedding_dim=16"):
        DLRM(embedding_sizes=[10], bottom_mlp=(64, 32))
    with pytest.raises(ConfigError, match="must end in 1 output"):
        DLRM(embedding_sizes=[10], top_mlp=(64, 2))


@pytest.mark.shared
def test_dlrm_on_real_criteo_rows() -> None:
    if not CRITEO_TRAIN.is_file():
        pytest.skip(f"real data not found: {CRITEO_TRAIN} (the shared data folder beside the repo)")
    data = load_criteo(CRITEO_TRAIN, table_size=1000, max_rows=64)
    assert data.labels is not None
    model = DLRM(embedding_sizes=data.embedding_sizes)
    dense, categorical = torch.from_numpy(data.dense), torch.from_numpy(data.categorical)
    labels = torch.from_numpy(data.labels)
    losses = []
    for _ in range(20):  # plain SGD, lr 0.5 (torch.optim alone takes seconds to import)
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy(model(dense, categorical), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.5 * p.grad)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # it fits 64 rows: the inputs reach the output
    assert np.isfinite(losses).all()


def test_registry_names_and_create_model() -> None:
    assert sorted(MODELS) == [
        "dlrm", "lenet5", "mlp", "resnet18", "resnet20", "resnet32", "resnet56", "resnet_cifar",
    ]
    model = create_model("resnet_cifar", depth=32, version=2, num_classes=5)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    assert isinstance(create_model("dlrm", embedding_sizes=[4, 5]), DLRM)
    with pytest.raises(ConfigError, match="unknown model 'vgg16'"):
        create_model("vgg16")
    with pytest.raises(ConfigError, match="bad options"):
        create_model("lenet5", depth=3)
