"""PyTorch adapter: a :class:`~enclavefl.training.Trainer` around an ``nn.Module``.

Parameters cross the seam as numpy arrays in ``state_dict`` order, buffers
included (BatchNorm statistics travel with the weights, as FedAvg on a
BatchNorm model expects).

Two client algorithms change the local gradient, and both live in the shared
minibatch loop, between backward and the optimizer step:

* FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
  eq. 2) minimises ``F_k(w) + mu/2 * ||w - w_global||^2``; its gradient adds
  ``mu * (w - w_global)`` with ``w_global`` the parameters at the start of ``fit``.
* SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 line 10) steps along
  ``g(y) + c - c_i``; the worker computes ``c - c_i``
  (:class:`enclavefl.worker.control.ScaffoldClient`) and hands it over as
  :attr:`FitConfig.correction`.

Only trainable ``nn.Parameter`` tensors take these terms: buffers (BatchNorm
statistics) have no gradient. With ``proximal_mu == 0`` and no correction the
loop is the plain one, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from enclavefl.ml.datasets.arrays import ArrayDataset
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitConfig, FitResult

__all__ = ["PROGRESS_EVERY_S", "OptimizerSettings", "TorchTrainer"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""Local training longer than this logs a progress line this often (a ResNet epoch on a CPU takes minutes)."""


@dataclass(frozen=True, slots=True)
class OptimizerSettings:
    """The client optimizer a trainer is built with; a round's :class:`FitConfig` may override it."""

    name: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


_OPTIMIZER_NAMES: dict[str, Literal["sgd", "adam"]] = {"sgd": "sgd", "adam": "adam"}


class TorchTrainer:
    """Trains a classifier on an :class:`ArrayDataset` with cross-entropy."""

    def __init__(
        self,
        model: nn.Module,
        train: ArrayDataset | None,
        evaluation: ArrayDataset | None = None,
        *,
        optimizer: OptimizerSettings = OptimizerSettings(),
        eval_batch_size: int = 1024,
    ) -> None:
        self.model = model
        self._train = train
        self._eval = evaluation
        self._optimizer = optimizer
        self._eval_batch = eval_batch_size

    @property
    def num_samples(self) -> int:
        return 0 if self._train is None else len(self._train.y)

    def _exchanged(self) -> dict[str, torch.Tensor]:
        # BatchNorm's num_batches_tracked is a step counter, not a statistic: nothing to average.
        return {n: t for n, t in self.model.state_dict().items() if not n.endswith("num_batches_tracked")}

    def get_parameters(self) -> ParamSet:
        return ParamSet((name, t.detach().cpu().numpy().copy()) for name, t in self._exchanged().items())

    def set_parameters(self, params: ParamSet) -> None:
        state = self._exchanged()
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"parameters lack {missing[:5]}")
        with torch.no_grad():
            for name, target in state.items():
                value = params[name]
                array = value.to_dense() if isinstance(value, SparseRows) else value
                if tuple(array.shape) != tuple(target.shape):
                    raise ValueError(f"{name}: shape {array.shape} != model {tuple(target.shape)}")
                target.copy_(torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape)))

    def _optimizer_for(self, config: FitConfig) -> OptimizerSettings:
        """The optimizer one ``fit`` uses: ``config``'s settings where given, else the constructor's.

        In a federation the PS's settings arrive in ``config``; a trainer used
        alone keeps what it was built with.

        Raises:
            ValueError: ``config.optimizer`` is not ``sgd`` or ``adam``.
        """
        s = self._optimizer
        name = s.name if config.optimizer is None else _OPTIMIZER_NAMES.get(config.optimizer)
        if name is None:
            raise ValueError(f"FitConfig.optimizer must be one of {sorted(_OPTIMIZER_NAMES)}, got {config.optimizer!r}")
        return OptimizerSettings(
            name=name,
            momentum=s.momentum if config.momentum is None else config.momentum,
            weight_decay=s.weight_decay if config.weight_decay is None else config.weight_decay,
        )

    def _make_optimizer(self, lr: float, settings: OptimizerSettings | None = None) -> torch.optim.Optimizer:
        s = self._optimizer if settings is None else settings
        if s.name == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def fit(self, config: FitConfig) -> FitResult:
        if self._train is None or self.num_samples == 0:
            raise ValueError("this trainer has no training data")
        x = torch.from_numpy(self._train.x)
        y = torch.from_numpy(self._train.y)
        loss_fn = nn.CrossEntropyLoss()

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
            logits = self.model(x[idx])
            loss = loss_fn(logits, y[idx])
            return loss, loss, int((logits.detach().argmax(dim=1) == y[idx]).sum())

        optimizer = self._make_optimizer(config.lr, self._optimizer_for(config))
        return self._minibatch_loop(len(y), config, [optimizer], batch_loss)

    def _minibatch_loop(
        self,
        n: int,
        config: FitConfig,
        optimizers: Sequence[torch.optim.Optimizer],
        batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]],
    ) -> FitResult:
        """``config.epochs`` seeded shuffles of ``n`` samples in minibatches; the mean loss and accuracy.

        ``batch_loss(indices)`` returns (what to minimise, the loss to report, correct predictions).
        The shuffle depends on the job seed and the round only, so a run repeats exactly.
        ``config.proximal_mu`` and ``config.correction`` are added to each gradient before the step.

        Raises:
            ValueError: ``proximal_mu`` is negative or not finite; the correction names a
                tensor the model lacks, has the wrong shape or a non-finite value; or a
                parameter that should take a term has a sparse gradient (checked before the
                first step, so the model is unchanged).
        """
        terms = _GradientTerms.of(self.model, config)
        generator = torch.Generator().manual_seed(config.seed * 100_003 + config.round)
        self.model.train()
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        batches = -(-n // config.batch_size)
        reported = time.monotonic()
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            for batch, start in enumerate(range(0, n, config.batch_size), start=1):
                if time.monotonic() - reported >= PROGRESS_EVERY_S and seen:
                    reported = time.monotonic()
                    log.info("training round %d: epoch %d/%d, batch %d/%d, mean loss %.4f", config.round,
                             epoch + 1, config.epochs, batch, batches, total_loss / seen)
                idx = order[start : start + config.batch_size]
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                objective, loss, batch_correct = batch_loss(idx)
                torch.autograd.backward(objective)
                if terms is not None:
                    terms.add_to_gradients()
                for optimizer in optimizers:
                    optimizer.step()
                steps += 1
                total_loss += float(loss.detach()) * len(idx)
                correct += batch_correct
                seen += len(idx)
        loss_mean = total_loss / max(seen, 1)
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"local training diverged (loss {loss_mean}); lower client.lr")
        return FitResult(self.num_samples, {"loss": loss_mean, "accuracy": correct / max(seen, 1)}, steps=steps)

    def evaluate(self) -> Mapping[str, float]:
        if self._eval is None:
            return {}
        x = torch.from_numpy(self._eval.x)
        y = torch.from_numpy(self._eval.y)
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        self.model.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y), self._eval_batch):
                logits = self.model(x[start : start + self._eval_batch])
                yb = y[start : start + self._eval_batch]
                total += float(loss_fn(logits, yb))
                correct += int((logits.argmax(dim=1) == yb).sum())
        n = max(len(y), 1)
        return {"loss": total / n, "accuracy": correct / n}


