"""Tests for enclavefl.transport.wire: status mapping, version checks and envelope conversions.

Every round trip goes through real protobuf bytes (SerializeToString, then
FromString), the way the envelopes cross the wire.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
import pytest

from enclavefl.errors import (
    DeadlineExceeded,
    EnclaveFLError,
    ProtocolError,
    StaleSession,
    TransportError,
    Unavailable,
    VerificationError,
    VersionMismatch,
)
from enclavefl.messages import ClientSettings, ConfigValue, TaskInfo, TaskKind, UpdateKind, UpdateMeta
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.tensors import CodecLimits, ParamSet, SparseRows, StreamHeader, Tensor, TensorSpec
from enclavefl.transport.wire import (
    MAX_CONFIG_ENTRIES,
    MAX_CONFIG_KEY_BYTES,
    MAX_CONFIG_TEXT_BYTES,
    MAX_EXTENSION_BYTES,
    MAX_EXTENSION_KEY_BYTES,
    MAX_EXTENSIONS,
    MAX_EXTENSIONS_TOTAL_BYTES,
    STATUS_ERRORS,
    check_version,
    config_from_proto,
    config_to_proto,
    error_from_rpc,
    extensions_from_proto,
    header_from_proto,
    header_to_proto,
    settings_from_proto,
    settings_to_proto,
    task_from_proto,
    task_to_proto,
    update_meta_from_proto,
    update_meta_to_proto,
)


class FailedCall(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    """A finished call's error as grpc raises it: a status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_is_mapped_to_one_of_our_errors(code: grpc.StatusCode) -> None:
    assert code in STATUS_ERRORS
    assert issubclass(STATUS_ERRORS[code], EnclaveFLError)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_error_from_rpc_names_the_call_and_details(code: grpc.StatusCode) -> None:
    error = error_from_rpc(FailedCall(code, "peer said no"), "PushUpdate")

    assert isinstance(error, STATUS_ERRORS[code])
    assert "PushUpdate" in str(error)
    assert "peer said no" in str(error)


@pytest.mark.parametrize(
    ("code", "kind", "builtin"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable, ConnectionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, TimeoutError),
        (grpc.StatusCode.NOT_FOUND, StaleSession, TransportError),
        (grpc.StatusCode.INVALID_ARGUMENT, ProtocolError, EnclaveFLError),
        (grpc.StatusCode.UNIMPLEMENTED, VersionMismatch, ProtocolError),
    ],
)
def test_specific_codes_map_to_specific_errors(
    code: grpc.StatusCode, kind: type[EnclaveFLError], builtin: type[Exception]
) -> None:
    error = error_from_rpc(FailedCall(code, "x"), "Join")

    assert type(error) is kind
    assert isinstance(error, builtin)


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED])
def test_refusal_by_the_peer_is_a_verification_error(code: grpc.StatusCode) -> None:
    error = error_from_rpc(FailedCall(code, "measurement not allowed"), "Join")

    assert isinstance(error, VerificationError)
    assert error.field == "peer"
    assert "measurement not allowed" in str(error)


def test_version_refusal_is_a_version_mismatch() -> None:
    details = "Join: protocol version 9, this build speaks 1"

    error = error_from_rpc(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, details), "Join")

    assert isinstance(error, VersionMismatch)


def test_missing_details_fall_back_to_the_code() -> None:
    error = error_from_rpc(FailedCall(grpc.StatusCode.UNAVAILABLE, None), "WaitTask")

    assert isinstance(error, Unavailable)
    assert "UNAVAILABLE" in str(error)


def test_check_version_accepts_ours() -> None:
    check_version(PROTOCOL_VERSION, "Join", sender="worker")
    check_version(PROTOCOL_VERSION, "Task", sender="PS")


def test_ps_refuses_a_protocol_1_worker_naming_both_versions() -> None:
    with pytest.raises(VersionMismatch) as caught:
        check_version(1, "Join", sender="worker")

    assert str(caught.value) == (
        f"Join: protocol version mismatch: upgrade the worker: this PS speaks protocol {PROTOCOL_VERSION}, the worker 1"
    )


