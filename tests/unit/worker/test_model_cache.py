"""The worker's model copy, and downloads of changed rows and 8-bit blocks against a real PS in one process."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.download_codec import NO_MODEL, QUANT_BLOCK
from enclavefl.errors import ProtocolError
from enclavefl.server.checkpoint import load_checkpoint
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.worker.model_cache import ModelCache
from tests.unit.worker.federation import SparseAddTrainer, f32, run_federation


def test_an_empty_cache_announces_no_model() -> None:
    assert ModelCache().held_version("ps-1") == NO_MODEL


def test_a_copy_from_another_ps_instance_is_not_announced() -> None:
    # A restarted PS may make another model under the same version number.
    cache = ModelCache()
    cache.resolve("ps-1", NO_MODEL, 4, ParamSet({"t": f32([[1, 2]])}))
    assert cache.held_version("ps-1") == 4
    assert cache.held_version("ps-2") == NO_MODEL


def test_a_disabled_cache_keeps_nothing() -> None:
    cache = ModelCache(enabled=False)
    cache.resolve("ps-1", NO_MODEL, 4, ParamSet({"t": f32([[1, 2]])}))
    assert cache.held_version("ps-1") == NO_MODEL


def test_a_download_that_does_not_resolve_drops_the_copy() -> None:
    # Prepare: a copy of version 1 with a (1, 2) table; the PS sends rows of a (4, 2) table.
    cache = ModelCache()
    cache.resolve("ps-1", NO_MODEL, 1, ParamSet({"t": f32([[1, 2]])}))
    bad = ParamSet({"t": SparseRows(np.asarray([3]), f32([[0, 0]]), (4, 2))})

    # Execute / Assert: refused, and the next pull asks for the full model.
    with pytest.raises(ProtocolError):
        cache.resolve("ps-1", 1, 2, bad)
    assert cache.held_version("ps-1") == NO_MODEL


def test_a_download_older_than_the_copy_is_refused() -> None:
    cache = ModelCache()
    cache.resolve("ps-1", NO_MODEL, 5, ParamSet({"t": f32([[1, 2]])}))
    with pytest.raises(ProtocolError, match="older than version 5"):
        cache.resolve("ps-1", 5, 3, ParamSet({"t": f32([[1, 2]])}))


class RecordingTrainer(SparseAddTrainer):
    """SparseAddTrainer that keeps every model it was handed (the resolved downloads)."""

    def __init__(self, step: float, num_samples: int, table: str, rows: Sequence[int]) -> None:
        super().__init__(step, num_samples, table, rows)
        self.received: list[ParamSet] = []

    def set_parameters(self, params: ParamSet) -> None:
        self.received.append(params.copy())
        super().set_parameters(params)


def _job(rounds: int, **extra: Any) -> JobConfig:
    return parse_job({
        "job": {"rounds": rounds},
        "round": {"min_workers": 2, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "attestation": {"mode": "none"},
        **extra,
    })


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


INITIAL = ParamSet({"emb": np.arange(32, dtype=np.float32).reshape(16, 2) / 7, "bias": f32([0.5, 0.25])})


def test_after_several_rounds_of_changed_rows_every_download_equals_the_ps_model_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: each worker looks up two rows of the 16-row table; at most 4 of 16 rows change a round.
    config = _job(5, transport={"sparse_downloads": {"enabled": True, "max_diff_fraction": 0.25}})
    a = RecordingTrainer(0.1, 1, "emb", [1, 5])
    b = RecordingTrainer(0.3, 3, "emb", [5, 12])

    # Execute
    fed = run_federation(config, INITIAL.copy(), [("a", a), ("b", b)], tmp_path)

    # Assert: round r trains from version r - 1, which the checkpoint of round r - 1 holds, bit for bit
    # (the PS keeps the newest three checkpoints: rounds 3 to 5).
    for trainer in (a, b):
        assert len(trainer.received) == 5
        assert trainer.received[0] == INITIAL
        for r in (4, 5):
            saved = load_checkpoint(tmp_path / "checkpoints" / f"round-{r - 1:06d}.ckpt").params
            assert trainer.received[r - 1] == saved, f"round {r}"
    assert fed.ps.params != INITIAL
    # Rounds 2..5 downloaded 3 changed rows (16 B ids + 8 B values each) and the dense bias, not 136 bytes.
    rows = _rows(tmp_path)
    assert [r["downloads_sparse"] for r in rows] == [0, 2, 2, 2, 2]
    assert rows[0]["bytes_out"] == rows[0]["bytes_out_dense"] == 2 * INITIAL.nbytes
    assert all(r["bytes_out"] == 2 * (3 * 16 + 8) and r["bytes_out_dense"] == 2 * INITIAL.nbytes for r in rows[1:])


def test_quantized_downloads_are_within_half_a_step_and_about_four_times_smaller(tmp_path: Path) -> None:
    # Prepare: a table of 4 blocks; both workers look up every row.
    table = np.random.default_rng(3).normal(0, 1, (QUANT_BLOCK, 4)).astype(np.float32)
    initial = ParamSet({"emb": table})
    config = _job(2, privacy={"compression": {"download": {"type": "quantize"}}})
    a = RecordingTrainer(0.1, 1, "emb", range(QUANT_BLOCK))
    b = RecordingTrainer(0.3, 1, "emb", range(QUANT_BLOCK))

    # Execute
    run_federation(config, initial.copy(), [("a", a), ("b", b)], tmp_path)

    # Assert: the worker trained from version 1 within half a block step of the PS's full precision,
    # and the PS kept full precision (its update is the mean of full-precision deltas).
    saved = load_checkpoint(tmp_path / "checkpoints" / "round-000001.ckpt").params["emb"]
    received = a.received[1]["emb"]
    assert isinstance(received, np.ndarray) and isinstance(saved, np.ndarray)
    span = np.ptp(saved.reshape(-1, QUANT_BLOCK), axis=1)  # per block max - min
    error = np.abs(received - saved).reshape(-1, QUANT_BLOCK).max(axis=1)
    assert np.all(error <= span / 255 / 2 * 1.001)
    rows = _rows(tmp_path)
    # 4096 codes + 4 blocks x (lo, step) float32 = 4128 bytes against 16384.
    assert [r["bytes_out"] for r in rows] == [2 * 4128, 2 * 4128]
    assert rows[0]["bytes_out_dense"] / rows[0]["bytes_out"] == pytest.approx(16384 / 4128)
