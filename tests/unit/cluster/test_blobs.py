"""Tests for enclavefl.cluster.blobs: the model and the close's state as bytes."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.cluster.blobs import CloseState, decode_close_state, decode_model, encode_close_state, encode_model
from enclavefl.errors import ProtocolError
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet


def test_a_model_round_trips_bit_for_bit() -> None:
    params = ParamSet({"w": np.array([[1.5, -2]], np.float32), "n": np.array(3, np.int64)})

    assert decode_model(encode_model(params)).equal(params)


def test_the_close_state_round_trips_parts_and_history() -> None:
    # Prepare
    state = CloseState(4, ({"round": 3, "eval_loss": 0.7}, {"round": 4, "eval_loss": 0.5}),
                       {"optimizer": PartState({"step": 4}, ParamSet({"m": np.ones(2, np.float32)})),
                        "engine": PartState()})

    # Execute
    back = decode_close_state(encode_close_state(state))

    # Assert
    assert back.round == 4 and back.rows_after(3) == [{"round": 4, "eval_loss": 0.5}]
    assert len(back.rows_after(0)) == 2
    assert back.parts["optimizer"].meta == {"step": 4}
    assert back.parts["optimizer"].tensors.equal(state.parts["optimizer"].tensors)
    assert len(back.parts["engine"].tensors) == 0


def test_a_partial_is_not_taken_for_a_close_state() -> None:
    from enclavefl.server.aggregator import WeightedMean
    from enclavefl.tensors import StreamHeader

    blob = WeightedMean(StreamHeader.of(ParamSet({"w": np.zeros(1, np.float32)}))).partial()

    with pytest.raises(ProtocolError, match="magic"):
        decode_close_state(blob)