def test_worker_refuses_a_protocol_1_ps_reply_naming_both_versions() -> None:
    with pytest.raises(VersionMismatch) as caught:
        check_version(1, "JoinReply", sender="PS")

    assert str(caught.value) == (
        f"JoinReply: protocol version mismatch: upgrade the PS: this worker speaks protocol {PROTOCOL_VERSION}, the PS 1"
    )


def test_a_newer_peer_asks_to_upgrade_this_side() -> None:
    newer = PROTOCOL_VERSION + 1

    with pytest.raises(VersionMismatch, match=f"upgrade the worker: this worker speaks protocol {PROTOCOL_VERSION}, the PS {newer}"):
        check_version(newer, "Task", sender="PS")
    with pytest.raises(VersionMismatch, match=f"upgrade the PS: this PS speaks protocol {PROTOCOL_VERSION}, the worker {newer}"):
        check_version(newer, "PushUpdate", sender="worker")


def test_the_ps_refusal_reaches_the_worker_as_a_version_mismatch_unchanged() -> None:
    # Prepare: the PS's refusal of a worker of another version, as its status details.
    with pytest.raises(VersionMismatch) as caught:
        check_version(1, "Join", sender="worker")
    details = str(caught.value)

    # Execute
    error = error_from_rpc(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, details), "Join ps:7000")

    # Assert: the PS's words say everything; nothing is appended.
    assert isinstance(error, VersionMismatch)
    assert str(error) == f"Join ps:7000: {details}"


def test_refusal_by_a_protocol_1_ps_says_which_protocol_this_worker_speaks() -> None:
    # A protocol-1 PS words its refusal this way; "this build" is the PS.
    details = f"Join: protocol version {PROTOCOL_VERSION}, this build speaks 1"

    error = error_from_rpc(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, details), "Join ps:7000")

    assert isinstance(error, VersionMismatch)
    assert f"this worker speaks protocol {PROTOCOL_VERSION}" in str(error)


def sample_header() -> StreamHeader:
    tensors: dict[str, Tensor] = {
        "conv.weight": np.zeros((8, 3, 3, 3), np.float32),
        "bn.steps": np.array(3, np.int64),
        "emb": SparseRows(np.array([1, 4]), np.zeros((2, 16), np.float16), (1000, 16)),
        "mask": np.zeros((2, 0), np.bool_),
        "ünïcode/name": np.zeros(1, np.uint8),
    }
    return StreamHeader.of(ParamSet(tensors))


def test_header_round_trips_through_protobuf_bytes() -> None:
    # Prepare
    header = sample_header()

    # Execute
    data = header_to_proto(header).SerializeToString()
    back = header_from_proto(pb.TensorHeader.FromString(data))

    # Assert
    assert back == header
    assert back.tensors[2] == TensorSpec("emb", "float16", (1000, 16), "sparse_rows", 2)
    assert back.tensors[1].shape == ()


def test_header_from_proto_refuses_an_unknown_encoding() -> None:
    msg = header_to_proto(sample_header())
    msg.tensors[0].encoding = 7  # type: ignore[assignment]  # as a newer peer might send

    with pytest.raises(ProtocolError, match="conv.weight.*unknown encoding 7"):
        header_from_proto(msg)


def test_hostile_header_is_converted_but_refused_by_the_limits_check() -> None:
    # Conversion trusts nothing and checks nothing; StreamHeader.check does.
    msg = pb.TensorHeader(tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[-1, 4])])
    header = header_from_proto(msg)

    with pytest.raises(ProtocolError, match="invalid dimension"):
        header.check(CodecLimits())

    huge = header_from_proto(pb.TensorHeader(tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[2**40, 2**20])]))
    with pytest.raises(ProtocolError, match="max_tensor_bytes"):
        huge.check(CodecLimits())


# -- ClientSettings -----------------------------------------------------------------------------------------


