"""Server optimizers: turn the mean client delta into the next global model.

FedAvg (McMahan et al., 2017) is SGD with learning rate 1 on the mean delta;
adaptive optimizers (FedAdam, Reddi et al., 2021) slot in behind the same ABC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import numpy as np

from enclavefl.tensors import ParamSet, SparseRows

__all__ = ["SERVER_OPTIMIZERS", "FedAvg", "ServerOptimizer"]


class ServerOptimizer(ABC):
    """Produces version r+1 from version r and the aggregated delta. Must not mutate inputs."""

    @abstractmethod
    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        """Returns the new global parameters, with the same names, shapes and dtypes."""


class FedAvg(ServerOptimizer):
    """x_{r+1} = x_r + lr * mean_delta (lr = 1 is plain FedAvg)."""

    def __init__(self, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        self.lr = lr

    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        out: list[tuple[str, np.ndarray]] = []
        for name, value in params.items():
            if isinstance(value, SparseRows):
                value = value.to_dense()
            delta = mean_delta[name]
            if isinstance(delta, SparseRows):
                delta = delta.to_dense()
            if value.dtype.kind == "f":
                new = value + (delta * self.lr).astype(value.dtype, copy=False)
            else:
                new = (value + np.rint(delta * self.lr)).astype(value.dtype)
            out.append((name, np.asarray(new, dtype=value.dtype)))  # 0-d arithmetic yields scalars
        return ParamSet(out)


SERVER_OPTIMIZERS: Mapping[str, Callable[[float], ServerOptimizer]] = {"fedavg": FedAvg}
