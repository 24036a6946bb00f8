"""The worker's upload compression: encoding by the task's settings, top-k's error feedback, the DP bound."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.compression import CompressedDecoder, decode_tensor
from enclavefl.config import parse_job
from enclavefl.messages import (
    COMPRESSION_BITS_KEY,
    COMPRESSION_SPARSE_RATE_KEY,
    COMPRESSION_TYPE_KEY,
    COMPRESSION_WARMUP_KEY,
    DP_CLIP_NORM_KEY,
    ClientSettings,
    ConfigValue,
    PeerIdentity,
    TaskInfo,
    TaskKind,
    UpdateKind,
    UpdateMeta,
    UpdateSink,
)
from enclavefl.norms import update_norm
from enclavefl.tensors import EncodedTensor, EncodedUpdate, ParamSet, SparseRows
from enclavefl.training import FitResult
from enclavefl.worker import UpdateContext, UploadCompressor
from enclavefl.worker.compression import kept_fraction
from tests.unit.worker.federation import AddTrainer, ScriptedHandler, f32, run_federation, run_scripted

SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)
TOPK_HALF: dict[str, ConfigValue] = {COMPRESSION_TYPE_KEY: "topk", COMPRESSION_SPARSE_RATE_KEY: 0.5}


def context(task_config: dict[str, ConfigValue]) -> UpdateContext:
    empty = ParamSet()
    return UpdateContext(empty, empty, FitResult(4, steps=1), SETTINGS, 1, task_config=task_config)


def decoded(payload: ParamSet | EncodedUpdate, name: str) -> Any:
    value = payload[name]
    return decode_tensor(value) if isinstance(value, EncodedTensor) else value


def test_task_without_compression_passes_the_update_and_its_kind() -> None:
    update = ParamSet({"w": f32([1.0, 2.0])})
    assert UploadCompressor().encode(update, UpdateKind.DELTA, context({})) == (update, UpdateKind.DELTA)


def test_quantize_encodes_float_tensors_and_announces_quantized() -> None:
    update = ParamSet({"w": f32([1.0, -2.0, 0.5]), "n": np.array(3, dtype=np.int64)})
    payload, kind = UploadCompressor(np.random.default_rng(0)).encode(
        update, UpdateKind.DELTA, context({COMPRESSION_TYPE_KEY: "quantize", COMPRESSION_BITS_KEY: 4}))
    assert kind is UpdateKind.QUANTIZED
    assert isinstance(payload["w"], EncodedTensor) and payload["w"].encoding == "q4"
    assert int(payload["n"]) == 3  # an integer counter travels as it is


def test_sparse_rows_travel_as_they_are() -> None:
    rows = SparseRows(np.array([2]), f32([[1.0, 2.0]]), (4, 2))
    payload, _ = UploadCompressor().encode(ParamSet({"emb": rows}), UpdateKind.DELTA,
                                           context({COMPRESSION_TYPE_KEY: "topk_quantize"}))
    assert payload["emb"] is rows


def test_topk_keeps_what_it_did_not_send_and_adds_it_next_round() -> None:
    # Round 1: [4, 1, -3, 0.5] at rate 0.5 sends 4 and -3; the residual is [0, 1, 0, 0.5].
    # Round 2: [0.2, 0.2, 0.2, 0.2] + residual = [0.2, 1.2, 0.2, 0.7]: sends 1.2 and 0.7,
    # keeps [0.2, 0, 0.2, 0].
    compressor = UploadCompressor()
    first, _ = compressor.encode(ParamSet({"w": f32([4, 1, -3, 0.5])}), UpdateKind.DELTA, context(TOPK_HALF))
    np.testing.assert_array_equal(decoded(first, "w"), f32([4, 0, -3, 0]))
    compressor.settle(True)
    np.testing.assert_array_equal(compressor.residual["w"], f32([0, 1, 0, 0.5]))
    second, _ = compressor.encode(ParamSet({"w": f32([0.2, 0.2, 0.2, 0.2])}), UpdateKind.DELTA, context(TOPK_HALF))
    np.testing.assert_allclose(decoded(second, "w"), f32([0, 1.2, 0, 0.7]), rtol=1e-6)
    compressor.settle(True)
    np.testing.assert_allclose(compressor.residual["w"], f32([0.2, 0, 0.2, 0]), rtol=1e-6)


def test_refused_push_leaves_the_residual_as_it_was() -> None:
    compressor = UploadCompressor()
    compressor.encode(ParamSet({"w": f32([4, 1, -3, 0.5])}), UpdateKind.DELTA, context(TOPK_HALF))
    compressor.settle(True)
    compressor.encode(ParamSet({"w": f32([9, 9, 9, 9])}), UpdateKind.DELTA, context(TOPK_HALF))
    compressor.settle(False)
    np.testing.assert_array_equal(compressor.residual["w"], f32([0, 1, 0, 0.5]))


def test_topk_quantize_feeds_back_the_quantization_error_too() -> None:
    # Whatever the rounding, sent + residual is exactly the update (nothing is lost, only delayed).
    rng = np.random.default_rng(4)
    w = rng.normal(size=1000).astype(np.float32)
    compressor = UploadCompressor(rng)
    payload, _ = compressor.encode(ParamSet({"w": w}), UpdateKind.DELTA,
                                   context({COMPRESSION_TYPE_KEY: "topk_quantize", COMPRESSION_SPARSE_RATE_KEY: 0.1}))
    compressor.settle(True)
    np.testing.assert_allclose(decoded(payload, "w") + compressor.residual["w"], w, atol=1e-6)


def test_with_dp_the_decoded_upload_is_within_clip_norm() -> None:
    # A clipped delta of norm 1 plus a residual of norm ~1.4 from the round before: the
    # compressor scales its encoding so what the PS decodes has norm <= 1 again.
    rng = np.random.default_rng(8)
    config: dict[str, ConfigValue] = {COMPRESSION_TYPE_KEY: "topk_quantize", COMPRESSION_SPARSE_RATE_KEY: 0.3,
                                      COMPRESSION_BITS_KEY: 4, DP_CLIP_NORM_KEY: 1.0}
    compressor = UploadCompressor(rng)
    for _ in range(3):
        w = rng.normal(size=500)
        clipped = ParamSet({"w": np.asarray(w / np.linalg.norm(w), dtype=np.float32)})
        payload, _ = compressor.encode(clipped, UpdateKind.DELTA, context(config))
        compressor.settle(True)
        assert update_norm(ParamSet({"w": decoded(payload, "w")})) <= 1.0
    assert update_norm(ParamSet(compressor.residual)) > 0.5  # the scaled-away part is kept


@pytest.mark.parametrize(("key", "value"), [(COMPRESSION_TYPE_KEY, "gzip"), (COMPRESSION_BITS_KEY, 2),
                                            (COMPRESSION_SPARSE_RATE_KEY, 1.5)])
def test_malformed_task_settings_are_refused_by_their_key(key: str, value: ConfigValue) -> None:
    config: dict[str, ConfigValue] = {COMPRESSION_TYPE_KEY: "quantize", key: value}
    with pytest.raises(ValueError, match=key):
        UploadCompressor().encode(ParamSet({"w": f32([1.0])}), UpdateKind.DELTA, context(config))


def compressed_job(upload: dict[str, Any], rounds: int = 2) -> Any:
    return parse_job({
        "job": {"rounds": rounds},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "attestation": {"mode": "none"},
        "privacy": {"compression": {"upload": upload}},
    })


def test_quantized_federation_averages_within_the_quantization_error(tmp_path: Path) -> None:
    # Two workers add 0.5 and 1.5 to every weight for 2 rounds: FedAvg (equal samples) moves each
    # weight by (0.5 + 1.5) / 2 = 1 per round, so 0..4095 becomes 2..4097. A constant delta is a
    # constant block: 8-bit quantization sends it exactly.
    initial = ParamSet({"w": np.arange(4096, dtype=np.float32)})
    federation = run_federation(compressed_job({"type": "quantize"}), initial,
                                [("a", AddTrainer(0.5, 10)), ("b", AddTrainer(1.5, 10))], tmp_path)
    np.testing.assert_allclose(federation.ps.core.params["w"], np.arange(4096, dtype=np.float32) + 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Each upload: 2 blocks of 2048 -> 16 bytes of scales, plus 4096 one-byte codes, all 0 (a constant
    # block is its low), deflated; vs 16384 bytes dense.
    assert [r["bytes_in"] for r in rows] == [2 * (16 + len(zlib.compress(bytes(4096), 6)))] * 2
    assert [r["bytes_in_dense"] for r in rows] == [2 * 16384] * 2


def test_ps_refuses_a_dense_delta_in_a_compressed_job(tmp_path: Path) -> None:
    from enclavefl.errors import UpdateRejected
    from enclavefl.messages import UpdateMeta
    from enclavefl.server.ps import ParameterServer
    from enclavefl.tensors import StreamHeader
    from tests.unit.worker.federation import peer

    initial = ParamSet({"w": f32([1.0, 2.0])})
    ps = ParameterServer(compressed_job({"type": "topk"}), initial, out_dir=tmp_path)
    who = peer("a")
    info = ps.join(who, "a", 10)
    meta = UpdateMeta(info.worker_id, 1, 0, 10, StreamHeader.of(initial), kind=UpdateKind.DELTA)
    with pytest.raises(UpdateRejected, match=r"update kind delta is not what this job aggregates \(quantized, "
                                             r"privacy.compression.upload.type topk\)"):
        ps.open_update(who, meta)


def test_dp_federation_accepts_compressed_updates_bounded_by_clip_norm(tmp_path: Path) -> None:
    # Each worker adds 1 to 64 weights: a delta of norm 8, clipped to 1, top-half kept and 4-bit
    # quantized with its residual; the PS measures every decoded update against clip_norm = 1 and
    # would refuse (and count) any above it.
    config = compressed_job({"type": "topk_quantize", "bits": 4, "sparse_rate": 0.5}, rounds=3)
    config = parse_job({**config.to_dict(), "privacy": {**config.to_dict()["privacy"],
                                                        "dp": {"enabled": True, "clip_norm": 1.0,
                                                               "noise_multiplier": 0.0}}})
    initial = ParamSet({"w": np.zeros(64, dtype=np.float32)})
    run_federation(config, initial, [("a", AddTrainer(1.0, 10)), ("b", AddTrainer(1.0, 10))], tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["participants"], r["rejected"]) for r in rows] == [(2, 0)] * 3


def test_warm_up_keeps_an_exponentially_falling_fraction() -> None:
    # rate 0.01 over 4 warm-up rounds: 0.01^(1/4) = 0.316, 0.01^(2/4) = 0.1, 0.01^(3/4) = 0.0316, then 0.01.
    fractions = [kept_fraction(0.01, 4, r) for r in range(1, 7)]
    np.testing.assert_allclose(fractions, [0.01**0.25, 0.1, 0.01**0.75, 0.01, 0.01, 0.01], rtol=1e-12)
    assert kept_fraction(0.01, 0, 1) == 0.01


def test_warm_up_round_sends_more_values() -> None:
    # Round 1 of 2 warm-up rounds at rate 0.01 keeps 0.01^(1/2) = 10 % of 1000 values.
    config: dict[str, ConfigValue] = {COMPRESSION_TYPE_KEY: "topk", COMPRESSION_SPARSE_RATE_KEY: 0.01,
                                      COMPRESSION_WARMUP_KEY: 2}
    update = ParamSet({"w": np.arange(1, 1001, dtype=np.float32)})
    payload, _ = UploadCompressor().encode(update, UpdateKind.DELTA, context(config))
    assert isinstance(payload["w"], EncodedTensor) and payload["w"].nnz == 100


class CompressingHandler(ScriptedHandler):
    """A scripted PS whose tasks ask for top-k at rate 0.5 and that decodes what it is pushed."""

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        task = super().wait_task(peer, worker_id, max_wait_s)
        return dataclasses.replace(task, config=TOPK_HALF) if task.kind is TaskKind.TRAIN else task

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        handler, decoder = self, CompressedDecoder(meta.tensors)

        class Sink(UpdateSink):
            def feed(self, chunk: bytes | memoryview) -> None:
                decoder.feed(chunk)

            def commit(self) -> None:
                handler.pushed.append((meta, decoder.finish()))

            def abort(self, reason: str) -> None:
                pass

        return Sink()


def test_residual_survives_a_rejoin() -> None:
    # The PS forgets the worker after round 1, so it joins again before round 2. Each round's delta
    # is +1 everywhere; round 1 sends 2 of the 4 ones, round 2 sends 1 + 1 (the residual) at the
    # other two positions.
    handler = CompressingHandler(SETTINGS, ParamSet({"w": np.zeros(4, dtype=np.float32)}), rounds=2,
                                 forget_after_round=1)
    run_scripted(handler, AddTrainer(1.0, 4))
    assert handler.joins == 2
    (meta1, first), (meta2, second) = handler.pushed
    assert meta1.kind is meta2.kind is UpdateKind.QUANTIZED
    unsent = first["w"] == 0
    np.testing.assert_array_equal(second["w"], np.where(unsent, 2.0, 0.0).astype(np.float32))
