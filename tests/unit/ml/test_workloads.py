"""The built-in reference workloads: registry, data_dir handling, partitions, and the DLRM trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.ml.dlrm_trainer import binary_auc
from enclavefl.ml.tasks import TASKS
from enclavefl.tasks import load_task
from enclavefl.training import FitConfig

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _need(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found: {path} (the shared data folder beside the repo)")
    return path


def _job(name: str, data_dir: Path | str | None, partition: str = "iid", **params: Any) -> JobConfig:
    task: dict[str, Any] = {"name": name, "partition": partition, "params": params}
    if data_dir is not None:
        task["data_dir"] = str(data_dir)
    return parse_job({"job": {"seed": 3}, "task": task})


def test_registry_names_every_workload() -> None:
    for name in ("mnist-lenet", "fashion-mnist-resnet20", "cifar10-resnet20", "femnist-lenet", "criteo-dlrm"):
        assert name in TASKS


def test_missing_data_dir_names_the_key() -> None:
    with pytest.raises(ConfigError, match="task.data_dir"):
        load_task(_job("mnist-lenet", None))


def test_data_dir_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        load_task(_job("criteo-dlrm", tmp_path / "nope"))


def test_bad_param_type_names_the_param(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task.params.max_train_samples"):
        load_task(_job("mnist-lenet", tmp_path, max_train_samples="many"))


def test_binary_auc_against_pair_counting() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert binary_auc(y, s) == pytest.approx(wins / (len(pos) * len(neg)))
    assert binary_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert np.isnan(binary_auc([1, 1], [0.2, 0.3]))


def _write_cifar_bin(folder: Path, per_batch: int) -> None:
    rng = np.random.default_rng(1)
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (folder / f"{stem}.bin").write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())


def test_cifar10_resnet20_on_official_binary_layout(tmp_path: Path) -> None:
    _write_cifar_bin(tmp_path, 8)
    task = load_task(_job("cifar10-resnet20", tmp_path, max_train_samples=20))
    rows = task.partition_summary(2)  # type: ignore[attr-defined]
    assert [r.size for r in rows] == [10, 10]
    trainer = task.worker_trainer(1, 2)
    result = trainer.fit(FitConfig(epochs=1, batch_size=5, lr=0.01))
    assert result.num_samples == 10 and np.isfinite(result.metrics["loss"])
    evaluator = task.server_evaluator()
    assert evaluator is not None
    evaluator.set_parameters(trainer.get_parameters())
    assert 0.0 <= evaluator.evaluate()["accuracy"] <= 1.0


@pytest.mark.shared
def test_mnist_lenet_subsample_and_partition_summary() -> None:
    task = load_task(_job("mnist-lenet", _need("mnist"), "dirichlet", max_train_samples=1000, max_eval_samples=200))
    rows = task.partition_summary(4)  # type: ignore[attr-defined]
    assert sum(r.size for r in rows) == 1000
    assert sum(int(r.histogram.sum()) for r in rows) == 1000
    again = load_task(_job("mnist-lenet", _need("mnist"), "dirichlet", max_train_samples=1000, max_eval_samples=200))
    assert [r.histogram.tolist() for r in again.partition_summary(4)] == [r.histogram.tolist() for r in rows]  # type: ignore[attr-defined]
    evaluator = task.server_evaluator()
    assert evaluator is not None and evaluator.evaluate()["accuracy"] < 0.5  # untrained, 10 classes


@pytest.mark.shared
def test_femnist_writer_split_gives_whole_writers() -> None:
    task = load_task(_job("femnist-lenet", _need("leaf-femnist"), "writer", max_train_samples=800))
    rows = task.partition_summary(3)  # type: ignore[attr-defined]
    assert len(rows) == 3 and all(r.histogram.shape == (62,) for r in rows)
    train = task.train  # type: ignore[attr-defined]
    writers = task.writers  # type: ignore[attr-defined]
    assert sum(r.size for r in rows) == len(train) == sum(len(d) for d in writers.values())
    sizes = [len(d) for d in writers.values()]
    # Writers dealt round-robin: worker 0 holds writers 0, 3, 6, ...
    assert rows[0].size == sum(sizes[0::3])


@pytest.mark.shared
def test_criteo_dlrm_holdout_and_training() -> None:
    config = _job("criteo-dlrm", _need("criteo"), table_size=1000, max_train_samples=2000)
    task = load_task(config)
    assert len(task.test) == 1080 and len(task.train) == 2000  # type: ignore[attr-defined]
    again = load_task(config)
    assert np.array_equal(task.test.dense, again.test.dense)  # type: ignore[attr-defined]
    # The shared sample repeats rows: the held-out split is by distinct row, so none leaks into training.
    def rows(data: Any) -> set[bytes]:
        return {data.dense[i].tobytes() + data.categorical[i].tobytes() for i in range(len(data))}

    full = load_task(_job("criteo-dlrm", _need("criteo"), table_size=1000))
    assert not rows(full.test) & rows(full.train)  # type: ignore[attr-defined]
    trainer = task.worker_trainer(0, 2)
    before = trainer.get_parameters()
    result = trainer.fit(FitConfig(epochs=1, batch_size=128, lr=0.01))
    assert result.num_samples == 1000 and 0 <= result.metrics["accuracy"] <= 1
    touched = trainer.touched_rows()  # type: ignore[attr-defined]
    after = trainer.get_parameters()
    for j in range(26):
        name = f"embeddings.{j}.weight"
        moved = np.flatnonzero(np.any(after[name] != before[name], axis=1))
        assert set(moved.tolist()) <= set(touched[name].tolist())
    evaluator = task.server_evaluator()
    assert evaluator is not None
    evaluator.set_parameters(after)
    metrics = evaluator.evaluate()
    assert set(metrics) == {"loss", "accuracy", "auc"} and 0 <= metrics["auc"] <= 1


@pytest.mark.shared
def test_criteo_rejects_writer_partition() -> None:
    task = load_task(_job("criteo-dlrm", _need("criteo"), "writer", table_size=100, max_train_samples=100))
    with pytest.raises(ConfigError, match="writers"):
        task.worker_trainer(0, 2)


@pytest.mark.shared
def test_criteo_eval_folds_partition_the_distinct_rows() -> None:
    def rows(data: Any) -> set[bytes]:
        return {data.dense[i].tobytes() + data.categorical[i].tobytes() for i in range(len(data))}

    held: list[set[bytes]] = []
    for fold in range(3):
        task = load_task(_job("criteo-dlrm", _need("criteo"), table_size=1000, eval_fraction=1 / 3, eval_fold=fold))
        test, train = rows(task.test), rows(task.train)  # type: ignore[attr-defined]
        assert len(test) == 300 and not test & train
        held.append(test)
    assert not held[0] & held[1] and not held[1] & held[2]
    assert len(held[0] | held[1] | held[2]) == 900  # every distinct row is held out exactly once
    with pytest.raises(ConfigError, match=r"eval_fold = 3: eval_fraction=0.333\d* gives folds 0..2"):
        load_task(_job("criteo-dlrm", _need("criteo"), table_size=1000, eval_fraction=1 / 3, eval_fold=3))


def test_bool_param_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task.params.sparse_gradients = 1: must be a valid boolean"):
        load_task(_job("criteo-dlrm", tmp_path, sparse_gradients=1))
