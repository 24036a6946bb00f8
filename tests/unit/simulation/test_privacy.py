"""The privacy and compression options in both simulation modes: the pool mode runs what a worker runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.app import build_server, simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.simulation import ClientStateStore, Driver, InlinePool, ProcessPool
from enclavefl.tensors import ParamSet
from enclavefl.training import Trainer
from tests.unit.simulation.clients import AddTrainers, SteadyTrainers
from tests.unit.worker.federation import f32


def job(*, workers: int = 1, rounds: int = 3, **sections: Any) -> JobConfig:
    round_ = {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0,
              **sections.pop("round", {})}
    return parse_job({
        "job": {"rounds": rounds, "workers": workers, "seed": 5},
        "round": round_,
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "management": {"enabled": False},
        "attestation": {"mode": "none"},
        **sections,
    })


TOPK = {"privacy": {"compression": {"upload": {"type": "topk", "sparse_rate": 0.5}}}}


class Task:
    """The server's side: the initial model; clients come from ``trainers``."""

    name = "tiny"

    def __init__(self, initial: ParamSet, trainers: Any) -> None:
        self._initial = initial
        self._trainers = trainers

    def initial_parameters(self) -> ParamSet:
        return self._initial.copy()

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return self._trainers(index, num_workers)  # type: ignore[no-any-return]

    def server_evaluator(self) -> Trainer | None:
        return None


def test_a_pool_client_compresses_its_upload_and_keeps_its_residual_across_rounds(tmp_path: Path) -> None:
    config = job(**TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    result = simulate(task, config, out_dir=tmp_path, pool=InlinePool(config, SteadyTrainers()))

    # One client, delta [1, 0.75] each round, top-1 of 2 with error feedback:
    # round 1: total [1, 0.75]   -> sends [1, 0],   residual [0, 0.75], w = [1, 0]
    # round 2: total [1, 1.5]    -> sends [0, 1.5], residual [1, 0],    w = [1, 1.5]
    # round 3: total [2, 0.75]   -> sends [2, 0],   residual [0, 0.75], w = [3, 1.5]
    # (without the residual kept between rounds the client would send [1, 0] three times: w = [3, 0]).
    assert result.params == ParamSet({"w": f32([3, 1.5])})
    assert [r["participants"] for r in result.history] == [1, 1, 1]


def test_a_pool_client_residual_is_stored_per_client_id(tmp_path: Path) -> None:
    config = job(**TOPK)

    simulate(Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers()), config, out_dir=tmp_path,
             pool=InlinePool(config, SteadyTrainers()))

    state = ClientStateStore(tmp_path / "clients").load(0)
    assert state is not None
    assert [np.asarray(v).tolist() for v in state.values()] == [[0.0, 0.75]]  # round 3's residual, above


def test_topk_in_the_pool_mode_ends_with_the_model_of_the_thread_mode(tmp_path: Path) -> None:
    config = job(workers=2, rounds=4, **TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=InlinePool(config, SteadyTrainers()))

    assert pooled.params.equal(threads.params)


def test_topk_in_pool_processes_ends_with_the_model_of_the_thread_mode(tmp_path: Path) -> None:
    config = job(workers=2, rounds=3, **TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pool = ProcessPool(config, SteadyTrainers(), processes=1)
    try:
        pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=pool)
    finally:
        pool.close()

    assert pooled.params.equal(threads.params)


OPTIONS = {
    # option: (job sections, whether both modes must end with the same bits: no randomness in the option)
    "central_dp": ({"privacy": {"dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.5}}}, False),
    "distributed_dp": ({"privacy": {"dp": {"enabled": True, "mode": "distributed", "clip_norm": 1.0,
                                           "noise_multiplier": 0.5}},
                        "round": {"min_updates": 2}}, False),
    "adaptive_clipping": ({"privacy": {"dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.5,
                                              "adaptive_clipping": {"enabled": True, "clipped_count_stddev": 0.5}}}},
                          False),
    "local_dp": ({"privacy": {"local_dp": {"enabled": True, "epsilon": 10.0, "clip_norm": 1.0}}}, False),
    "signds": ({"privacy": {"local_dp": {"enabled": True, "mechanism": "signds", "sparse_rate": 0.25}}}, False),
    "upload_quantization": ({"privacy": {"compression": {"upload": {"type": "quantize", "bits": 8}}}}, False),
    "topk_quantize": ({"privacy": {"compression": {"upload": {"type": "topk_quantize", "sparse_rate": 0.5}}}},
                      False),
    "download_quantization": ({"privacy": {"compression": {"download": {"type": "quantize"}}}}, True),
    "sparse_downloads": ({"transport": {"sparse_downloads": {"enabled": True, "max_diff_fraction": 1.0}}}, True),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_privacy_option_runs_in_both_simulation_modes(option: str, tmp_path: Path) -> None:
    sections, exact = OPTIONS[option]
    config = job(workers=2, rounds=2, **sections)
    # 1024 values in "emb": the least a download quantizes; it is a rank-2 table sparse downloads track.
    task = Task(ParamSet({"emb": np.zeros((512, 2), np.float32), "b": f32([0])}), AddTrainers())

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=InlinePool(config, AddTrainers()))

    for result in (threads, pooled):
        assert [r["participants"] for r in result.history] == [2, 2]
        assert all(np.isfinite(np.asarray(v)).all() for v in result.params.values())
    if exact:
        assert pooled.params.equal(threads.params)


SECAGG = {"privacy": {"secure_aggregation": {"enabled": True, "rounding": "deterministic", "clip_range": 8.0,
                                             "stage_timeout_s": 5}},
          "round": {"heartbeat_s": 0.5}}


def test_secure_aggregation_runs_in_the_thread_mode(tmp_path: Path) -> None:
    plain = job(workers=3, rounds=2)
    masked = job(workers=3, rounds=2, **SECAGG)
    task = Task(ParamSet({"w": f32([1, 2])}), AddTrainers())

    expected = simulate(task, plain, out_dir=tmp_path / "plain")
    result = simulate(task, masked, out_dir=tmp_path / "secagg")

    # Clients add 1, 2, 3 with 1, 2, 3 samples: the weighted mean delta is (1 + 4 + 9) / 6 = 7/3 per round,
    # w = [1 + 14/3, 2 + 14/3]; the masked sum is exact up to the fixed-point step 2 * 8 / 2^16 per value.
    assert [r["participants"] for r in result.history] == [3, 3]
    for name, value in result.params.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(expected.params[name]), atol=2 * 8.0 / 2**16)


def test_secure_aggregation_is_refused_at_the_start_of_the_pool_mode(tmp_path: Path) -> None:
    config = job(workers=3, **SECAGG)
    task = Task(ParamSet({"w": f32([1, 2])}), AddTrainers())

    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled.*--backend threads"):
        simulate(task, config, out_dir=tmp_path, pool=InlinePool(config, AddTrainers()))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_driver_refuses_a_secure_aggregation_job(tmp_path: Path) -> None:
    config = job(workers=3, **SECAGG)
    ps = build_server(config, Task(ParamSet({"w": f32([1, 2])}), AddTrainers()), out_dir=tmp_path)

    with pytest.raises(ConfigError, match=r"privacy\.secure_aggregation\.enabled"):
        Driver(ps, InlinePool(config, AddTrainers()), num_clients=3)
