"""The worker runtime against a real ParameterServer in one process (InMemoryClient), and a scripted one.

The federations here run the PS's real rounds, staging, aggregation and
SCAFFOLD server side; the trainers are tiny numpy ones whose every step can be
followed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ConfigError, ProtocolError
from enclavefl.messages import ClientSettings, UpdateKind
from enclavefl.server.checkpoint import load_checkpoint
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitConfig
from enclavefl.worker import Delta, UpdateContext
from tests.unit.worker.federation import (
    AddTrainer,
    GradientTrainer,
    ScriptedHandler,
    SparseAddTrainer,
    f32,
    job,
    run_federation,
    run_scripted,
)

INITIAL = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([0, 0])})


# -------------------------------------------------------------- FedAvg end to end


def test_two_workers_two_rounds_reach_the_hand_computed_model(tmp_path: Path) -> None:
    # Prepare: a adds 1 to every weight (1 sample), b adds 3 (3 samples).
    a, b = AddTrainer(1.0, 1), AddTrainer(3.0, 3)

    # Execute
    fed = run_federation(job(rounds=2), INITIAL.copy(), [("a", a), ("b", b)], tmp_path)

    # Assert: each round moves every weight by (1 * 1 + 3 * 3) / 4 = 2.5; two rounds: +5.
    assert fed.ps.params == ParamSet({"w": f32([[6, 7], [8, 9]]), "b": f32([5, 5])})
    round_1 = load_checkpoint(tmp_path / "checkpoints" / "round-000001.ckpt")
    assert round_1.params == ParamSet({"w": f32([[3.5, 4.5], [5.5, 6.5]]), "b": f32([2.5, 2.5])})
    assert [w.rounds_done for w in fed.workers] == [2, 2]
    assert [c.round for c in a.configs] == [1, 2]


def test_the_trainer_trains_with_the_ps_settings(tmp_path: Path) -> None:
    # Prepare: the PS's client section is the only source of local-training settings.
    client = {"epochs": 3, "batch_size": 8, "lr": 0.125, "optimizer": "adam", "momentum": 0.25, "weight_decay": 0.01}
    a = AddTrainer(1.0, 1)

    # Execute
    run_federation(job(rounds=1, workers=1, client=client), INITIAL.copy(), [("a", a)], tmp_path)

    # Assert: WorkerSettings gave only the seed (7); all else is the PS's.
    assert a.configs == [FitConfig(epochs=3, batch_size=8, lr=0.125, round=1, seed=7, proximal_mu=0.0,
                                   correction=None, optimizer="adam", momentum=0.25, weight_decay=0.01)]


def test_a_worker_built_from_a_stale_job_file_trains_as_the_ps_says(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from enclavefl.ml.datasets import ArrayDataset
    from enclavefl.ml.models import mlp
    from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer

    def trainer(optimizer: OptimizerSettings) -> TorchTrainer:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        x = rng.random((32, 4), dtype=np.float32)
        return TorchTrainer(mlp(4, (8,), 2), ArrayDataset(x, (x[:, 0] > 0.5).astype(np.int64)), optimizer=optimizer)

    # Prepare: the worker's (stale) job file said Adam; the PS says SGD with momentum and decay.
    stale = trainer(OptimizerSettings("adam"))
    initial = stale.get_parameters()
    client = {"epochs": 2, "batch_size": 8, "lr": 0.1, "optimizer": "sgd", "momentum": 0.5, "weight_decay": 0.01}

    # Execute
    fed = run_federation(job(rounds=1, workers=1, client=client), initial.copy(), [("a", stale)], tmp_path)

    # Assert: the PS's model is what a trainer built with the PS's settings reaches (one worker: x + delta).
    def reached(optimizer: OptimizerSettings) -> ParamSet:
        t = trainer(optimizer)
        t.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=1, seed=7))
        return t.get_parameters()

    expected = reached(OptimizerSettings("sgd", momentum=0.5, weight_decay=0.01))
    with_stale_settings = reached(OptimizerSettings("adam"))
    for name, value in fed.ps.params.items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=1e-6)
    assert max(float(np.abs(fed.ps.params[n] - with_stale_settings[n]).max()) for n in expected) > 1e-3


# -------------------------------------------------------------- FedProx


def test_fedprox_hands_the_ps_mu_to_the_trainer(tmp_path: Path) -> None:
    a = AddTrainer(1.0, 1)

    run_federation(job(rounds=1, workers=1, strategy={"name": "fedprox", "mu": 0.25}), INITIAL.copy(), [("a", a)],
                   tmp_path)

    assert [c.proximal_mu for c in a.configs] == [0.25]
    assert a.configs[0].correction is None


def test_fedavg_trains_without_a_proximal_term_even_if_settings_carry_mu() -> None:
    handler = ScriptedHandler(ClientSettings(1, 4, 0.5, algorithm="fedavg", proximal_mu=0.5), INITIAL)
    a = AddTrainer(1.0, 1)

    run_scripted(handler, a)

    assert [c.proximal_mu for c in a.configs] == [0.0]


# -------------------------------------------------------------- SCAFFOLD


SCAFFOLD_INITIAL = ParamSet({"w": f32([0, 0]), "b": f32([0])})
GRAD_A = ParamSet({"w": f32([1, 0]), "b": f32([2])})   # worker a, 1 sample
GRAD_B = ParamSet({"w": f32([0, 2]), "b": f32([-2])})  # worker b, 3 samples


def test_scaffold_two_rounds_end_to_end(tmp_path: Path) -> None:
    # Prepare: K = 2 local steps of lr 0.5 on constant gradients, so each round y = x - 1 * (g_i + c - c_i).
    a, b = GradientTrainer(GRAD_A, 1, steps=2), GradientTrainer(GRAD_B, 3, steps=2)
    config = job(rounds=2, strategy="scaffold", client={"epochs": 1, "batch_size": 4, "lr": 0.5})

    # Execute
    fed = run_federation(config, SCAFFOLD_INITIAL.copy(), [("a", a), ("b", b)], tmp_path)

    # Assert round 1, by hand. c = c_i = 0, so no correction; y_i = x - g_i.
    #   delta_a = (w [-1, 0], b [-2]), delta_b = (w [0, -2], b [2]); weighted (1, 3) mean:
    #   w [-1/4, -6/4] = [-0.25, -1.5], b (-2 + 6) / 4 = 1.
    #   Option II: c_i+ = c_i - c + (x - y_i) / (K * lr) = g_i, so delta c_i = g_i; weighted mean:
    #   w [1/4, 6/4] = [0.25, 1.5], b (2 - 6) / 4 = -1; |S| / N = 2 / 2, so c = that mean.
    round_1 = load_checkpoint(tmp_path / "checkpoints" / "round-000001.ckpt")
    assert round_1.params == ParamSet({"w": f32([-0.25, -1.5]), "b": f32([1])})
    assert round_1.parts["algorithm"].tensors == ParamSet({"scaffold.c/w": f32([0.25, 1.5]), "scaffold.c/b": f32([-1])})
    # Round 2: a's correction is c - c_a = (w [0.25 - 1, 1.5 - 0], b [-1 - 2]) = (w [-0.75, 1.5], b [-3]).
    assert a.configs[0].correction == ParamSet({"w": f32([0, 0]), "b": f32([0])})
    assert a.configs[1].correction == ParamSet({"w": f32([-0.75, 1.5]), "b": f32([-3])})
    assert b.configs[1].correction == ParamSet({"w": f32([0.25, -0.5]), "b": f32([1])})
    #   Each corrected gradient g_i + c - c_i is c itself, so both workers move by -c:
    #   x = (w [-0.25 - 0.25, -1.5 - 1.5], b [1 + 1]) = (w [-0.5, -3], b [2]); c_i+ = c_i, delta c_i = 0.
    assert fed.ps.params == ParamSet({"w": f32([-0.5, -3]), "b": f32([2])})
    assert fed.ps.strategy.algorithm.state().tensors == round_1.parts["algorithm"].tensors
    assert [w.rounds_done for w in fed.workers] == [2, 2]


def scaffold_settings() -> ClientSettings:
    return ClientSettings(epochs=1, batch_size=4, lr=0.5, algorithm="scaffold")


def with_control(model: ParamSet, control: ParamSet) -> ParamSet:
    return ParamSet([*model.items(), *((f"scaffold.c/{n}", v) for n, v in control.items())])


C = ParamSet({"w": f32([0.25, 1.5]), "b": f32([-1])})


def test_scaffold_pushes_the_model_delta_then_the_control_delta() -> None:
    # Prepare
    handler = ScriptedHandler(scaffold_settings(), with_control(SCAFFOLD_INITIAL, C))
    a = GradientTrainer(GRAD_A, 1, steps=2)

    # Execute
    run_scripted(handler, a)

    # Assert: correction c - 0 = c; y = x - (g + c) = (w [-1.25, -1.5], b [-1]);
    #   c_a+ = 0 - c + (g + c) = g, delta c_a = g = (w [1, 0], b [2]).
    ((meta, update),) = handler.pushed
    assert meta.kind is UpdateKind.DELTA
    assert update == ParamSet({"w": f32([-1.25, -1.5]), "b": f32([-1]),
                               "scaffold.dc/w": f32([1, 0]), "scaffold.dc/b": f32([2])})
    assert a.configs[0].correction == C
    assert a.params == ParamSet({"w": f32([-1.25, -1.5]), "b": f32([-1])})  # trained on the model alone


def test_scaffold_variate_persists_across_rounds_and_rejoins() -> None:
    # Prepare: the PS forgets the worker after round 1, so it joins again before round 2.
    handler = ScriptedHandler(scaffold_settings(), with_control(SCAFFOLD_INITIAL, C), rounds=2, forget_after_round=1)
    a = GradientTrainer(GRAD_A, 1, steps=2)

    # Execute
    run_scripted(handler, a)

    # Assert: after round 1 c_a = g_a, so round 2's correction is c - g_a = (w [-0.75, 1.5], b [-3]).
    assert handler.joins == 2
    assert [c.correction for c in a.configs] == [C, ParamSet({"w": f32([-0.75, 1.5]), "b": f32([-3])})]


def test_scaffold_variate_does_not_move_when_the_ps_refuses_the_update() -> None:
    handler = ScriptedHandler(scaffold_settings(), with_control(SCAFFOLD_INITIAL, C), rounds=2, refuse=1)
    a = GradientTrainer(GRAD_A, 1, steps=2)

    run_scripted(handler, a)

    # Round 1's delta c_a was not counted, so c_a is still 0 and round 2's correction is c again.
    assert [c.correction for c in a.configs] == [C, C]
    assert len(handler.pushed) == 1


@pytest.mark.parametrize(
    ("settings", "model", "message"),
    [
        (scaffold_settings(), SCAFFOLD_INITIAL, "the task runs SCAFFOLD but the model holds no scaffold.c/ tensors"),
        (scaffold_settings(), with_control(SCAFFOLD_INITIAL, ParamSet({"w": f32([0.25, 1.5])})),
         "server control variate lacks tensor 'b'"),
        (scaffold_settings(), with_control(SCAFFOLD_INITIAL, ParamSet({"w": f32([1, 2, 3]), "b": f32([0])})),
         r"server control variate 'w': shape \(3,\), expected \(2,\)"),
        (ClientSettings(1, 4, 0.5), with_control(SCAFFOLD_INITIAL, C),
         "the model holds scaffold.c/ tensors but the task runs fedavg"),
        (ClientSettings(1, 4, 0.5, algorithm="fedfoo"), SCAFFOLD_INITIAL,
         r"client algorithm 'fedfoo'; this worker runs \['fedavg', 'fedprox', 'scaffold'\]"),
    ],
    ids=["control-missing", "control-lacks-a-tensor", "control-wrong-shape", "control-without-scaffold",
         "unknown-algorithm"],
)
def test_worker_refuses_a_task_and_model_that_do_not_fit(settings: ClientSettings, model: ParamSet,
                                                           message: str) -> None:
    handler = ScriptedHandler(settings, model)
    a = GradientTrainer(GRAD_A, 1, steps=2)

    with pytest.raises(ProtocolError, match=message):
        run_scripted(handler, a)
    assert a.configs == [] and handler.pushed == []  # nothing trained, nothing sent


def test_scaffold_with_transforms_that_drop_the_control_delta_is_a_config_error() -> None:
    handler = ScriptedHandler(scaffold_settings(), with_control(SCAFFOLD_INITIAL, C))

    with pytest.raises(ConfigError, match=r"transforms \['delta'\] left out \['scaffold.dc/w', 'scaffold.dc/b'\]"):
        run_scripted(handler, GradientTrainer(GRAD_A, 1, steps=2), transforms=[Delta()])
    assert handler.pushed == []


# -------------------------------------------------------------- the update pipeline in the worker


def test_sparse_trainer_updates_travel_as_touched_rows_and_average_per_row(tmp_path: Path) -> None:
    # Prepare: a (+1, 1 sample) looks up rows 0 and 1 of emb, b (+3, 3 samples) rows 1 and 2.
    initial = ParamSet({"emb": np.zeros((4, 2), dtype=np.float32), "bias": f32([0])})
    a = SparseAddTrainer(1.0, 1, "emb", [0, 1])
    b = SparseAddTrainer(3.0, 3, "emb", [1, 2])

    # Execute
    fed = run_federation(job(rounds=1), initial, [("a", a), ("b", b)], tmp_path)

    # Assert: each row is averaged over the workers that sent it:
    #   row 0: a only -> 1; row 1: (1 * 1 + 3 * 3) / 4 = 2.5; row 2: b only -> 3; row 3: nobody -> 0.
    #   The dense bias: (1 * 1 + 3 * 3) / 4 = 2.5. Sent densely, rows 0 and 2 would be 0.25 and 2.25.
    assert fed.ps.params == ParamSet({"emb": f32([[1, 1], [2.5, 2.5], [3, 3], [0, 0]]), "bias": f32([2.5])})


@dataclass
class Scale:
    """Multiplies every tensor by ``factor`` and notes the order it ran in."""

    name: str
    factor: float
    log: list[str]
    produces: UpdateKind = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        self.log.append(self.name)
        return update.map(lambda a: np.asarray(a * a.dtype.type(self.factor)))


@dataclass
class Shift:
    name: str
    log: list[str]
    produces: UpdateKind = UpdateKind.QUANTIZED

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        self.log.append(self.name)
        return update.map(lambda a: np.asarray(a + a.dtype.type(1)))


def test_worker_runs_its_transforms_in_order_and_announces_the_last_kind() -> None:
    # Prepare
    log: list[str] = []
    handler = ScriptedHandler(ClientSettings(1, 4, 0.5), ParamSet({"w": f32([1, 2])}))

    # Execute: delta, then x2, then +1.
    run_scripted(handler, AddTrainer(3.0, 1), transforms=[Delta(), Scale("double", 2.0, log), Shift("plus-one", log)])

    # Assert: delta 3 -> 3 * 2 + 1 = 7 (the other order would give 8).
    ((meta, update),) = handler.pushed
    assert log == ["double", "plus-one"]
    assert update == ParamSet({"w": f32([7, 7])})
    assert meta.kind is UpdateKind.QUANTIZED


def test_sparse_trainer_gets_sparse_rows_by_default() -> None:
    handler = ScriptedHandler(ClientSettings(1, 4, 0.5), ParamSet({"emb": np.zeros((3, 1), dtype=np.float32)}))

    run_scripted(handler, SparseAddTrainer(2.0, 1, "emb", [2]))

    ((_, update),) = handler.pushed
    emb = update["emb"]
    assert isinstance(emb, SparseRows) and emb.ids.tolist() == [2] and emb.rows.tolist() == [[2.0]]
