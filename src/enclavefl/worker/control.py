"""SCAFFOLD's client control variate, option II.

SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML, arXiv:1910.06378) corrects client drift on
heterogeneous data with control variates: the server keeps ``c``, each client
keeps ``c_i``, both estimates of a gradient. One round on client ``i``:

1. Local steps follow ``y <- y - lr * (g_i(y) + c - c_i)`` (eq. 3; Algorithm 1,
   line 10). :meth:`ScaffoldClient.correction` returns ``c - c_i``; the trainer
   adds it to every local gradient (``FitConfig.correction``).
2. After ``K`` steps from the global model ``x`` to the local ``y``, option II
   of eq. 4 (line 12) sets ``c_i+ = c_i - c + (x - y) / (K * lr)``: the mean
   corrected gradient along the local path, minus the correction it contained.
   :meth:`ScaffoldClient.update` computes it, keeps it (line 14) and returns
   ``delta_c = c_i+ - c_i``, which travels with the model delta (line 13).
3. The server adds ``|S| / N`` times the mean ``delta_c`` to ``c`` (eq. 5,
   line 17); that is the server's side, not this module's.

Option II reads the gradient off the displacement, so it assumes plain SGD
with a constant learning rate locally: only then is ``(x - y) / (K * lr)``
exactly the mean of the corrected gradients. With heavy-ball momentum ``beta``
each gradient ends up moving the weights by up to ``1 / (1 - beta)`` times
``lr``, so ``c_i`` comes out inflated by about that factor, and the inflated
variate feeds back into the next round's correction. Adam divides each
coordinate by its running gradient scale, so the displacement is no longer
proportional to the gradient and ``c_i`` stops estimating one at all. Run
SCAFFOLD with ``client.optimizer: sgd`` and no momentum. Weight decay and a
FedProx term are part of every step's gradient, so they enter ``c_i``
consistently.

Only floating-point tensors have control variates; integer and bool tensors
(counters) are skipped. Everything here is numpy: the worker core imports no
torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import CheckpointError, ProtocolError
from enclavefl.tensors import ParamSet, SparseRows, Tensor

__all__ = ["ScaffoldClient"]

Array: TypeAlias = npt.NDArray[Any]


def _dense(value: Tensor) -> Array:
    return value.to_dense() if isinstance(value, SparseRows) else value


def _dense_shape_dtype(value: Tensor) -> tuple[tuple[int, ...], np.dtype[Any]]:
    if isinstance(value, SparseRows):
        return value.shape, value.rows.dtype
    return tuple(value.shape), value.dtype


def _quoted(name: str) -> str:
    """repr() of a tensor name cut to 80 characters: names from the network may be long."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


