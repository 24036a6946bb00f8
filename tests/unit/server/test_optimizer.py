"""Tests for enclavefl.server.optimizer: the FedAvg server step."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.optimizer import SERVER_OPTIMIZERS, FedAvg
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, Tensor


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def dense(value: Tensor) -> npt.NDArray[Any]:
    """The array behind a dense tensor (fails the test on a SparseRows)."""
    assert isinstance(value, np.ndarray), type(value)
    return value


def test_fedavg_adds_the_mean_delta() -> None:
    # Prepare
    params = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([0, 0])})
    delta = ParamSet({"w": f32([[0.5, -1], [0, 2]]), "b": f32([1, -1])})

    # Execute
    new = FedAvg().step(params, delta)

    # Assert
    assert list(new) == ["w", "b"]
    np.testing.assert_array_equal(new["w"], f32([[1.5, 1], [3, 6]]))
    np.testing.assert_array_equal(new["b"], f32([1, -1]))
    assert dense(new["w"]).dtype == np.float32


def test_fedavg_scales_the_delta_by_the_server_lr() -> None:
    params = ParamSet({"w": f32([1, 2])})
    delta = ParamSet({"w": f32([0.5, -1])})

    new = FedAvg(lr=0.5).step(params, delta)

    np.testing.assert_array_equal(new["w"], f32([1.25, 1.5]))


def test_fedavg_keeps_float64_precision() -> None:
    params = ParamSet({"w": np.array([1.0, 2.0])})
    delta = ParamSet({"w": np.array([1e-12, -1e-12])})

    new = FedAvg().step(params, delta)

    assert dense(new["w"]).dtype == np.float64
    np.testing.assert_array_equal(new["w"], [1.0 + 1e-12, 2.0 - 1e-12])


def test_fedavg_rounds_integer_tensors() -> None:
    # Prepare
    params = ParamSet({"steps": np.array([10, 20, 30], np.int64)})
    delta = ParamSet({"steps": np.array([3, -5, 4], np.int64)})

    # Execute
    new = FedAvg(lr=0.5).step(params, delta)

    # Assert: 0.5 * delta = [1.5, -2.5, 2] rounds half to even: [2, -2, 2]
    assert dense(new["steps"]).dtype == np.int64
    np.testing.assert_array_equal(new["steps"], [12, 18, 32])


def test_fedavg_applies_a_sparse_delta_to_its_rows_only() -> None:
    params = ParamSet({"emb": f32([[1, 1], [1, 1], [1, 1]])})
    delta = ParamSet({"emb": SparseRows(np.array([1]), f32([[2, 3]]), (3, 2))})

    new = FedAvg().step(params, delta)

    np.testing.assert_array_equal(new["emb"], f32([[1, 1], [3, 4], [1, 1]]))


def test_fedavg_does_not_mutate_its_inputs() -> None:
    params = ParamSet({"w": f32([1, 2, 3])})
    delta = ParamSet({"w": f32([1, 1, 1])})
    params_before, delta_before = params.copy(), delta.copy()

    new = FedAvg().step(params, delta)

    assert params == params_before
    assert delta == delta_before
    assert not np.shares_memory(new["w"], params["w"])


def test_fedavg_of_mean_delta_is_the_weighted_mean_of_client_models() -> None:
    # Prepare: FedAvg (McMahan et al. 2017) with lr 1 averages the clients' models.
    x = ParamSet({"w": f32([1, 2, 3])})
    clients = [(f32([2, 2, 2]), 1.0), (f32([0, 4, 8]), 3.0)]
    agg = WeightedMean(StreamHeader.of(x))
    for model, weight in clients:
        agg.add(ParamSet({"w": model - dense(x["w"])}), weight)

    # Execute
    new = FedAvg(1.0).step(x, agg.result())

    # Assert: (1*[2,2,2] + 3*[0,4,8]) / 4 = [0.5, 3.5, 6.5]
    np.testing.assert_allclose(dense(new["w"]), f32([0.5, 3.5, 6.5]), rtol=1e-6)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_fedavg_rejects_a_non_positive_lr(lr: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        FedAvg(lr)


def test_registry_builds_fedavg_by_name() -> None:
    optimizer = SERVER_OPTIMIZERS["fedavg"](0.25)

    assert isinstance(optimizer, FedAvg)
    assert optimizer.lr == 0.25


def test_zero_dim_integer_tensor_survives_aggregation_and_step() -> None:
    # Prepare: a BatchNorm-style 0-d int64 counter
    from enclavefl.server.aggregator import WeightedMean
    from enclavefl.tensors import StreamHeader

    params = ParamSet([("count", np.asarray(10, dtype=np.int64))])
    agg = WeightedMean(StreamHeader.of(params))
    # Execute
    agg.add(ParamSet([("count", np.asarray(3, dtype=np.int64))]), 1.0)
    agg.add(ParamSet([("count", np.asarray(5, dtype=np.int64))]), 1.0)
    new = FedAvg().step(params, agg.result())
    # Assert
    assert isinstance(new["count"], np.ndarray) and new["count"].shape == ()
    assert new["count"].dtype == np.int64 and int(new["count"]) == 14