def every_setting() -> ClientSettings:
    # Binary fractions, so equality after the double round trip is exact.
    return ClientSettings(
        epochs=3, batch_size=16, lr=0.125, optimizer="adam", momentum=0.5, weight_decay=0.25,
        algorithm="fedprox", proximal_mu=0.75,
    )


def test_client_settings_round_trip_through_protobuf_bytes() -> None:
    settings = every_setting()

    data = settings_to_proto(settings).SerializeToString()
    back = settings_from_proto(pb.ClientSettings.FromString(data))

    assert back == settings


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_client_settings_accept_every_known_optimizer_and_algorithm(optimizer: str, algorithm: str) -> None:
    settings = ClientSettings(epochs=1, batch_size=1, lr=1.0, optimizer=optimizer, algorithm=algorithm)

    assert settings_from_proto(settings_to_proto(settings)) == settings


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", -1),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -0.1),
        ("lr", math.nan),
        ("lr", math.inf),
        ("optimizer", "rmsprop"),
        ("optimizer", ""),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("momentum", math.nan),
        ("weight_decay", -0.5),
        ("weight_decay", math.inf),
        ("weight_decay", math.nan),
        ("algorithm", "fedsgd"),
        ("algorithm", ""),
        ("proximal_mu", -1.0),
        ("proximal_mu", math.nan),
        ("proximal_mu", math.inf),
    ],
)
def test_client_settings_out_of_range_are_refused_naming_the_field(field: str, value: Any) -> None:
    msg = settings_to_proto(every_setting())
    setattr(msg, field, value)
    msg = pb.ClientSettings.FromString(msg.SerializeToString())

    with pytest.raises(ProtocolError, match=f"ClientSettings\\.{field}: "):
        settings_from_proto(msg)


# -- Task and its config map --------------------------------------------------------------------------------


def test_config_round_trips_through_protobuf_bytes_keeping_each_type() -> None:
    # Prepare: every value type, including the ones a careless oneof would confuse.
    config: dict[str, ConfigValue] = {
        "secagg.enabled": True,
        "secagg.dropout_ok": False,
        "secagg.threshold": 3,
        "zero": 0,
        "big": -(2**62),
        "dp.noise_multiplier": 0.5,
        "whole_float": 2.0,
        "dp.mechanism": "gaussian",
        "empty": "",
        "ünïcode/kéy": "välue",
    }

    # Execute
    data = pb.Task(config=config_to_proto(config)).SerializeToString()
    back = config_from_proto(pb.Task.FromString(data).config)

    # Assert: equal values and equal types (True == 1 and 2.0 == 2 would hide a mix-up).
    assert back == config
    assert {k: type(v) for k, v in back.items()} == {k: type(v) for k, v in config.items()}


def test_config_to_proto_refuses_a_value_of_another_type() -> None:
    with pytest.raises(TypeError, match="Task.config\\['k'\\]: bytes"):
        config_to_proto({"k": b"raw"})  # type: ignore[dict-item]  # what a careless caller might pass


