"""Secure aggregation through the real PS and worker runtimes, in one process (no gRPC).

The PS runs its rounds with the secure-aggregation stages; each worker reaches it
through an InMemoryClient that signs with the worker's own certificate key, so
every stage, the masked upload and the unmasking run the production code.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError, ProtocolError, RoundError, UpdateRejected
from enclavefl.messages import TaskInfo, TaskKind
from enclavefl.privacy.secagg.client import SecAggClient
from enclavefl.privacy.secagg.graph import neighbours_of
from enclavefl.privacy.secagg.identity import verify_with_certificate
from enclavefl.privacy.secagg.messages import KeyAdvert, Roster, RoundTag
from enclavefl.privacy.secagg.params import graph_seed
from enclavefl.privacy.secagg.stages import (
    MASKED_TENSOR,
    SecAggCall,
    flatten_update,
    masked_template,
    params_from_task,
    tag_from_task,
)
from enclavefl.server.ps import ParameterServer
from enclavefl.server.secagg import ModularSum, SecAggCoordinator
from enclavefl.server.strategy import build_strategy
from enclavefl.simulation.identity import SimulatedIdentity
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings

INITIAL = ParamSet({"w": np.asarray([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.asarray([0.0, 0.5], np.float32)})


class StepTrainer:
    """Adds ``step`` to every weight per fit; ``hang`` makes the fit block (a worker that dies mid-round)."""

    def __init__(self, step: float, num_samples: int, hang: threading.Event | None = None) -> None:
        self.step, self._num_samples, self.hang = step, num_samples, hang
        self.params = ParamSet()

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def get_parameters(self) -> ParamSet:
        return self.params.copy()

    def set_parameters(self, params: ParamSet) -> None:
        self.params = params.copy()

    def fit(self, config: FitConfig) -> FitResult:
        if self.hang is not None:
            self.hang.wait(30)
        self.params = self.params.map(lambda a: np.asarray(a + a.dtype.type(self.step)))
        return FitResult(self._num_samples, {"loss": 0.0}, steps=1)

    def evaluate(self) -> dict[str, float]:
        return {}


def secagg_job(*, workers: int, rounds: int = 1, window_s: float = 20, start_s: float = 20,
               dp: dict[str, Any] | None = None, **secagg: Any) -> JobConfig:
    return parse_job({
        "privacy": {"dp": dp or {}, "secure_aggregation": {"enabled": True, "rounding": "deterministic",
                                                           "clip_range": 4.0, "stage_timeout_s": 5, **secagg}},
        "job": {"rounds": rounds, "workers": workers},
        "round": {"min_workers": workers, "start_window_s": start_s, "update_window_s": window_s, "max_retries": 1,
                  "worker_timeout_s": 8, "heartbeat_s": 0.5},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "attestation": {"mode": "none"},
    })


def run(config: JobConfig, trainers: list[StepTrainer], out: Path, *, timeout_s: float = 60) -> ParameterServer:
    ps = ParameterServer(config, INITIAL, out_dir=out)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(target: Any, hung: bool = False) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported below (a hung worker may fail to rejoin: expected)
                if not hung:
                    errors.append(exc)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    threads = [guarded(ps.run)]
    for i, trainer in enumerate(trainers):
        who = SimulatedIdentity(i)
        worker = Worker(lambda who=who: InMemoryClient(ps, who.peer, chunk_bytes=64, secagg_signer=who.sign),
                        trainer, WorkerSettings(name=f"w{i}", poll_s=0.2), stop=stop)
        threads.append(guarded(worker.run, hung=trainer.hang is not None))
    threads[0].join(timeout_s)
    stop.set()
    for t in trainers:
        if t.hang is not None:
            t.hang.set()
    for thread in threads[1:]:
        thread.join(5)
    assert not threads[0].is_alive(), "the PS did not finish"
    assert not errors, errors
    return ps


def test_model_is_the_weighted_fedavg_of_the_workers(tmp_path: Path) -> None:
    # Steps 0.5, 1, -1, 0.25 with 1, 2, 3, 2 samples: the weighted mean delta is
    # (0.5 + 2 - 3 + 0.5) / 8 = 0.0 ... use 2, 2, 1, 3 instead: (1 + 2 - 1 + 0.75) / 8 = 0.34375.
    trainers = [StepTrainer(0.5, 2), StepTrainer(1.0, 2), StepTrainer(-1.0, 1), StepTrainer(0.25, 3)]
    ps = run(secagg_job(workers=4), trainers, tmp_path)
    step = 4.0 / (2**15 - 1)  # clip_range / L, deterministic rounding: error <= step / 2
    for name in ("w", "b"):
        np.testing.assert_allclose(ps.params[name], np.asarray(INITIAL[name]) + 0.34375, atol=step / 2 + 1e-6)
    row = ps.metrics.history[-1]
    assert row["participants"] == 4 and row["num_samples"] == 4  # each header claims 1: weights stay masked


def test_central_dp_noise_applies_to_the_unmasked_equal_weight_mean(tmp_path: Path) -> None:
    # DP-FedAvg weighs workers equally: steps 1, 2, 3 with 1, 5, 10 samples average to 2, not
    # (1 + 10 + 30) / 16. clip_norm 10 clips nothing (each update's norm is step * sqrt(6) <= 7.4)
    # and noise_multiplier 0 adds none, so the model moves by exactly the mean, within quantization.
    trainers = [StepTrainer(1.0, 1), StepTrainer(2.0, 5), StepTrainer(3.0, 10)]
    config = secagg_job(workers=3, dp={"enabled": True, "clip_norm": 10.0, "noise_multiplier": 0.0})
    ps = run(config, trainers, tmp_path)
    np.testing.assert_allclose(ps.params["w"], np.asarray(INITIAL["w"]) + 2.0, atol=4.0 / 32767)
    assert "dp_epsilon" in ps.metrics.history[-1]


def test_a_worker_lost_after_sharing_is_unmasked_from_its_shares(tmp_path: Path) -> None:
    # 5 workers, complete graph: 5 holders, t = ceil(0.67 * 5) = 4. Worker 4 never uploads:
    # the round closes by its window; the model is the mean of the four others' steps (1, 1, 1, 1) = 1.
    hang = threading.Event()
    trainers = [StepTrainer(1.0, 1) for _ in range(4)] + [StepTrainer(9.0, 1, hang=hang)]
    ps = run(secagg_job(workers=5, window_s=3), trainers, tmp_path)
    np.testing.assert_allclose(ps.params["b"], np.asarray(INITIAL["b"]) + 1.0, atol=1e-3)
    row = ps.metrics.history[-1]
    assert (row["participants"], row["secagg_survivors"], row["secagg_dropped"], row["secagg_threshold"]) == (4, 4, 1, 4)


def test_below_threshold_the_round_is_retried_and_nothing_is_unmasked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 4 workers: 4 holders, t = ceil(0.67 * 4) = 3; two hang, so 2 uploads < 3: the attempt
    # fails before any share is asked for and the round is retried (then the job fails: the
    # hung workers were dropped, so min_workers=4 never joins again in the 1 s start window).
    hang = threading.Event()
    trainers = [StepTrainer(1.0, 1), StepTrainer(1.0, 1), StepTrainer(1.0, 1, hang), StepTrainer(1.0, 1, hang)]
    ps = ParameterServer(secagg_job(workers=4, window_s=2, start_s=1), INITIAL, out_dir=tmp_path)
    stop = threading.Event()
    for i, trainer in enumerate(trainers):
        who = SimulatedIdentity(i)
        worker = Worker(lambda who=who: InMemoryClient(ps, who.peer, secagg_signer=who.sign), trainer,
                        WorkerSettings(name=f"w{i}", poll_s=0.2), stop=stop)

        def body(worker: Worker = worker) -> None:
            try:
                worker.run()
            except Exception:  # noqa: BLE001 - hung workers fail to rejoin a finished job: expected here
                pass

        threading.Thread(target=body, daemon=True).start()
    try:
        with pytest.raises(RoundError):
            ps.run()
    finally:
        stop.set()
        hang.set()
    assert "2 workers uploaded, threshold is 3: no mask is removed; retry 1" in caplog.text
    assert ps.version == 0 and ps.metrics.history == []


def test_modular_sum_wraps_and_refuses_other_shapes() -> None:
    template = masked_template(StreamHeader.of(ParamSet({"x": np.zeros(2, np.float32)})))
    total = ModularSum(template)
    total.add(ParamSet({MASKED_TENSOR: np.asarray([2**32 - 1, 5, 1], np.uint32)}), 1.0)
    total.add(ParamSet({MASKED_TENSOR: np.asarray([3, 2**32 - 5, 1], np.uint32)}), 7.0)
    assert total.result()[MASKED_TENSOR].tolist() == [2, 0, 2]  # (2**32 - 1 + 3) mod 2**32 = 2
    with pytest.raises(UpdateRejected, match="one uint32 tensor"):
        total.add(ParamSet({MASKED_TENSOR: np.zeros(3, np.float32)}), 1.0)


def test_flatten_and_unflatten_keep_the_template_order() -> None:
    update = ParamSet({"a": np.asarray([[1, 2]], np.float32), "n": np.asarray([3], np.int64)})
    assert flatten_update(update, StreamHeader.of(update)).tolist() == [1.0, 2.0, 3.0]


def test_flatten_keeps_one_float32_tensor_as_a_view_and_widens_mixed_dtypes() -> None:
    # Every float32 is exact in float64, so keeping float32 changes no encoded value; an int64
    # tensor next to it makes the flat vector float64.
    one = ParamSet({"a": np.asarray([[0.5, -1.0]], np.float32)})
    flat = flatten_update(one, StreamHeader.of(one))
    assert flat.dtype == np.float32 and np.shares_memory(flat, one["a"])
    mixed = ParamSet({"a": np.asarray([0.5], np.float32), "n": np.asarray([3], np.int64)})
    assert flatten_update(mixed, StreamHeader.of(mixed)).dtype == np.float64


def _opened_round(tmp_path: Path, n: int = 3) -> tuple[ParameterServer, list[SimulatedIdentity], TaskInfo, list[str]]:
    """A PS with a round open for ``n`` joined workers, and the train task they got."""
    ps = ParameterServer(secagg_job(workers=n), INITIAL, out_dir=tmp_path)
    who = [SimulatedIdentity(i) for i in range(n)]
    ids = [ps.join(w.peer, f"w{i}", 1).worker_id for i, w in enumerate(who)]
    thread = threading.Thread(target=ps.run, daemon=True)
    thread.start()
    task = ps.wait_task(who[0].peer, ids[0], 10)
    assert task.kind is TaskKind.TRAIN
    return ps, who, task, ids


def test_forged_key_advert_is_refused(tmp_path: Path) -> None:
    ps, who, task, ids = _opened_round(tmp_path)
    try:
        nonce = bytes.fromhex(str(task.config["secagg.nonce"]))
        advert = KeyAdvert(ids[0], b"\x01" * 32, b"\x02" * 32, b"not a signature")
        call = SecAggCall(ids[0], task.round, nonce, "advertise", advert=advert, certificate=who[0].certificate,
                          max_wait_s=0)
        with pytest.raises(ProtocolError, match="not signed by its attested key"):
            ps.secagg_exchange(who[0].peer, call)
        # Signed by worker 1's key but sent on worker 0's session: not the certificate bound at join.
        other = SecAggCall(ids[0], task.round, nonce, "advertise", advert=advert, certificate=who[1].certificate,
                           max_wait_s=0)
        with pytest.raises(ProtocolError, match="other than the one bound at its join"):
            ps.secagg_exchange(who[0].peer, other)
    finally:
        ps.stop()


def test_message_for_another_attempt_is_refused(tmp_path: Path) -> None:
    ps, who, task, ids = _opened_round(tmp_path)
    try:
        call = SecAggCall(ids[0], task.round, b"\x00" * 16, "advertise", poll=True, max_wait_s=0)
        with pytest.raises(RoundError, match="no open secure-aggregation attempt"):
            ps.secagg_exchange(who[0].peer, call)
    finally:
        ps.stop()


def test_a_worker_that_cannot_sign_its_keys_stops_with_a_config_error(tmp_path: Path) -> None:
    ps = ParameterServer(secagg_job(workers=3), INITIAL, out_dir=tmp_path)
    threading.Thread(target=ps.run, daemon=True).start()
    stop = threading.Event()
    signed = [SimulatedIdentity(0), SimulatedIdentity(1)]
    for i, who in enumerate(signed):
        worker = Worker(lambda who=who: InMemoryClient(ps, who.peer, secagg_signer=who.sign), StepTrainer(1.0, 1),
                        WorkerSettings(name=f"w{i}", poll_s=0.2), stop=stop)
        threading.Thread(target=worker.run, daemon=True).start()
    unsigned = Worker(lambda: InMemoryClient(ps, SimulatedIdentity(2).peer), StepTrainer(1.0, 1),
                      WorkerSettings(name="w2", poll_s=0.2), stop=stop)
    try:
        with pytest.raises(ConfigError, match="no key to sign secure-aggregation keys"):
            unsigned.run()
    finally:
        stop.set()
        ps.stop()


class RampTrainer(StepTrainer):
    """Adds a strongly structured ramp (linspace -2..2) to the weights: an update easy to recognise."""

    def fit(self, config: FitConfig) -> FitResult:
        self.params = self.params.map(lambda a: np.asarray(a + np.linspace(-2, 2, a.size, dtype=a.dtype).reshape(a.shape)))
        return FitResult(self._num_samples, {"loss": 0.0}, steps=1)


def test_what_the_ps_receives_from_one_worker_is_uniform_and_uncorrelated_with_its_update(tmp_path: Path) -> None:
    # Prepare: the PS's own aggregator, wrapped to keep the first masked upload it folds.
    initial = ParamSet({"w": np.zeros(64_000, np.float32)})
    config = secagg_job(workers=3)
    strategy = build_strategy(config, StreamHeader.of(initial), spill_dir=tmp_path / "spill")
    received: list[np.ndarray] = []

    class Recording(ModularSum):
        def add(self, update: ParamSet, weight: float) -> None:
            received.append(np.asarray(update[MASKED_TENSOR]).copy())
            super().add(update, weight)

    ps = ParameterServer(config, initial, out_dir=tmp_path, strategy=dataclasses.replace(strategy, aggregator=Recording))
    stop = threading.Event()
    workers = []
    for i in range(3):
        who = SimulatedIdentity(i)
        workers.append(Worker(lambda who=who: InMemoryClient(ps, who.peer, secagg_signer=who.sign),
                              RampTrainer(0.0, 1), WorkerSettings(name=f"w{i}", poll_s=0.2), stop=stop))
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        ps.run()
    finally:
        stop.set()

    # Assert: the model moved by the ramp (the sum was unmasked), but one upload looks like noise.
    ramp = np.linspace(-2, 2, 64_000)
    np.testing.assert_allclose(ps.params["w"], ramp, atol=8.0 / 32767)
    words = received[0][:-1]
    # Top 4 bits in 16 bins, 64k words: chi-square (15 dof) < 37.7 at p = 0.001.
    counts = np.bincount(words >> 28, minlength=16)
    assert float(np.sum((counts - 4000.0) ** 2 / 4000.0)) < 37.7
    # |r| < 4 / sqrt(64000) ~ 0.016: four standard errors.
    assert abs(np.corrcoef(words.astype(np.float64), ramp)[0, 1]) < 0.016


def test_the_roster_answer_carries_every_advert_but_only_the_askers_neighbours_certificates(tmp_path: Path) -> None:
    # 24 workers: 3 log2 n rounds to 14 neighbours, so the graph is not complete.
    n = 24
    ps, who, task, ids = _opened_round(tmp_path, n)
    try:
        found = params_from_task(task.config)
        assert found is not None
        params, tag = found[0], tag_from_task(task.round, task.config)
        k = params.degree(n)
        assert k < n - 1
        received: dict[str, bytes] = {}

        def verify(sender: str, payload: bytes, signature: bytes) -> bool:
            return sender in received and verify_with_certificate(received[sender], payload, signature)

        clients = [SecAggClient(ids[i], tag, params, lambda p, i=i: who[i].sign(p)[1], verify) for i in range(n)]
        for i, client in enumerate(clients):
            ps.secagg_exchange(who[i].peer, SecAggCall(ids[i], task.round, tag.nonce, "advertise",
                                                       advert=client.advertise(), certificate=who[i].certificate,
                                                       max_wait_s=0))
        answer = ps.secagg_exchange(who[0].peer, SecAggCall(ids[0], task.round, tag.nonce, "advertise", poll=True,
                                                            max_wait_s=5))
        assert answer.status == "ready" and len(answer.roster) == n
        mine = neighbours_of(sorted(ids), k, graph_seed(tag, answer.roster), ids[0])
        assert set(answer.certificates) == set(mine)
        assert all(answer.certificates[v] == who[ids.index(v)].certificate for v in mine)
        # An honest worker checks exactly these signatures, so the answer is enough for it to share.
        received.update(answer.certificates)
        assert len(clients[0].share(Roster(tag, answer.roster))) == k
    finally:
        ps.stop()


def test_an_advert_replayed_into_the_next_attempt_is_refused_though_its_key_is_known() -> None:
    # The PS keeps each certificate's key after its first check: the signature is still checked every time.
    config = secagg_job(workers=3).privacy.secure_aggregation
    coordinator = SecAggCoordinator(config, StreamHeader.of(INITIAL), equal_weights=False)
    who = SimulatedIdentity(0)
    ids = frozenset({"w0", "w1", "w2"})
    task = coordinator.open(1, 0, ids)
    first = bytes.fromhex(str(task["secagg.nonce"]))
    found = params_from_task(task)
    assert found is not None
    params = found[0]
    client = SecAggClient("w0", RoundTag(1, first), params, lambda p: who.sign(p)[1], lambda *_: False)
    advert = client.advertise()
    coordinator.exchange(who.peer, SecAggCall("w0", 1, first, "advertise", advert=advert,
                                              certificate=who.certificate, max_wait_s=0))

    second = bytes.fromhex(str(coordinator.open(1, 1, ids)["secagg.nonce"]))
    replay = SecAggCall("w0", 1, second, "advertise", advert=advert, certificate=who.certificate, max_wait_s=0)
    with pytest.raises(ProtocolError, match="not signed by its attested key"):
        coordinator.exchange(who.peer, replay)
