"""ScaffoldClient: SCAFFOLD's option II client control variate on 2-element arrays."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.errors import CheckpointError, ProtocolError
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.worker.control import ScaffoldClient


def _ps(value: list[float], **extra: np.ndarray) -> ParamSet:
    return ParamSet([("w", np.array(value, dtype=np.float32)), *extra.items()])


def _model() -> ParamSet:
    # One float tensor and one integer counter (no control variate for the counter).
    return _ps([0.0, 0.0], steps=np.array(7, dtype=np.int64))


# Round 1: c_i = [0, 0], c = [0.1, -0.2], x = [1, 2], y = [0.8, 2.3], K = 2, lr = 0.1
#   (x - y) / (K lr) = [0.2, -0.3] / 0.2 = [1.0, -1.5]
#   c_i+ = [0, 0] - [0.1, -0.2] + [1.0, -1.5] = [0.9, -1.3];  delta_c = [0.9, -1.3]
# Round 2: c = [0.5, 0.5], x = [1, 1], y = [0.5, 1.5], K = 5, lr = 0.1
#   correction = c - c_i = [0.5 - 0.9, 0.5 + 1.3] = [-0.4, 1.8]
#   (x - y) / (K lr) = [0.5, -0.5] / 0.5 = [1.0, -1.0]
#   c_i+ = [0.9, -1.3] - [0.5, 0.5] + [1.0, -1.0] = [1.4, -2.8];  delta_c = [0.5, -1.5]
C1, X1, Y1 = [0.1, -0.2], [1.0, 2.0], [0.8, 2.3]
C2, X2, Y2 = [0.5, 0.5], [1.0, 1.0], [0.5, 1.5]


def test_first_correction_is_the_server_variate() -> None:
    # c_i starts at zero: c - c_i = c
    client = ScaffoldClient(_model())
    correction = client.correction(_ps(C1))
    assert list(correction) == ["w"]
    np.testing.assert_allclose(correction["w"], C1, rtol=1e-7)


def test_two_rounds_match_hand_computation() -> None:
    client = ScaffoldClient(_model())
    delta1 = client.update(_ps(X1), _ps(Y1), _ps(C1), steps=2, lr=0.1)
    np.testing.assert_allclose(delta1["w"], [0.9, -1.3], rtol=1e-6)
    np.testing.assert_allclose(client.correction(_ps(C2))["w"], [-0.4, 1.8], rtol=1e-6)
    delta2 = client.update(_ps(X2), _ps(Y2), _ps(C2), steps=5, lr=0.1)
    np.testing.assert_allclose(delta2["w"], [0.5, -1.5], rtol=1e-6)
    np.testing.assert_allclose(client.state()["w"], [1.4, -2.8], rtol=1e-6)


def test_delta_and_state_keep_the_parameter_dtype() -> None:
    client = ScaffoldClient(_model())
    delta = client.update(_ps(X1), _ps(Y1), ParamSet([("w", np.array(C1))]), steps=2, lr=0.1)  # float64 c
    assert delta["w"].dtype == np.float32 and client.state()["w"].dtype == np.float32


def test_state_round_trip_continues_the_same_variate() -> None:
    first = ScaffoldClient(_model())
    first.update(_ps(X1), _ps(Y1), _ps(C1), steps=2, lr=0.1)
    second = ScaffoldClient(_model())
    second.load_state(first.state())
    a = first.update(_ps(X2), _ps(Y2), _ps(C2), steps=5, lr=0.1)
    b = second.update(_ps(X2), _ps(Y2), _ps(C2), steps=5, lr=0.1)
    assert a == b and first.state() == second.state()


def test_state_is_a_copy() -> None:
    client = ScaffoldClient(_model())
    w = client.state()["w"]
    assert isinstance(w, np.ndarray)
    w[0] = 99.0
    np.testing.assert_array_equal(client.state()["w"], [0.0, 0.0])


def test_load_state_of_wrong_shape_is_refused() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(CheckpointError, match=r"'w': float32\(3,\), model has float32\(2,\)"):
        client.load_state(_ps([1.0, 2.0, 3.0]))


def test_load_state_of_another_model_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"missing \['w'\], unexpected \['v'\]"):
        ScaffoldClient(_model()).load_state(ParamSet([("v", np.zeros(2, np.float32))]))


def test_server_variate_of_wrong_shape_is_refused_naming_the_tensor() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ProtocolError, match=r"server control variate 'w': shape \(3,\), expected \(2,\)"):
        client.correction(_ps([0.1, 0.2, 0.3]))


def test_server_variate_lacking_a_tensor_is_refused() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ProtocolError, match="lacks tensor 'w'"):
        client.correction(ParamSet([("steps", np.array(7, dtype=np.int64))]))


def test_server_variate_naming_an_unknown_tensor_is_refused() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ProtocolError, match="names tensor 'bias', which the model does not have"):
        client.correction(_ps(C1, bias=np.zeros(2, np.float32)))


def test_server_variate_may_carry_the_models_integer_tensors() -> None:
    client = ScaffoldClient(_model())
    correction = client.correction(_ps(C1, steps=np.array(0, dtype=np.int64)))
    assert list(correction) == ["w"]


def test_server_variate_with_integer_dtype_is_refused() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ProtocolError, match="'w': dtype int32, expected a float dtype"):
        client.correction(ParamSet([("w", np.array([1, 2], dtype=np.int32))]))


def test_server_variate_with_nan_is_refused() -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ProtocolError, match="'w' holds a NaN"):
        client.correction(_ps([float("nan"), 0.0]))


def test_sparse_server_variate_is_read_as_dense() -> None:
    client = ScaffoldClient(_model())
    sparse = ParamSet([("w", SparseRows(np.array([1]), np.array([0.5], dtype=np.float32), (2,)))])
    np.testing.assert_array_equal(client.correction(sparse)["w"], [0.0, 0.5])


@pytest.mark.parametrize(("steps", "lr"), [(0, 0.1), (-1, 0.1), (2, 0.0), (2, -0.1), (2, float("nan"))])
def test_update_refuses_non_positive_steps_or_lr(steps: int, lr: float) -> None:
    client = ScaffoldClient(_model())
    with pytest.raises(ValueError, match="SCAFFOLD needs"):
        client.update(_ps(X1), _ps(Y1), _ps(C1), steps=steps, lr=lr)


def test_failed_update_leaves_the_variate_unchanged() -> None:
    client = ScaffoldClient(_model())
    client.update(_ps(X1), _ps(Y1), _ps(C1), steps=2, lr=0.1)
    before = client.state()
    with pytest.raises(ProtocolError):
        client.update(_ps(X2), _ps(Y2), _ps([0.1, 0.2, 0.3]), steps=5, lr=0.1)
    with pytest.raises(ValueError, match="local_params lacks tensor 'w'"):
        client.update(_ps(X2), ParamSet(), _ps(C2), steps=5, lr=0.1)
    assert client.state() == before