def test_config_at_its_limits_is_accepted() -> None:
    config: dict[str, ConfigValue] = {f"k{i}": i for i in range(MAX_CONFIG_ENTRIES - 2)}
    config["é" * (MAX_CONFIG_KEY_BYTES // 2)] = "x"  # 2 bytes a character: exactly the limit
    config["text"] = "t" * MAX_CONFIG_TEXT_BYTES

    back = config_from_proto(pb.Task.FromString(pb.Task(config=config_to_proto(config)).SerializeToString()).config)

    assert back == config


def test_config_with_too_many_entries_is_refused() -> None:
    config: dict[str, ConfigValue] = {f"k{i}": i for i in range(MAX_CONFIG_ENTRIES + 1)}

    with pytest.raises(ProtocolError, match=f"Task.config: {MAX_CONFIG_ENTRIES + 1} entries, at most {MAX_CONFIG_ENTRIES}"):
        config_from_proto(pb.Task(config=config_to_proto(config)).config)


def test_config_key_over_its_byte_limit_is_refused() -> None:
    # 65 two-byte characters: 130 bytes, though only 65 characters.
    key = "é" * (MAX_CONFIG_KEY_BYTES // 2 + 1)

    with pytest.raises(ProtocolError, match=f"Task.config: key .* has 130 bytes, at most {MAX_CONFIG_KEY_BYTES}"):
        config_from_proto(pb.Task(config=config_to_proto({key: 1})).config)


def test_config_text_over_its_byte_limit_is_refused() -> None:
    config: dict[str, ConfigValue] = {"dp.note": "t" * (MAX_CONFIG_TEXT_BYTES + 1)}

    with pytest.raises(ProtocolError, match=f"Task.config\\['dp.note'\\]: text of {MAX_CONFIG_TEXT_BYTES + 1} bytes"):
        config_from_proto(pb.Task(config=config_to_proto(config)).config)


def test_config_entry_without_a_value_is_refused() -> None:
    msg = pb.Task()
    msg.config["unset"].SetInParent()  # an entry whose oneof carries nothing
    msg = pb.Task.FromString(msg.SerializeToString())

    with pytest.raises(ProtocolError, match="Task.config\\['unset'\\]: no value set"):
        config_from_proto(msg.config)


def test_long_keys_are_shortened_in_messages() -> None:
    with pytest.raises(ProtocolError) as caught:
        config_from_proto(pb.Task(config=config_to_proto({"k" * 10_000: 1})).config)

    assert len(str(caught.value)) < 200


def test_task_round_trips_through_protobuf_bytes() -> None:
    task = TaskInfo(
        kind=TaskKind.TRAIN, ps_instance="ps-1", round=7, model_version=6, retry_after_s=1.5,
        client=every_setting(), message="go", config={"secagg.threshold": 2, "dp.on": True},
    )

    msg = task_to_proto(task)
    back = task_from_proto(pb.Task.FromString(msg.SerializeToString()))

    assert msg.protocol_version == PROTOCOL_VERSION
    assert back == task


@pytest.mark.parametrize("kind", list(TaskKind))
def test_task_without_client_settings_comes_back_without(kind: TaskKind) -> None:
    task = TaskInfo(kind=kind, ps_instance="ps-1", retry_after_s=2.0)

    back = task_from_proto(pb.Task.FromString(task_to_proto(task).SerializeToString()))

    assert back == task
    assert back.client is None


def test_task_of_an_unknown_kind_is_refused_naming_it() -> None:
    msg = task_to_proto(TaskInfo(kind=TaskKind.WAIT, ps_instance="ps-1"))
    msg.kind = 7  # type: ignore[assignment]  # as a newer PS might send

    with pytest.raises(ProtocolError, match="Task.kind: unknown value 7"):
        task_from_proto(pb.Task.FromString(msg.SerializeToString()))


def test_task_with_bad_client_settings_is_refused_naming_the_field() -> None:
    msg = task_to_proto(TaskInfo(kind=TaskKind.TRAIN, ps_instance="ps-1", client=every_setting()))
    msg.client.optimizer = "lbfgs"

    with pytest.raises(ProtocolError, match="ClientSettings.optimizer: 'lbfgs'"):
        task_from_proto(pb.Task.FromString(msg.SerializeToString()))


# -- UpdateHeader -------------------------------------------------------------------------------------------


def sample_meta(kind: UpdateKind = UpdateKind.DELTA, extensions: dict[str, bytes] | None = None) -> UpdateMeta:
    return UpdateMeta(
        worker_id="w-1", round=4, model_version=3, num_samples=120, tensors=sample_header(),
        metrics={"loss": 0.25, "accuracy": 0.75}, kind=kind, extensions=extensions or {},
    )


@pytest.mark.parametrize("kind", list(UpdateKind), ids=lambda k: k.name)
def test_update_meta_round_trips_through_protobuf_bytes(kind: UpdateKind) -> None:
    # Prepare: binary extension values, including an empty one and every byte value.
    meta = sample_meta(kind, {"secagg.share": bytes(range(256)), "empty": b"", "quant.scale": b"\x00\x00\x80?"})

    # Execute
    msg = update_meta_to_proto(meta)
    back = update_meta_from_proto(pb.UpdateHeader.FromString(msg.SerializeToString()))

    # Assert
    assert msg.protocol_version == PROTOCOL_VERSION
    assert back == meta


def test_update_kinds_have_the_wire_numbers_of_the_proto() -> None:
    # DELTA=0, WEIGHTS=1, MASKED=2, QUANTIZED=3 in federation.proto: a peer reads the number.
    numbers = {kind: update_meta_to_proto(sample_meta(kind)).kind for kind in UpdateKind}

    assert numbers == {UpdateKind.DELTA: 0, UpdateKind.WEIGHTS: 1, UpdateKind.MASKED: 2, UpdateKind.QUANTIZED: 3}


def test_update_of_an_unknown_kind_is_refused_naming_it() -> None:
    msg = update_meta_to_proto(sample_meta())
    msg.kind = 9  # type: ignore[assignment]  # as a newer worker might send

    with pytest.raises(ProtocolError, match="UpdateHeader.kind: unknown value 9"):
        update_meta_from_proto(pb.UpdateHeader.FromString(msg.SerializeToString()))


def test_extensions_at_their_limits_are_accepted() -> None:
    # 8 values of 1 MiB: exactly the total; 56 empty ones with 128-byte keys: exactly the count.
    extensions = {f"v{i}": bytes(MAX_EXTENSION_BYTES) for i in range(MAX_EXTENSIONS_TOTAL_BYTES // MAX_EXTENSION_BYTES)}
    while len(extensions) < MAX_EXTENSIONS:
        extensions[f"{len(extensions):03d}".ljust(MAX_EXTENSION_KEY_BYTES, "k")] = b""

    back = extensions_from_proto(pb.UpdateHeader(extensions=extensions).extensions)

    assert back == extensions


def test_extensions_with_too_many_entries_are_refused() -> None:
    extensions = {f"e{i}": b"x" for i in range(MAX_EXTENSIONS + 1)}

    with pytest.raises(ProtocolError, match=f"UpdateHeader.extensions: {MAX_EXTENSIONS + 1} entries, at most {MAX_EXTENSIONS}"):
        update_meta_from_proto(update_meta_to_proto(sample_meta(extensions=extensions)))


def test_extension_key_over_its_byte_limit_is_refused() -> None:
    key = "k" * (MAX_EXTENSION_KEY_BYTES + 1)

    with pytest.raises(ProtocolError, match=f"UpdateHeader.extensions: key .* has 129 bytes, at most {MAX_EXTENSION_KEY_BYTES}"):
        update_meta_from_proto(update_meta_to_proto(sample_meta(extensions={key: b""})))


def test_extension_value_over_its_limit_is_refused() -> None:
    extensions = {"secagg.share": bytes(MAX_EXTENSION_BYTES + 1)}

    with pytest.raises(ProtocolError, match=f"UpdateHeader.extensions\\['secagg.share'\\]: {MAX_EXTENSION_BYTES + 1} bytes"):
        update_meta_from_proto(update_meta_to_proto(sample_meta(extensions=extensions)))


def test_extensions_over_their_total_are_refused() -> None:
    # 9 values of 1 MiB each: each within its limit, 9 MiB together over the 8 MiB total.
    extensions = {f"v{i}": bytes(MAX_EXTENSION_BYTES) for i in range(9)}

    with pytest.raises(ProtocolError, match=f"UpdateHeader.extensions: over {MAX_EXTENSIONS_TOTAL_BYTES} bytes in total"):
        update_meta_from_proto(update_meta_to_proto(sample_meta(extensions=extensions)))


def test_compressed_tensor_header_round_trips_with_its_coded_bytes() -> None:
    header = StreamHeader((TensorSpec("w", "float32", (50, 100), "topk_q8", 50, 40),
                           TensorSpec("b", "float32", (100,), "q4")))
    assert header_from_proto(header_to_proto(header)) == header
