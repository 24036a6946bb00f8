"""The seam between the federation and a machine-learning framework.

The core knows numpy, not torch: a :class:`Trainer` exchanges parameters as a
:class:`~enclavefl.tensors.ParamSet`, and a :class:`Task` says how to build the
model, the data of worker *i* of *n*, and the PS's held-out evaluation. PyTorch
lives behind these in :mod:`enclavefl.ml`; another framework is one more adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from enclavefl.tensors import ParamSet

__all__ = ["FitConfig", "FitResult", "Task", "Trainer"]


@dataclass(frozen=True, slots=True)
class FitConfig:
    """Local-training settings for one round (handed out by the PS).

    Attributes:
        epochs: passes over the local data.
        batch_size: samples per local optimizer step.
        lr: the local learning rate (SCAFFOLD's eta_l).
        round: the federation round; with ``seed`` it fixes the shuffle.
        seed: the job seed.
        proximal_mu: FedProx's mu (Li et al. 2020): the local objective gains
            ``mu / 2 * ||w - w_global||^2``, where ``w_global`` is the parameters
            at the start of ``fit``. 0 trains plain FedAvg.
        correction: a term added to every local gradient step, per parameter
            name as in ``get_parameters()`` (SCAFFOLD's ``c - c_i``). Tensors it
            does not name get no correction; None adds nothing.
        optimizer: the local optimizer's name (``sgd`` or ``adam``).
        momentum: the local optimizer's momentum (SGD's heavy ball).
        weight_decay: the local optimizer's L2 weight decay.

    ``optimizer``, ``momentum`` and ``weight_decay`` left at None keep the
    setting the trainer was built with, for callers outside a federation. In a
    federation the worker sets all three from the PS's task, so the PS alone
    decides how workers train, whatever their own job files say.
    """

    epochs: int
    batch_size: int
    lr: float
    round: int = 0
    seed: int = 0
    proximal_mu: float = 0.0
    correction: ParamSet | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True, slots=True)
class FitResult:
    """What local training produced, besides the new parameters.

    Attributes:
        num_samples: training examples behind the update (its FedAvg weight).
        metrics: ``loss``, ``accuracy`` and the like, over the local epochs.
        steps: local optimizer steps taken (K in SCAFFOLD's control-variate update).
    """

    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    steps: int = 0


@runtime_checkable
class Trainer(Protocol):
    """Trains and scores one model on one data set."""

    @property
    def num_samples(self) -> int:
        """Training examples this trainer holds."""
        ...

    def get_parameters(self) -> ParamSet: ...

    def set_parameters(self, params: ParamSet) -> None: ...

    def fit(self, config: FitConfig) -> FitResult:
        """Trains in place; metrics include ``loss`` and ``accuracy`` where they apply."""
        ...

    def evaluate(self) -> Mapping[str, float]:
        """Scores the current parameters on this trainer's evaluation data."""
        ...


class Task(Protocol):
    """A model and its data, split deterministically across ``num_workers``."""

    name: str

    def initial_parameters(self) -> ParamSet:
        """The global model before round 1 (the same on every node for a given seed)."""
        ...

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        """Worker ``index``'s trainer over its partition of the training data."""
        ...

    def server_evaluator(self) -> Trainer | None:
        """A trainer over held-out data that the PS scores each round, or None."""
        ...
