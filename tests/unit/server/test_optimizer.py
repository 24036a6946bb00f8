"""Tests for enclavefl.server.optimizer: FedAvg, FedAvgM and the adaptive optimizers of Reddi et al. 2021."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.errors import CheckpointError
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.optimizer import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
)
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, Tensor, read_params, write_params


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


# --- FedAvgM and the adaptive optimizers ------------------------------------------------

# Non-default settings where the defaults would make a moment trivial (FedAdagrad's beta1 = 0).
FACTORIES: dict[str, Callable[[], ServerOptimizer]] = {
    "fedavg": lambda: FedAvg(0.5),
    "fedavgm": lambda: FedAvgM(0.5, momentum=0.9),
    "fedadagrad": lambda: FedAdagrad(0.1, beta1=0.5, tau=1e-2),
    "fedadam": lambda: FedAdam(0.1),
    "fedyogi": lambda: FedYogi(0.1),
}
STATEFUL = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
ADAPTIVE = ["fedadagrad", "fedadam", "fedyogi"]


def f64(values: Any) -> npt.NDArray[Any]:
    return np.asarray(values, dtype=np.float64)


def two_steps(optimizer: ServerOptimizer, x0: Any, d0: Any, d1: Any) -> tuple[ParamSet, ParamSet]:
    """Params after the first and the second step on a float64 tensor "w"."""
    x1 = optimizer.step(ParamSet({"w": f64(x0)}), ParamSet({"w": f64(d0)}))
    x2 = optimizer.step(x1, ParamSet({"w": f64(d1)}))
    return x1, x2


def mixed_params() -> ParamSet:
    """One tensor of each dtype the optimizers treat differently, with a 0-d one of each kind."""
    tensors: dict[str, Tensor] = {
        "half": np.asarray([1.0, -2.0], dtype=np.float16),
        "scalar": np.asarray(0.5, dtype=np.float32),
        "w": f32([[1, 2], [3, 4]]),
        "w64": f64([0.25, -0.75, 2.0]),
        "count": np.asarray(7, dtype=np.int64),
    }
    return ParamSet(tensors)


def random_delta(params: ParamSet, rng: np.random.Generator) -> ParamSet:
    out: list[tuple[str, Any]] = []
    for name, value in params.items():
        x = dense(value)
        if x.dtype.kind == "f":
            out.append((name, rng.normal(0, 0.1, x.shape).astype(x.dtype)))
        else:
            out.append((name, np.asarray(rng.integers(-3, 4, x.shape), dtype=x.dtype)))
    return ParamSet(out)


def through_checkpoint(state: PartState) -> PartState:
    """`state` after a trip through the checkpoint codec (tensors) and JSON (meta)."""
    buffer = io.BytesIO()
    write_params(buffer, state.tensors)
    buffer.seek(0)
    return PartState(meta=json.loads(json.dumps(state.meta)), tensors=read_params(buffer))


def test_fedadam_first_two_steps_follow_algorithm_2() -> None:
    # Prepare: lr 0.6, beta1 = beta2 = 0.5, tau 1, so v_{-1} = tau^2 = 1 and m_{-1} = 0.
    optimizer = FedAdam(0.6, beta1=0.5, beta2=0.5, tau=1.0)

    # Execute
    x1, x2 = two_steps(optimizer, [1, 2], [-1, 7], [7, -5])

    # Assert, step 0, d = [-1, 7]:
    #   m = 0.5*0 + 0.5*d = [-0.5, 3.5];  v = 0.5*1 + 0.5*[1, 49] = [1, 25];  sqrt(v) + tau = [2, 6]
    #   x1 = [1, 2] + 0.6*[-0.5/2, 3.5/6] = [1 - 0.15, 2 + 0.35] = [0.85, 2.35]
    np.testing.assert_allclose(dense(x1["w"]), [0.85, 2.35], rtol=1e-14)
    # step 1, d = [7, -5]:
    #   m = 0.5*[-0.5, 3.5] + 0.5*[7, -5] = [3.25, -0.75];  v = 0.5*[1, 25] + 0.5*[49, 25] = [25, 25]
    #   x2 = [0.85, 2.35] + 0.6*[3.25/6, -0.75/6] = [0.85 + 0.325, 2.35 - 0.075] = [1.175, 2.275]
    np.testing.assert_allclose(dense(x2["w"]), [1.175, 2.275], rtol=1e-14)
    state = optimizer.state()
    assert state.meta == {"step": 2}
    np.testing.assert_array_equal(state.tensors["m/w"], [3.25, -0.75])
    np.testing.assert_array_equal(state.tensors["v/w"], [25, 25])


def test_fedyogi_first_two_steps_follow_algorithm_2() -> None:
    # Prepare: lr 0.4, beta1 = beta2 = 0.5, tau 3, so v_{-1} = 9; the steps below hit
    # all three signs of sign(v - d^2).
    optimizer = FedYogi(0.4, beta1=0.5, beta2=0.5, tau=3.0)

    # Execute
    x1, x2 = two_steps(optimizer, [1, 2], [12, 3], [-8, 12])

    # Assert, step 0, d = [12, 3], d^2 = [144, 9]:
    #   v = 9 - 0.5*144*sign(9 - 144) = 9 + 72 = 81;  9 - 0.5*9*sign(0) = 9   -> sqrt(v) + tau = [12, 6]
    #   m = 0.5*d = [6, 1.5];  x1 = [1, 2] + 0.4*[6/12, 1.5/6] = [1.2, 2.1]
    np.testing.assert_allclose(dense(x1["w"]), [1.2, 2.1], rtol=1e-14)
    # step 1, d = [-8, 12], d^2 = [64, 144]:
    #   v = 81 - 0.5*64*sign(81 - 64) = 81 - 32 = 49;  9 - 0.5*144*sign(9 - 144) = 81  -> [10, 12]
    #   m = 0.5*[6, 1.5] + 0.5*[-8, 12] = [-1, 6.75]
    #   x2 = [1.2, 2.1] + 0.4*[-1/10, 6.75/12] = [1.2 - 0.04, 2.1 + 0.225] = [1.16, 2.325]
    np.testing.assert_allclose(dense(x2["w"]), [1.16, 2.325], rtol=1e-14)
    np.testing.assert_array_equal(optimizer.state().tensors["v/w"], [49, 81])


def test_fedadagrad_first_two_steps_follow_algorithm_2() -> None:
    # Prepare: lr 0.8, beta1 0.5 (so m is not just d), tau 3, so v_{-1} = 9.
    optimizer = FedAdagrad(0.8, beta1=0.5, tau=3.0)

    # Execute
    x1, x2 = two_steps(optimizer, [1, 2], [4, 0], [12, 4])

    # Assert, step 0, d = [4, 0]:
    #   v = 9 + [16, 0] = [25, 9] -> sqrt(v) + tau = [8, 6];  m = 0.5*d = [2, 0]
    #   x1 = [1, 2] + 0.8*[2/8, 0/6] = [1.2, 2]
    np.testing.assert_allclose(dense(x1["w"]), [1.2, 2.0], rtol=1e-14)
    # step 1, d = [12, 4]:
    #   v = [25, 9] + [144, 16] = [169, 25] -> [16, 8];  m = 0.5*[2, 0] + 0.5*[12, 4] = [7, 2]
    #   x2 = [1.2, 2] + 0.8*[7/16, 2/8] = [1.2 + 0.35, 2 + 0.2] = [1.55, 2.2]
    np.testing.assert_allclose(dense(x2["w"]), [1.55, 2.2], rtol=1e-14)
    np.testing.assert_array_equal(optimizer.state().tensors["v/w"], [169, 25])


def test_fedavgm_first_two_steps_apply_server_momentum() -> None:
    # Prepare: lr 0.5, momentum 0.5, m_{-1} = 0.
    optimizer = FedAvgM(0.5, momentum=0.5)

    # Execute
    x1, x2 = two_steps(optimizer, [1, 2], [2, -4], [1, 2])

    # Assert, step 0: m = [2, -4];  x1 = [1, 2] + 0.5*[2, -4] = [2, 0]
    np.testing.assert_array_equal(x1["w"], [2.0, 0.0])
    # step 1: m = 0.5*[2, -4] + [1, 2] = [2, 0];  x2 = [2, 0] + 0.5*[2, 0] = [3, 0]
    np.testing.assert_array_equal(x2["w"], [3.0, 0.0])
    np.testing.assert_array_equal(optimizer.state().tensors["m/w"], [2.0, 0.0])


def test_adaptive_settings_default_to_the_paper_values() -> None:
    adam, yogi, adagrad = FedAdam(0.1), FedYogi(0.1), FedAdagrad(0.1)

    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 1e-3)
    assert (yogi.beta1, yogi.beta2, yogi.tau) == (0.9, 0.99, 1e-3)
    assert (adagrad.beta1, adagrad.tau) == (0.0, 1e-3)
    assert FedAvgM().momentum == 0.9 and FedAvgM().lr == 1.0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_step_does_not_mutate_its_inputs(name: str) -> None:
    # Prepare
    optimizer = FACTORIES[name]()
    params = mixed_params()
    delta = random_delta(params, np.random.default_rng(1))
    params_before, delta_before = params.copy(), delta.copy()

    # Execute: twice, so the second step reads moments the first one stored
    new = optimizer.step(params, delta)
    optimizer.step(new, delta)

    # Assert
    assert params == params_before
    assert delta == delta_before
    assert not any(np.shares_memory(dense(new[n]), dense(params[n])) for n in params)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_step_keeps_names_shapes_dtypes_and_zero_dim_arrays(name: str) -> None:
    params = mixed_params()

    new = FACTORIES[name]().step(params, random_delta(params, np.random.default_rng(2)))

    assert list(new) == list(params)
    for key in params:
        before, after = dense(params[key]), new[key]
        assert isinstance(after, np.ndarray), (key, type(after))
        assert (after.dtype, after.shape) == (before.dtype, before.shape), key


@pytest.mark.parametrize("name", STATEFUL)
def test_moments_are_float32_for_float16_and_float32_params_and_float64_for_float64(name: str) -> None:
    optimizer = FACTORIES[name]()
    params = mixed_params()

    optimizer.step(params, random_delta(params, np.random.default_rng(3)))

    kinds = ["m"] if name == "fedavgm" else ["m", "v"]
    tensors = optimizer.state().tensors
    assert list(tensors) == [f"{k}/{p}" for p in ["half", "scalar", "w", "w64"] for k in kinds]
    for kind in kinds:
        assert dense(tensors[f"{kind}/half"]).dtype == np.float32
        assert dense(tensors[f"{kind}/scalar"]).dtype == np.float32
        assert dense(tensors[f"{kind}/scalar"]).shape == ()
        assert dense(tensors[f"{kind}/w64"]).dtype == np.float64


@pytest.mark.parametrize("name", ["fedavgm", *ADAPTIVE])
def test_integer_tensors_follow_the_fedavg_rule_without_moments(name: str) -> None:
    # Prepare: lr 0.5 for every optimizer; no moments for the int64 tensor
    optimizer = SERVER_OPTIMIZERS[name](0.5)
    params = ParamSet({"steps": np.array([10, 20, 30], np.int64)})
    delta = ParamSet({"steps": np.array([3, -5, 4], np.int64)})

    # Execute
    new = optimizer.step(params, delta)

    # Assert: 0.5 * delta = [1.5, -2.5, 2] rounds half to even: [2, -2, 2]
    np.testing.assert_array_equal(new["steps"], [12, 18, 32])
    assert dense(new["steps"]).dtype == np.int64
    assert len(optimizer.state().tensors) == 0


def test_fedadam_treats_a_sparse_delta_as_its_dense_form() -> None:
    params = ParamSet({"emb": f32([[1, 1], [1, 1], [1, 1]])})
    sparse = SparseRows(np.array([1]), f32([[2, 3]]), (3, 2))
    as_sparse, as_dense = FedAdam(0.1), FedAdam(0.1)

    new_sparse = as_sparse.step(params, ParamSet({"emb": sparse}))
    new_dense = as_dense.step(params, ParamSet({"emb": sparse.to_dense()}))

    assert new_sparse == new_dense
    assert as_sparse.state() == as_dense.state()


@pytest.mark.parametrize(
    ("factory", "setting"),
    [
        (lambda: FedAvgM(0.0), "lr"),
        (lambda: FedAvgM(1.0, momentum=1.0), "momentum"),
        (lambda: FedAvgM(1.0, momentum=-0.1), "momentum"),
        (lambda: FedAdagrad(float("inf")), "lr"),
        (lambda: FedAdagrad(0.1, beta1=1.0), "beta1"),
        (lambda: FedAdagrad(0.1, tau=0.0), "tau"),
        (lambda: FedAdam(-0.1), "lr"),
        (lambda: FedAdam(0.1, beta1=-0.5), "beta1"),
        (lambda: FedAdam(0.1, beta2=1.0), "beta2"),
        (lambda: FedAdam(0.1, tau=-1e-3), "tau"),
        (lambda: FedYogi(float("nan")), "lr"),
        (lambda: FedYogi(0.1, beta1=float("nan")), "beta1"),
        (lambda: FedYogi(0.1, beta2=1.5), "beta2"),
        (lambda: FedYogi(0.1, tau=float("nan")), "tau"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(factory: Callable[[], ServerOptimizer], setting: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{setting}\b"):
        factory()


def test_registry_holds_every_optimizer_under_its_name() -> None:
    assert sorted(SERVER_OPTIMIZERS) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"]
    for key, cls in SERVER_OPTIMIZERS.items():
        optimizer = cls(0.25)  # the parameter server passes the lr positionally
        assert cls.name == key
        assert optimizer.lr == 0.25


def test_state_before_the_first_step_is_step_zero_without_moments() -> None:
    state = FedAdam(0.1).state()

    assert state.meta == {"step": 0}
    assert len(state.tensors) == 0


def test_fedavg_state_is_empty_and_only_an_empty_state_loads() -> None:
    optimizer = FedAvg()

    optimizer.load_state(optimizer.state())

    assert optimizer.state() == PartState()
    with pytest.raises(CheckpointError, match="step"):
        optimizer.load_state(PartState(meta={"step": 3}))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_round_trip_through_the_checkpoint_codec_resumes_bit_identically(name: str) -> None:
    # Prepare: three steps, then a restored twin
    rng = np.random.default_rng(4)
    original = FACTORIES[name]()
    params = mixed_params()
    for _ in range(3):
        params = original.step(params, random_delta(params, rng))
    restored = FACTORIES[name]()
    restored.load_state(through_checkpoint(original.state()))
    params_restored = params.copy()

    # Execute: both continue on the same deltas
    for _ in range(3):
        delta = random_delta(params, rng)
        params = original.step(params, delta)
        params_restored = restored.step(params_restored, delta)

    # Assert: byte for byte (ParamSet equality compares bits and dtypes)
    assert params_restored == params
    assert restored.state() == original.state()


def test_state_snapshot_does_not_follow_later_steps() -> None:
    optimizer = FedAdam(0.1)
    params = ParamSet({"w": f32([1, 2])})
    params = optimizer.step(params, ParamSet({"w": f32([1, -1])}))
    snapshot = optimizer.state()
    kept = snapshot.tensors.copy()

    optimizer.step(params, ParamSet({"w": f32([3, 3])}))

    assert snapshot.tensors == kept
    with pytest.raises(ValueError, match="read-only"):
        dense(snapshot.tensors["m/w"])[0] = 0


def stepped_fedadam() -> tuple[FedAdam, ParamSet]:
    """A FedAdam after one step on a float32 "w" and a 0-d float64 "b", and the params it made."""
    optimizer = FedAdam(0.1)
    params = ParamSet({"w": f32([1, 2]), "b": f64(0.5)})
    return optimizer, optimizer.step(params, ParamSet({"w": f32([1, -1]), "b": f64(2)}))


def with_tensor(state: PartState, name: str, value: Any) -> PartState:
    return PartState(state.meta, ParamSet({**state.tensors, name: value}))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: with_tensor(s, "v/w", f32([1, 2, 3])), "v/w"),
        (lambda s: with_tensor(s, "m/w", f64([0, 0])), "m/w"),
        (lambda s: with_tensor(s, "v/b", f64(-1.0)), "v/b"),
        (lambda s: with_tensor(s, "x/w", f32([0, 0])), "x/w"),
        (lambda s: PartState(s.meta, ParamSet((n, v) for n, v in s.tensors.items() if n != "m/b")), "m/b"),
        (lambda s: PartState({"step": 1, "lr": 0.1}, s.tensors), "lr"),
        (lambda s: PartState({}, s.tensors), "step"),
        (lambda s: PartState({"step": -1}, s.tensors), "step"),
    ],
)
def test_load_state_refuses_a_bad_state_and_leaves_the_optimizer_unchanged(
    change: Callable[[PartState], PartState], named: str
) -> None:
    # Prepare: an optimizer after one step, and a twin that is never given the bad state
    optimizer, params = stepped_fedadam()
    twin, _ = stepped_fedadam()
    before = optimizer.state()
    bad = change(before)

    # Execute
    with pytest.raises(CheckpointError, match=named):
        optimizer.load_state(bad)

    # Assert: same state, and the next step is the twin's
    assert optimizer.state() == before
    delta = ParamSet({"w": f32([0.5, 0.5]), "b": f64(1)})
    assert optimizer.step(params, delta) == twin.step(params, delta)


def test_loaded_state_that_does_not_fit_the_model_is_refused_at_the_first_step() -> None:
    # Prepare: a fresh optimizer cannot know the model yet, so load_state takes the moments ...
    source, _ = stepped_fedadam()
    optimizer = FedAdam(0.1)
    optimizer.load_state(source.state())
    params = ParamSet({"w": f32([1, 2, 3]), "b": f64(0.5)})

    # Execute / Assert: ... and the first step checks them against the params.
    with pytest.raises(CheckpointError, match="m/w"):
        optimizer.step(params, ParamSet({"w": f32([1, 1, 1]), "b": f64(1)}))
    assert optimizer.state() == source.state()


def test_step_refuses_a_delta_of_another_shape_and_keeps_its_moments() -> None:
    optimizer, params = stepped_fedadam()
    before = optimizer.state()

    with pytest.raises(ValueError, match="'w'"):
        optimizer.step(params, ParamSet({"w": f32([1, 2, 3]), "b": f64(1)}))

    assert optimizer.state() == before
