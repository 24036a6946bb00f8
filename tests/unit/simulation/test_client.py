"""fit_client and ClientHost: one simulated client's round without a connection, on tiny hand-computed models."""

from __future__ import annotations

import numpy as np
import pytest

from enclavefl.config import parse_job
from enclavefl.errors import ProtocolError
from enclavefl.messages import ClientSettings, UpdateKind
from enclavefl.compression import decode_tensor
from enclavefl.simulation import ClientHost, ClientJob, fit_client
from enclavefl.simulation.client import pack_state, unpack_state
from enclavefl.tensors import EncodedUpdate, ParamSet
from enclavefl.worker.pipeline import default_transforms
from tests.unit.simulation.clients import CountingTrainers
from tests.unit.worker.federation import AddTrainer, GradientTrainer, f32

CONFIG = parse_job({"job": {"seed": 3}, "attestation": {"mode": "none"}})
FEDAVG = ClientSettings(epochs=1, batch_size=4, lr=0.5)
SCAFFOLD = ClientSettings(epochs=1, batch_size=4, lr=0.5, algorithm="scaffold")


def job(settings: ClientSettings = FEDAVG, state: ParamSet | None = None, index: int = 0) -> ClientJob:
    return ClientJob(index=index, num_clients=3, round=4, model_version=3, settings=settings, state=state)


def test_fit_client_returns_the_delta_of_local_training() -> None:
    trainer = AddTrainer(2.0, 5)

    outcome = fit_client(trainer, default_transforms(trainer), ParamSet({"w": f32([1, 2])}), job(), seed=3)

    # local = [1 + 2, 2 + 2]; delta = local - global = [2, 2]
    assert outcome.update == ParamSet({"w": f32([2, 2])})
    assert outcome.kind is UpdateKind.DELTA
    assert (outcome.round, outcome.model_version, outcome.num_samples) == (4, 3, 5)
    assert outcome.state is None
    assert "seconds_fit" in outcome.metrics
    assert trainer.configs[0].seed == 3 and trainer.configs[0].round == 4


def test_fit_client_refuses_an_unknown_algorithm() -> None:
    trainer = AddTrainer(1.0, 1)
    settings = ClientSettings(epochs=1, batch_size=4, lr=0.5, algorithm="fednova")

    with pytest.raises(ProtocolError, match="fednova"):
        fit_client(trainer, default_transforms(trainer), ParamSet({"w": f32([1])}), job(settings), seed=0)


def test_fit_client_refuses_scaffold_without_a_server_variate() -> None:
    trainer = AddTrainer(1.0, 1)

    with pytest.raises(ProtocolError, match="holds no scaffold.c/ tensors"):
        fit_client(trainer, default_transforms(trainer), ParamSet({"w": f32([1])}), job(SCAFFOLD), seed=0)


def test_scaffold_client_starts_from_its_stored_variate_and_returns_the_new_one() -> None:
    # K = 2 steps of lr 0.5 on the constant gradient g = 1, from x = 0, with c = 0 and the stored c_i = 3:
    #   each step moves by -lr * (g + c - c_i) = -0.5 * (1 - 3) = +1, so y = 2;
    #   option II: c_i+ = c_i - c + (x - y) / (K * lr) = 3 - 0 + (0 - 2) / 1 = 1; delta c_i = 1 - 3 = -2.
    trainer = GradientTrainer(ParamSet({"w": f32([1])}), 1, steps=2)
    download = ParamSet({"w": f32([0]), "scaffold.c/w": f32([0])})

    outcome = fit_client(trainer, default_transforms(trainer), download, job(SCAFFOLD, ParamSet({"w": f32([3])})),
                         seed=0)

    assert outcome.update == ParamSet({"w": f32([2]), "scaffold.dc/w": f32([-2])})
    assert outcome.state == ParamSet({"w": f32([1])})


def test_a_host_keeps_only_its_most_recent_trainers() -> None:
    factory = CountingTrainers()
    host = ClientHost(CONFIG, factory, trainers_kept=2)
    download = ParamSet({"w": f32([0])})

    for index in (0, 1, 0, 2, 1):  # 0 and 1 kept, 0 reused; 2 pushes 1 out; 1 is built again
        host.run(job(index=index), download)

    assert factory.built == [0, 1, 2, 1]


def test_a_host_needs_room_for_one_trainer() -> None:
    with pytest.raises(ValueError, match="trainers_kept"):
        ClientHost(CONFIG, CountingTrainers(), trainers_kept=0)


def test_a_client_trains_on_a_copy_of_nothing_it_may_not_change() -> None:
    download = ParamSet({"w": f32([1, 2])})
    trainer = AddTrainer(1.0, 1)

    fit_client(trainer, default_transforms(trainer), download, job(), seed=0)

    value = download["w"]
    assert isinstance(value, np.ndarray) and value.tolist() == [1, 2]


def test_fit_client_compresses_its_upload_with_the_residual_it_was_handed() -> None:
    # One step of lr 0.5 on the gradient [-2, -1] from w = [0, 0]: delta [1, 0.5]. With the stored residual
    # [0, 1] the total is [1, 1.5]; top-1 of 2 sends index 1 (1.5) and keeps [1, 0] as the new residual.
    trainer = GradientTrainer(ParamSet({"w": f32([-2, -1])}), 1, steps=1)
    stored = pack_state(None, {"w": f32([0, 1])})
    config = {"privacy.compression.upload.type": "topk", "privacy.compression.upload.sparse_rate": 0.5}
    client_job = ClientJob(index=0, num_clients=1, round=2, model_version=1, settings=FEDAVG, task_config=config,
                           state=stored)

    outcome = fit_client(trainer, default_transforms(trainer), ParamSet({"w": f32([0, 0])}), client_job, seed=0)

    assert outcome.kind is UpdateKind.QUANTIZED
    assert isinstance(outcome.update, EncodedUpdate)
    assert decode_tensor(outcome.update["w"]).tolist() == [0.0, 1.5]  # type: ignore[arg-type]
    variate, residual = unpack_state(outcome.state)
    assert variate is None and residual["w"].tolist() == [1.0, 0.0]
