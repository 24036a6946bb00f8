"""The example of docs/extending.md runs: a new server optimizer in one class and one registry entry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from enclavefl.app import simulate
from enclavefl.config import parse_job
from enclavefl.errors import ConfigError
from enclavefl.server.optimizer import SERVER_OPTIMIZERS, register_optimizer
from enclavefl.server.strategy import build_strategy
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet, StreamHeader

ROOT = Path(__file__).resolve().parents[2]


def load_example() -> ModuleType:
    """Imports the example once per process (importing it registers FedSign)."""
    if "enclavefl_example_fedsign" in sys.modules:
        return sys.modules["enclavefl_example_fedsign"]
    path = ROOT / "examples" / "extending" / "fedsign.py"
    spec = importlib.util.spec_from_file_location("enclavefl_example_fedsign", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_doc_names_the_example_file() -> None:
    assert "examples/extending/fedsign.py" in (ROOT / "docs" / "extending.md").read_text()


def test_registered_optimizer_is_built_from_the_job_file(tmp_path: Path) -> None:
    module = load_example()
    config = parse_job({"server": {"optimizer": {"name": "fedsign", "options": {"min_step": 0.5}}, "lr": 0.25}})
    header = StreamHeader.of(ParamSet({"w": np.zeros(3, dtype=np.float32)}))
    strategy = build_strategy(config, header, spill_dir=tmp_path)
    assert isinstance(strategy.optimizer, module.FedSign)
    # Hand-computed: deltas (-2, 0.1, 3) with min_step 0.5 move by lr * (-1, 0, +1).
    new = strategy.optimizer.step(ParamSet({"w": np.zeros(3, dtype=np.float32)}),
                                  ParamSet({"w": np.array([-2, 0.1, 3], dtype=np.float32)}))
    np.testing.assert_array_equal(new["w"], [-0.25, 0.0, 0.25])


def test_registered_optimizer_trains_a_simulated_federation(tmp_path: Path) -> None:
    load_example()
    config = parse_job({
        "job": {"rounds": 3, "workers": 3, "seed": 2},
        "round": {"min_workers": 3, "update_window_s": 60},
        "task": {"name": "digits-mlp"},
        "client": {"epochs": 1, "lr": 0.1, "momentum": 0.9},
        "server": {"optimizer": {"name": "fedsign"}, "lr": 0.01},
        "attestation": {"mode": "none"},
    })
    result = simulate(load_task(config), config, workers=3, out_dir=tmp_path)
    accuracies = [row["eval_accuracy"] for row in result.history]
    assert len(accuracies) == 3 and accuracies[-1] > 0.5


def test_a_taken_name_is_refused() -> None:
    module = load_example()

    class Other(module.FedSign):  # type: ignore[name-defined,misc]
        name = "fedadam"

    with pytest.raises(ValueError, match="taken"):
        register_optimizer(Other)
    assert SERVER_OPTIMIZERS["fedadam"].__name__ == "FedAdam" and SERVER_OPTIMIZERS["fedsign"] is module.FedSign


def test_an_unregistered_name_is_refused_when_the_server_is_built(tmp_path: Path) -> None:
    config = parse_job({"server": {"optimizer": {"name": "fednothing"}}})
    with pytest.raises(ConfigError, match="no such server optimizer"):
        build_strategy(config, StreamHeader.of(ParamSet({"w": np.zeros(1)})), spill_dir=tmp_path)
