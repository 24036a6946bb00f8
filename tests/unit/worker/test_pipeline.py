"""The update pipeline: Delta, SparsifyRows, ControlDelta and the runner that chains them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from enclavefl.messages import ClientSettings, UpdateKind
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitResult
from enclavefl.worker import (
    ClipUpdate,
    ControlDelta,
    Delta,
    DistributedNoise,
    LocalDp,
    SparseTrainer,
    SparsifyRows,
    UpdateContext,
    default_transforms,
    run_pipeline,
)
from tests.unit.worker.federation import AddTrainer, SparseAddTrainer, f32

SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)


def context(global_params: ParamSet, local_params: ParamSet, control_delta: ParamSet | None = None) -> UpdateContext:
    return UpdateContext(global_params, local_params, FitResult(4, steps=2), SETTINGS, 3, control_delta)


# -------------------------------------------------------------- Delta


def test_delta_is_local_minus_global_in_each_tensor_dtype() -> None:
    # Prepare
    old = ParamSet({"w": f32([1.5, -2.0]), "n": np.asarray([5, 7], dtype=np.int64), "t": np.asarray(3, dtype=np.int64)})
    new = ParamSet({"w": f32([2.0, -2.5]), "n": np.asarray([6, 4], dtype=np.int64), "t": np.asarray(10, dtype=np.int64)})

    # Execute
    out = Delta()(new, context(old, new))

    # Assert: [2 - 1.5, -2.5 + 2] = [0.5, -0.5]; [6 - 5, 4 - 7] = [1, -3]; 10 - 3 = 7 as a 0-d array.
    assert out == ParamSet({"w": f32([0.5, -0.5]), "n": np.asarray([1, -3], dtype=np.int64),
                            "t": np.asarray(7, dtype=np.int64)})
    assert isinstance(out["t"], np.ndarray) and out["t"].shape == ()


def test_delta_of_a_bool_tensor_is_all_false() -> None:
    old = ParamSet({"mask": np.asarray([True, False])})
    new = ParamSet({"mask": np.asarray([False, False])})

    out = Delta()(new, context(old, new))

    assert out == ParamSet({"mask": np.asarray([False, False])})


def test_delta_of_sparse_inputs_is_dense() -> None:
    old = ParamSet({"emb": SparseRows(np.asarray([1]), f32([[1, 1]]), (3, 2))})
    new = ParamSet({"emb": f32([[1, 2], [3, 4], [5, 6]])})

    out = Delta()(new, context(old, new))

    # old dense is [[0,0],[1,1],[0,0]]: delta [[1,2],[2,3],[5,6]].
    assert out == ParamSet({"emb": f32([[1, 2], [2, 3], [5, 6]])})


def test_delta_refuses_a_tensor_the_download_lacks() -> None:
    new = ParamSet({"w": f32([1]), "extra": f32([2])})

    with pytest.raises(ValueError, match=r"downloaded one lacks: \['extra'\]"):
        Delta()(new, context(ParamSet({"w": f32([0])}), new))


# -------------------------------------------------------------- SparsifyRows


def test_sparsify_rows_sends_the_rows_a_sparse_trainer_touched() -> None:
    # Prepare
    trainer = SparseAddTrainer(1.0, 4, "emb", [2, 0, 2])
    update = ParamSet({"emb": f32([[1, 1], [2, 2], [3, 3]]), "b": f32([9])})

    # Execute
    out = SparsifyRows(trainer)(update, context(update, update))

    # Assert: rows 0 and 2 (sorted, unique) of emb; b stays dense.
    emb = out["emb"]
    assert isinstance(emb, SparseRows) and emb.shape == (3, 2)
    assert emb.ids.tolist() == [0, 2] and emb.rows.tolist() == [[1, 1], [3, 3]]
    assert isinstance(out["b"], np.ndarray)
    assert SparsifyRows(trainer).produces is UpdateKind.DELTA


def test_sparsify_rows_refuses_rows_of_a_tensor_the_update_lacks() -> None:
    trainer = SparseAddTrainer(1.0, 4, "nope", [0])
    update = ParamSet({"emb": f32([[1, 1]])})

    with pytest.raises(ValueError, match=r"does not have: \['nope'\]"):
        SparsifyRows(trainer)(update, context(update, update))


def test_sparse_trainer_is_recognised_by_its_touched_rows_method() -> None:
    assert isinstance(SparseAddTrainer(1.0, 4, "emb", [0]), SparseTrainer)
    assert not isinstance(AddTrainer(1.0, 4), SparseTrainer)


def test_default_transforms_sparsify_only_for_a_sparse_trainer_and_clip_then_noise_last() -> None:
    dense = [type(t) for t in default_transforms(AddTrainer(1.0, 4))]
    sparse = [type(t) for t in default_transforms(SparseAddTrainer(1.0, 4, "emb", [0]))]

    assert dense == [Delta, ControlDelta, ClipUpdate, DistributedNoise, LocalDp]
    assert sparse == [Delta, SparsifyRows, ControlDelta, ClipUpdate, DistributedNoise, LocalDp]


# -------------------------------------------------------------- ControlDelta


def test_control_delta_appends_scaffold_tensors_after_the_model() -> None:
    update = ParamSet({"w": f32([1, 2]), "steps": np.asarray(4, dtype=np.int64), "b": f32([3])})
    dc = ParamSet({"w": f32([0.5, 0.25]), "b": f32([-1])})

    out = ControlDelta()(update, context(update, update, dc))

    assert list(out) == ["w", "steps", "b", "scaffold.dc/w", "scaffold.dc/b"]
    assert out["scaffold.dc/w"] is dc["w"] and out["w"] is update["w"]


def test_control_delta_passes_the_update_through_without_scaffold() -> None:
    update = ParamSet({"w": f32([1, 2])})

    assert ControlDelta()(update, context(update, update)) is update


def test_control_delta_refuses_an_update_that_already_has_control_tensors() -> None:
    update = ParamSet({"w": f32([1]), "scaffold.dc/w": f32([1])})

    with pytest.raises(ValueError, match="already holds control-variate tensors"):
        ControlDelta()(update, context(update, update, ParamSet({"w": f32([0])})))


# -------------------------------------------------------------- run_pipeline


@dataclass
class Step:
    """A transform that applies ``op`` to every tensor and notes that it ran."""

    name: str
    op: str
    log: list[str]
    produces: UpdateKind = UpdateKind.DELTA
    seen: list[UpdateContext] = field(default_factory=list)

    def __call__(self, update: ParamSet, ctx: UpdateContext) -> ParamSet:
        self.log.append(self.name)
        self.seen.append(ctx)
        return update.map(lambda a: a * 2 if self.op == "double" else a + 1)


def test_run_pipeline_runs_transforms_in_order() -> None:
    # Prepare
    log: list[str] = []
    local = ParamSet({"w": f32([1, 3])})
    ctx = context(ParamSet({"w": f32([0, 0])}), local)
    steps = [Step("double", "double", log), Step("add-one", "add", log, UpdateKind.QUANTIZED)]

    # Execute
    update, kind = run_pipeline(steps, ctx)

    # Assert: (w * 2) + 1 = [3, 7]; the other order would give [4, 8].
    assert log == ["double", "add-one"]
    assert update == ParamSet({"w": f32([3, 7])})
    assert kind is UpdateKind.QUANTIZED  # what the last step produces
    assert all(step.seen == [ctx] for step in steps)
    assert local == ParamSet({"w": f32([1, 3])})  # the trained parameters are not changed in place


def test_run_pipeline_without_transforms_sends_the_trained_weights() -> None:
    local = ParamSet({"w": f32([1, 3])})

    update, kind = run_pipeline([], context(ParamSet({"w": f32([0, 0])}), local))

    assert update is local and kind is UpdateKind.WEIGHTS


@dataclass
class Broken:
    name: str = "broken"
    produces: UpdateKind = UpdateKind.DELTA

    def __call__(self, update: ParamSet, ctx: UpdateContext) -> ParamSet:
        return dict(update)  # type: ignore[return-value]


def test_run_pipeline_refuses_a_transform_that_returns_no_paramset() -> None:
    local = ParamSet({"w": f32([1])})

    with pytest.raises(TypeError, match="'broken' returned dict, not a ParamSet"):
        run_pipeline([Broken()], context(local, local))


def test_default_pipeline_sends_delta_then_control_delta() -> None:
    # Prepare: w went 1 -> 3 and b 0 -> -1 locally; SCAFFOLD's delta c_i given.
    global_params = ParamSet({"w": f32([1, 1]), "b": f32([0])})
    local = ParamSet({"w": f32([3, 1]), "b": f32([-1])})
    dc = ParamSet({"w": f32([0.5, 0]), "b": f32([2])})

    # Execute
    update, kind = run_pipeline(default_transforms(AddTrainer(1.0, 4)), context(global_params, local, dc))

    # Assert
    assert update == ParamSet({"w": f32([2, 0]), "b": f32([-1]), "scaffold.dc/w": f32([0.5, 0]),
                               "scaffold.dc/b": f32([2])})
    assert kind is UpdateKind.DELTA

