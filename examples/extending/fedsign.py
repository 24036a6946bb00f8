"""A new server optimizer in one class and one registry entry: the example of docs/extending.md.

FedSign moves every weight by ``lr`` in the direction of the sign of the
aggregated delta: the server half of signSGD with majority vote (Bernstein et
al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems"), here on
the weighted mean rather than on a vote.

Use it from a job file once this module is imported on the PS (name it as the
task, ``examples.extending.fedsign:digits_task``, or import it from yours)::

    server:
      optimizer: {name: fedsign, options: {min_step: 0.0}}
      lr: 0.01
"""

from __future__ import annotations

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.server.optimizer import ServerOptimizer, register_optimizer
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import Task


@register_optimizer
class FedSign(ServerOptimizer):
    """x += lr * sign(mean delta); coordinates whose |mean delta| is below ``min_step`` stay put."""

    name = "fedsign"

    def __init__(self, lr: float, *, min_step: float = 0.0) -> None:
        super().__init__(lr)
        if not min_step >= 0:
            raise ValueError(f"min_step must be >= 0, got {min_step}")
        self.min_step = min_step

    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        out = []
        for name, value in params.items():
            x = value.to_dense() if isinstance(value, SparseRows) else value
            d = mean_delta[name]
            d = d.to_dense() if isinstance(d, SparseRows) else d
            if x.dtype.kind != "f":
                out.append((name, x.copy()))  # counters and flags: left as they are
                continue
            move = np.where(np.abs(d) > self.min_step, np.sign(d), 0.0)
            out.append((name, np.asarray(x + self.lr * move, dtype=x.dtype)))
        return ParamSet(out)


def digits_task(config: JobConfig) -> Task:
    """The built-in digits task, from a module that also registers FedSign on import."""
    from enclavefl.ml.tasks import load_digits_task

    return load_digits_task(config)