@final
class ScaffoldClient:
    """One worker's SCAFFOLD control variate ``c_i``, zero until the first :meth:`update`.

    ``c_i`` has the shape and dtype of each floating-point tensor of the model
    (float32 for float32 weights). Not thread-safe: one worker trains one round
    at a time.
    """

    __slots__ = ("_control", "_skipped")

    def __init__(self, model: ParamSet) -> None:
        """Start ``c_i`` at zero for every floating-point tensor of ``model``.

        Args:
            model: the model's parameters (``Trainer.get_parameters()``); only
                names, shapes and dtypes are read.
        """
        self._control: dict[str, Array] = {}
        skipped: list[str] = []
        for name, value in model.items():
            shape, dtype = _dense_shape_dtype(value)
            if dtype.kind == "f":
                self._control[name] = np.zeros(shape, dtype=dtype)
            else:
                skipped.append(name)
        self._skipped = frozenset(skipped)

    def correction(self, server_control: ParamSet) -> ParamSet:
        """``c - c_i`` per floating-point tensor: the term for ``FitConfig.correction``.

        Args:
            server_control: the server's variate ``c`` as received from the PS.

        Returns:
            One tensor per floating-point model tensor, in model order, in ``c_i``'s dtype.

        Raises:
            ProtocolError: ``server_control`` lacks a tensor, names one the model
                does not have, or has a wrong shape, a non-float dtype or a
                non-finite value.
        """
        c = self._server_control(server_control)
        return ParamSet(
            (name, np.asarray(np.subtract(c[name], ci, dtype=ci.dtype))) for name, ci in self._control.items()
        )

    def update(
        self, global_params: ParamSet, local_params: ParamSet, server_control: ParamSet, steps: int, lr: float
    ) -> ParamSet:
        """Option II: ``c_i+ = c_i - c + (x - y) / (K * lr)``; keep ``c_i+``, return ``c_i+ - c_i``.

        Args:
            global_params: ``x``, the model the round started from.
            local_params: ``y``, the model after local training.
            server_control: ``c``, the same server variate the round's correction used.
            steps: ``K``, the local optimizer steps (``FitResult.steps``).
            lr: the local learning rate of those steps (``FitConfig.lr``).

        Returns:
            ``delta_c`` per floating-point model tensor, in model order, in the tensor's dtype.
            On any error ``c_i`` is left unchanged.

        Raises:
            ValueError: ``steps`` is not an int >= 1, ``lr`` is not a finite number
                > 0, a parameter set lacks a tensor or has the wrong shape, or the
                new variate is not finite.
            ProtocolError: ``server_control`` is malformed (see :meth:`correction`).
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"SCAFFOLD needs steps >= 1 local steps, got {steps!r}")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"SCAFFOLD needs a finite local lr > 0, got {lr!r}")
        c = self._server_control(server_control)
        scale = 1.0 / (steps * float(lr))
        updated: dict[str, Array] = {}
        for name, ci in self._control.items():
            x = self._model_tensor(global_params, "global_params", name, ci.shape)
            y = self._model_tensor(local_params, "local_params", name, ci.shape)
            # float64 arithmetic, stored in the parameter's dtype.
            new = ci.astype(np.float64) - c[name] + (x.astype(np.float64) - y) * scale
            if not np.isfinite(new).all():
                raise ValueError(f"SCAFFOLD control variate {_quoted(name)} is not finite after this round")
            updated[name] = new.astype(ci.dtype)
        delta = ParamSet(
            (name, np.asarray(np.subtract(updated[name], ci, dtype=ci.dtype))) for name, ci in self._control.items()
        )
        self._control = updated
        return delta

    def state(self) -> ParamSet:
        """A copy of ``c_i`` to persist (see :meth:`load_state`)."""
        return ParamSet((name, ci.copy()) for name, ci in self._control.items())

    def load_state(self, state: ParamSet) -> None:
        """Replace ``c_i`` with a copy of ``state``, as written by :meth:`state`.

        Raises:
            CheckpointError: ``state`` lacks a tensor or has an extra one, or a
                tensor's shape or dtype differs from the model's, or a value is
                not finite. ``c_i`` is then unchanged.
        """
        missing = [name for name in self._control if name not in state]
        extra = [name for name in state if name not in self._control]
        if missing or extra:
            raise CheckpointError(
                f"SCAFFOLD client state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        loaded: dict[str, Array] = {}
        for name, ci in self._control.items():
            value = _dense(state[name])
            if value.shape != ci.shape or value.dtype != ci.dtype:
                raise CheckpointError(
                    f"SCAFFOLD client state {_quoted(name)}: {value.dtype}{value.shape}, "
                    f"model has {ci.dtype}{ci.shape}"
                )
            if not np.isfinite(value).all():
                raise CheckpointError(f"SCAFFOLD client state {_quoted(name)} holds a NaN or an infinity")
            loaded[name] = np.array(value, copy=True)
        self._control = loaded

    def _server_control(self, server_control: ParamSet) -> Mapping[str, Array]:
        """The server variate checked against the model, as float64 arrays.

        Raises:
            ProtocolError: see :meth:`correction`.
        """
        missing = [name for name in self._control if name not in server_control]
        if missing:
            raise ProtocolError(
                f"server control variate lacks tensor {_quoted(missing[0])}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        for name in server_control:
            if name not in self._control and name not in self._skipped:
                raise ProtocolError(
                    f"server control variate names tensor {_quoted(name)}, which the model does not have"
                )
        out: dict[str, Array] = {}
        for name, ci in self._control.items():
            value = _dense(server_control[name])
            if value.shape != ci.shape:
                raise ProtocolError(
                    f"server control variate {_quoted(name)}: shape {value.shape}, expected {ci.shape}"
                )
            if value.dtype.kind != "f":
                raise ProtocolError(
                    f"server control variate {_quoted(name)}: dtype {value.dtype}, expected a float dtype"
                )
            as_float = value.astype(np.float64)
            if not np.isfinite(as_float).all():
                raise ProtocolError(f"server control variate {_quoted(name)} holds a NaN or an infinity")
            out[name] = as_float
        return out

    @staticmethod
    def _model_tensor(params: ParamSet, what: str, name: str, shape: tuple[int, ...]) -> Array:
        if name not in params:
            raise ValueError(f"{what} lacks tensor {_quoted(name)}")
        value = _dense(params[name])
        if value.shape != shape:
            raise ValueError(f"{what} {_quoted(name)}: shape {value.shape}, expected {shape}")
        return value
