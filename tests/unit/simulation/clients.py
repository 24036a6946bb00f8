"""Picklable client factories for the simulation tests (a pool process imports this module by name)."""

from __future__ import annotations

from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult, Trainer
from tests.unit.worker.federation import AddTrainer, GradientTrainer, f32

SCAFFOLD_INITIAL = ParamSet({"w": f32([0, 0]), "b": f32([0])})
GRADIENTS = [
    ParamSet({"w": f32([1, 0]), "b": f32([2])}),   # client 0, 1 sample
    ParamSet({"w": f32([0, 2]), "b": f32([-2])}),  # client 1, 3 samples
]


class AddTrainers:
    """Client ``i`` adds ``i + 1`` to every weight each round, with ``i + 1`` samples."""

    def __call__(self, index: int, num_clients: int) -> Trainer:
        return AddTrainer(float(index + 1), index + 1)


class GradientTrainers:
    """Client ``i``: two SGD steps on the constant gradient ``GRADIENTS[i]``, with 1 or 3 samples."""

    def __call__(self, index: int, num_clients: int) -> Trainer:
        return GradientTrainer(GRADIENTS[index], (1, 3)[index], steps=2)


class FailingTrainer(AddTrainer):
    def fit(self, config: FitConfig) -> FitResult:
        raise ValueError("this client's data is unreadable")


class FailingTrainers:
    """Client 1 fails to train; the others add 1."""

    def __call__(self, index: int, num_clients: int) -> Trainer:
        return FailingTrainer(1.0, 1) if index == 1 else AddTrainer(1.0, 1)


class CountingTrainers:
    """AddTrainers that record the trainers built (in the process that builds them)."""

    def __init__(self) -> None:
        self.built: list[int] = []
        self.trainers: list[AddTrainer] = []

    def __call__(self, index: int, num_clients: int) -> Trainer:
        self.built.append(index)
        self.trainers.append(AddTrainer(1.0, 1))
        return self.trainers[-1]


class SteadyTrainers:
    """Client ``i``: one SGD step (lr 0.5 from the job) on the constant gradient ``(i + 1) x [-2, -1.5]``, 1 sample.

    Its delta is ``(i + 1) x [1, 0.75]`` every round, so a top-k of one value out of two sends
    the first coordinate until the second one's error-feedback residual outgrows it.
    """

    def __call__(self, index: int, num_clients: int) -> Trainer:
        return GradientTrainer(ParamSet({"w": f32([-2.0 * (index + 1), -1.5 * (index + 1)])}), 1, steps=1)