_SPARSE_HINT = (
    "FedProx (proximal_mu) and SCAFFOLD (correction) need dense gradients; "
    "for the criteo-dlrm task set task.params.sparse_gradients: false"
)


@dataclass(frozen=True, slots=True, eq=False)
class _Term:
    name: str
    param: nn.Parameter
    anchor: torch.Tensor | None  # w_global, detached (FedProx)
    correction: torch.Tensor | None  # c - c_i in the parameter's dtype (SCAFFOLD)


@dataclass(frozen=True, slots=True, eq=False)
class _GradientTerms:
    """The per-parameter terms one ``fit`` adds to every local gradient."""

    mu: float
    terms: tuple[_Term, ...]

    @classmethod
    def of(cls, model: nn.Module, config: FitConfig) -> _GradientTerms | None:
        """The terms ``config`` asks for, or None when it asks for none (the plain loop).

        Raises:
            ValueError: see :meth:`TorchTrainer._minibatch_loop`.
        """
        mu = config.proximal_mu
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {mu!r}")
        if mu == 0 and config.correction is None:
            return None
        # state_dict names are get_parameters() names; named_parameters() holds the subset that trains.
        params = dict(model.named_parameters())
        corrections = {} if config.correction is None else _corrections(model, params, config.correction)
        terms = tuple(
            _Term(name, p, p.detach().clone() if mu > 0 else None, corrections.get(name))
            for name, p in params.items()
            if p.requires_grad and (mu > 0 or name in corrections)
        )
        return cls(mu, terms)

    def add_to_gradients(self) -> None:
        """``grad += mu * (w - w_global) + correction`` for each parameter that has a gradient.

        Raises:
            ValueError: a parameter's gradient is sparse.
        """
        with torch.no_grad():
            for term in self.terms:
                grad = term.param.grad
                if grad is None:
                    continue  # not used by this batch's loss: the optimizer skips it too
                if grad.is_sparse:
                    raise ValueError(f"parameter {term.name!r} has a sparse gradient: {_SPARSE_HINT}")
                if term.anchor is not None:
                    grad.add_(term.param - term.anchor, alpha=self.mu)
                if term.correction is not None:
                    grad.add_(term.correction)


def _corrections(
    model: nn.Module, params: Mapping[str, nn.Parameter], correction: ParamSet
) -> dict[str, torch.Tensor]:
    """``correction`` as torch tensors in each trainable parameter's dtype (buffers dropped)."""
    known = set(model.state_dict())
    unknown = [name for name in correction if name not in known]
    if unknown:
        raise ValueError(f"correction names tensors the model does not have: {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, value in correction.items():
        p = params.get(name)
        if p is None or not p.requires_grad:
            continue  # a buffer (BatchNorm statistics) or a frozen parameter takes no gradient step
        array = value.to_dense() if isinstance(value, SparseRows) else value
        if tuple(array.shape) != tuple(p.shape):
            raise ValueError(f"correction {name!r}: shape {tuple(array.shape)}, parameter has {tuple(p.shape)}")
        # np.array copies: a decoded ParamSet holds read-only views, which torch will not wrap.
        tensor = torch.from_numpy(np.array(array)).to(dtype=p.dtype, device=p.device)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"correction {name!r} holds a NaN or an infinity")
        out[name] = tensor
    return out
