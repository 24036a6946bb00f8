"""What the workers run around local training, seen from the server.

An :class:`Algorithm` decides the settings each train task carries, what a
worker downloads besides the model and uploads besides its delta, and how the
aggregate of those uploads becomes the next model. FedAvg and FedProx (Li et
al. 2020, "Federated Optimization in Heterogeneous Networks") differ only in
the settings: FedProx's proximal term is applied on the worker. SCAFFOLD
(Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning") adds control variates: the server's variate ``c`` travels
with the model as ``scaffold.c/<param>`` tensors, each worker's change
``delta c_i`` travels with its delta as ``scaffold.dc/<param>``, and the server
updates ``c += |S| / N * mean(delta c_i)`` (their eq. 5, with the aggregator's
weights instead of the plain mean over S).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from enclavefl.config import ClientConfig
from enclavefl.errors import CheckpointError
from enclavefl.messages import CONTROL_DELTA_PREFIX, CONTROL_PREFIX, ClientSettings
from enclavefl.server.optimizer import ServerOptimizer
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet, SparseRows, StreamHeader, TensorSpec

__all__ = ["Algorithm", "CloseContext", "FedAvgAlgorithm", "Scaffold"]


@dataclass(frozen=True, slots=True)
class CloseContext:
    """What a close step may need to know about the round it closes."""

    round: int
    participants: int
    num_workers: int


def _settings(client: ClientConfig, algorithm: str, proximal_mu: float = 0.0) -> ClientSettings:
    return ClientSettings(
        epochs=client.epochs, batch_size=client.batch_size, lr=client.lr, optimizer=client.optimizer,
        momentum=client.momentum, weight_decay=client.weight_decay, algorithm=algorithm, proximal_mu=proximal_mu,
    )


class Algorithm(ABC):
    """The server side of a client algorithm. Implementations keep their state in state()/load_state()."""

    name: ClassVar[str]

    @abstractmethod
    def client_settings(self, client: ClientConfig, round_: int) -> ClientSettings:
        """The settings of round ``round_``'s train tasks."""

    def broadcast(self, params: ParamSet) -> ParamSet:
        """What a worker downloads: the model, plus whatever the algorithm adds."""
        return params

    def upload_template(self, model: StreamHeader) -> StreamHeader:
        """The header every update must match."""
        return model

    def apply(self, params: ParamSet, aggregate: ParamSet, optimizer: ServerOptimizer, context: CloseContext) -> ParamSet:
        """The next model from the current one and the round's aggregate (not mutating either)."""
        return optimizer.step(params, aggregate)

    def state(self) -> PartState:
        return PartState()

    def load_state(self, state: PartState) -> None:
        if state.meta or len(state.tensors):
            raise CheckpointError(f"algorithm {self.name} keeps no state, but the checkpoint holds some")


class FedAvgAlgorithm(Algorithm):
    """Plain local training (FedAvg), or with a proximal term ``mu`` (FedProx)."""

    name = "fedavg"

    def __init__(self, proximal_mu: float = 0.0) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def client_settings(self, client: ClientConfig, round_: int) -> ClientSettings:
        if self.proximal_mu > 0:
            return _settings(client, "fedprox", self.proximal_mu)
        return _settings(client, "fedavg")


def _float_specs(model: StreamHeader) -> list[TensorSpec]:
    return [s for s in model.tensors if s.dtype.startswith("float")]


class Scaffold(Algorithm):
    """SCAFFOLD, option II control variates; the server variate is part of the checkpoint."""

    name = "scaffold"

    def __init__(self, model: StreamHeader) -> None:
        self._specs = _float_specs(model)
        self._model_names = [s.name for s in model.tensors]
        self.control = ParamSet(
            (f"{CONTROL_PREFIX}{s.name}", np.zeros(s.shape, dtype=s.dtype)) for s in self._specs
        )

    def client_settings(self, client: ClientConfig, round_: int) -> ClientSettings:
        return _settings(client, "scaffold")

    def broadcast(self, params: ParamSet) -> ParamSet:
        return ParamSet([*params.items(), *self.control.items()])

    def upload_template(self, model: StreamHeader) -> StreamHeader:
        extra = [TensorSpec(f"{CONTROL_DELTA_PREFIX}{s.name}", s.dtype, s.shape) for s in self._specs]
        return StreamHeader((*model.tensors, *extra))

    def apply(self, params: ParamSet, aggregate: ParamSet, optimizer: ServerOptimizer, context: CloseContext) -> ParamSet:
        delta = ParamSet((name, aggregate[name]) for name in self._model_names)
        new_params = optimizer.step(params, delta)
        share = min(1.0, context.participants / max(context.num_workers, 1))
        updated = []
        for spec in self._specs:
            c = self.control[f"{CONTROL_PREFIX}{spec.name}"]
            dc = aggregate[f"{CONTROL_DELTA_PREFIX}{spec.name}"]
            dense = dc.to_dense() if isinstance(dc, SparseRows) else dc
            value = np.asarray(c, dtype=np.float64) + share * np.asarray(dense, dtype=np.float64)
            updated.append((f"{CONTROL_PREFIX}{spec.name}", np.asarray(value, dtype=spec.dtype)))
        self.control = ParamSet(updated)
        return new_params

    def state(self) -> PartState:
        return PartState({}, self.control)

    def load_state(self, state: PartState) -> None:
        reason = StreamHeader.of(state.tensors).matches(StreamHeader.of(self.control))
        if reason is not None:
            raise CheckpointError(f"SCAFFOLD control variate in the checkpoint does not fit the model: {reason}")
        self.control = state.tensors.copy()
