"""Tests for enclavefl.task_params: each built-in task's ``task.params`` are typed, and typos are refused."""

from __future__ import annotations

from typing import Any

import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ConfigError
from enclavefl.task_params import (
    BUILTIN_TASK_PARAMS,
    CriteoDlrmParams,
    DigitsMlpParams,
    ImageWorkloadParams,
    KerasResNetParams,
    task_params,
)


def config_error(task: dict[str, Any], overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job({"task": task}, source="job.yaml", overrides=overrides or [])
    return str(info.value)


def test_every_built_in_task_has_a_params_model() -> None:
    from enclavefl.ml.tasks import TASKS

    assert set(BUILTIN_TASK_PARAMS) == set(TASKS)


# Every key a built-in task read from task.params before the models existed, with a valid value.
KEYS_READ = [
    ("digits-mlp", "hidden", [32, 16]),
    ("digits-keras-resnet", "width", 8),
    ("digits-keras-resnet", "blocks", 3),
    ("fashion-mnist-keras-resnet", "width", 8),
    ("fashion-mnist-keras-resnet", "blocks", 2),
    ("fashion-mnist-keras-resnet", "max_train_samples", 6000),
    ("fashion-mnist-keras-resnet", "max_eval_samples", 2000),
    ("fashion-mnist-keras-resnet", "num_classes", 10),
    ("criteo-dlrm", "train_file", "train_sample.txt"),
    ("criteo-dlrm", "table_size", 20000),
    ("criteo-dlrm", "embedding_dim", 8),
    ("criteo-dlrm", "bottom_mlp", [64, 8]),
    ("criteo-dlrm", "top_mlp", [32, 1]),
    ("criteo-dlrm", "sparse_gradients", False),
    ("criteo-dlrm", "eval_fraction", 0.25),
    ("criteo-dlrm", "eval_fold", 0),
    ("criteo-dlrm", "max_rows", 1000),
    ("criteo-dlrm", "max_train_samples", 1000),
] + [
    (name, key, value)
    for name in ("mnist-lenet", "fashion-mnist-resnet20", "cifar10-resnet20", "femnist-lenet")
    for key, value in (("max_train_samples", 400), ("max_eval_samples", 200), ("num_classes", 10))
]


@pytest.mark.parametrize(("name", "key", "value"), KEYS_READ)
def test_accepts_every_key_its_task_reads(name: str, key: str, value: Any) -> None:
    config = parse_job({"task": {"name": name, "params": {key: value}}})

    assert config.task.params == {key: value}


def test_refuses_a_typo_suggesting_the_key_and_listing_the_valid_ones() -> None:
    message = config_error({"name": "mnist-lenet", "params": {"max_train_sample": 400}})

    assert message == ("job.yaml: task.params.max_train_sample: unknown key; did you mean max_train_samples? "
                       "(valid: max_eval_samples, max_train_samples, num_classes)")


def test_refuses_a_key_of_another_task() -> None:
    # digits-keras-resnet reuses the digits data but has no MLP: `hidden` would be ignored.
    message = config_error({"name": "digits-keras-resnet", "params": {"hidden": [64]}})

    assert "task.params.hidden: unknown key (valid: blocks, width)" in message


def test_refuses_a_value_of_the_wrong_type() -> None:
    message = config_error({"name": "digits-mlp", "params": {"hidden": 64}})

    assert message == "job.yaml: task.params.hidden = 64: must be a valid list"


def test_refuses_a_boolean_where_a_number_is_expected() -> None:
    message = config_error({"name": "criteo-dlrm", "params": {"table_size": True}})

    assert "task.params.table_size = True: must be a valid integer" in message


def test_refuses_an_eval_fold_outside_its_folds() -> None:
    # eval_fraction 0.25 gives folds 0..3.
    message = config_error({"name": "criteo-dlrm", "params": {"eval_fraction": 0.25, "eval_fold": 4}})

    assert "task.params.eval_fold = 4: eval_fraction=0.25 gives folds 0..3" in message


def test_a_params_typo_given_with_set_is_blamed_on_the_set() -> None:
    message = config_error({"name": "digits-mlp"}, ["task.params.hiden=[8]"])

    assert message.startswith("--set task.params.hiden=[8]: task.params.hiden: unknown key; did you mean hidden?")


def test_params_are_checked_for_the_task_a_set_names() -> None:
    message = config_error({"name": "digits-mlp", "params": {"hidden": [8]}}, ["task.name=mnist-lenet"])

    assert "task.params.hidden: unknown key" in message


def test_a_user_task_keeps_free_form_params() -> None:
    config = parse_job({"task": {"name": "mypkg.tasks:make", "params": {"anything": [1, {"goes": True}]}}})

    assert config.task.params == {"anything": [1, {"goes": True}]}


def test_task_params_gives_the_defaults_of_keys_not_set() -> None:
    config = parse_job({"task": {"name": "criteo-dlrm", "params": {"embedding_dim": 8}}})

    params = task_params(config, CriteoDlrmParams)

    assert (params.table_size, params.embedding_dim, params.sparse_gradients) == (10_000, 8, True)
    assert params.bottom_layers == (64, 32, 8)  # the default bottom MLP ends in embedding_dim


def test_task_params_reads_only_the_keys_of_the_part_asked_for() -> None:
    # The Fashion-MNIST Keras task hands its config to the PyTorch loader, which reads the image part.
    config = parse_job({"task": {"name": "fashion-mnist-keras-resnet", "params": {"width": 8, "max_train_samples": 50}}})

    assert task_params(config, ImageWorkloadParams).max_train_samples == 50
    assert task_params(config, KerasResNetParams).width == 8
    assert task_params(config, DigitsMlpParams).hidden == [64]


def test_task_params_refuses_a_bad_value_that_bypassed_parse_job() -> None:
    config = parse_job({"task": {"name": "mypkg.tasks:make", "params": {"width": 0}}})

    with pytest.raises(ConfigError, match=r"task mypkg.tasks:make: task.params.width = 0: must be >= 1"):
        task_params(config, KerasResNetParams)
