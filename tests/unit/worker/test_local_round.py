"""The local round the worker runtime and the simulation share: its checks and what it puts back on failure."""

from __future__ import annotations

import pytest

from enclavefl.errors import ConfigError, ProtocolError
from enclavefl.messages import ClientSettings, UpdateKind
from enclavefl.tensors import ParamSet
from enclavefl.worker import UploadCompressor
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.local_round import check_settings, split_download, train_local_round
from enclavefl.worker.pipeline import Delta, UpdateContext, default_transforms
from tests.unit.worker.federation import AddTrainer, GradientTrainer, f32

SCAFFOLD = ClientSettings(epochs=1, batch_size=4, lr=0.5, algorithm="scaffold")


class Refuse:
    """A transform that refuses every update (a pipeline step that finds the update malformed)."""

    name = "refuse"
    produces = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        raise ValueError("refused")


def test_an_unknown_client_algorithm_is_refused() -> None:
    with pytest.raises(ProtocolError, match="'fednova'"):
        check_settings(ClientSettings(epochs=1, batch_size=4, lr=0.5, algorithm="fednova"), 1)


def test_a_scaffold_download_splits_into_the_model_and_the_server_variate() -> None:
    model, control = split_download(ParamSet({"w": f32([1]), "scaffold.c/w": f32([2])}), SCAFFOLD, 1)

    assert model == ParamSet({"w": f32([1])}) and control == ParamSet({"w": f32([2])})


def test_a_variate_goes_back_when_the_pipeline_refuses_the_update() -> None:
    # Two steps of lr 0.5 on g = 1 from x = 0 with c = c_i = 0 move y to -1; option II would set c_i = 1.
    trainer = GradientTrainer(ParamSet({"w": f32([1])}), 1, steps=2)
    variate = ScaffoldClient(ParamSet({"w": f32([0])}))

    with pytest.raises(ValueError, match="refused"):
        train_local_round(trainer, [*default_transforms(trainer), Refuse()], UploadCompressor(), SCAFFOLD, 1,
                          ParamSet({"w": f32([0])}), ParamSet({"w": f32([0])}), seed=0, variate=variate,
                          task_config={}, name="w0")

    assert variate.state() == ParamSet({"w": f32([0])})


def test_scaffold_without_the_control_delta_transform_names_the_missing_tensors() -> None:
    trainer = AddTrainer(1.0, 1)

    with pytest.raises(ConfigError, match=r"worker w0: .* left out \['scaffold.dc/w'\]"):
        train_local_round(trainer, [Delta()], UploadCompressor(), SCAFFOLD, 1, ParamSet({"w": f32([0])}),
                          ParamSet({"w": f32([0])}), seed=0, variate=ScaffoldClient(ParamSet({"w": f32([0])})),
                          task_config={}, name="w0")


def test_an_abandoned_round_leaves_the_variate_alone() -> None:
    trainer = AddTrainer(1.0, 1)
    variate = ScaffoldClient(ParamSet({"w": f32([0])}))

    local = train_local_round(trainer, default_transforms(trainer), UploadCompressor(), SCAFFOLD, 1,
                              ParamSet({"w": f32([0])}), ParamSet({"w": f32([0])}), seed=0, variate=variate,
                              task_config={}, name="w0", after_fit=lambda fit_s: True)

    assert local is None
    assert variate.state() == ParamSet({"w": f32([0])})
