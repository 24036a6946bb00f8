"""A :class:`~enclavefl.training.Trainer` for DLRM click prediction (binary objective).

Besides the Trainer protocol it reports, after each ``fit``, which embedding
rows the local data touched (:meth:`DlrmTrainer.touched_rows`). The worker sends
those tables as :class:`~enclavefl.tensors.SparseRows` (row ids, delta rows)
instead of dense tables: a worker of a Criteo job touches a small fraction of
each table per round, and the PS averages each row over the workers that
touched it.

Rows not touched by local data receive a zero gradient. With plain SGD or Adam
(a fresh optimizer per round) their delta is exactly zero, so the sparse upload
loses nothing; with ``weight_decay`` > 0 the decay of untouched rows is not
sent (it is not part of what the local data taught).

When the model's tables produce sparse gradients (``DLRM(sparse_gradients=True)``)
the tables get their own lazy optimizer (``SparseAdam`` for ``adam``, ``SGD``
for ``sgd``) that updates only the rows of each batch. torch has no sparse
weight decay, so ``weight_decay`` reaches the tables as a lazy L2 penalty,
``weight_decay / 2 * |row|^2`` over the distinct rows a batch looks up: the
same gradient a dense optimizer's decay gives those rows, and none for the rest
(the sparse upload stays exact).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from enclavefl.ml.datasets.criteo import CriteoData
from enclavefl.ml.models.dlrm import DLRM
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.training import FitConfig, FitResult

__all__ = ["DlrmTrainer", "binary_auc", "binary_log_loss"]

_EPS = 1e-7


def binary_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing their mean rank).

    Returns NaN when only one class is present (AUC is undefined then).
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"binary_auc: {y.shape[0]} labels but {s.shape[0]} scores")
    positives = int((y > 0.5).sum())
    negatives = int(y.size - positives)
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Average ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + ends + 1) / 2.0  # 1-based ranks start+1 .. end
    ranks[order] = np.repeat(mean_rank, ends - starts)
    rank_sum = float(ranks[y > 0.5].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def binary_log_loss(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Mean binary cross-entropy, probabilities clipped away from 0 and 1 (the Kaggle metric)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class DlrmTrainer(TorchTrainer):
    """Trains a :class:`DLRM` on :class:`CriteoData` with binary cross-entropy.

    Parameters cross the seam exactly as in :class:`TorchTrainer` (``state_dict``
    order); only the data, the loss and the metrics differ.
    """

    def __init__(
        self,
        model: DLRM,
        train: CriteoData | None,
        evaluation: CriteoData | None = None,
        *,
        optimizer: OptimizerSettings = OptimizerSettings(),
        eval_batch_size: int = 4096,
    ) -> None:
        super().__init__(model, None, None, optimizer=optimizer, eval_batch_size=eval_batch_size)
        for name, data in (("train", train), ("evaluation", evaluation)):
            if data is not None and data.labels is None:
                raise ValueError(f"DlrmTrainer: {name} data has no labels (Kaggle test format)")
        self.dlrm = model
        self._criteo_train = train
        self._criteo_eval = evaluation
        self._touched: dict[str, npt.NDArray[np.int64]] = {}

    @property
    def num_samples(self) -> int:
        return 0 if self._criteo_train is None else len(self._criteo_train)

    @property
    def sparse_tensors(self) -> tuple[str, ...]:
        """Names of the embedding tables, the tensors that travel row-sparse."""
        return tuple(f"embeddings.{j}.weight" for j in range(len(self.dlrm.embeddings)))

    def touched_rows(self) -> Mapping[str, npt.NDArray[np.int64]]:
        """Row ids of each embedding table that the last :meth:`fit` looked up (sorted, unique)."""
        return dict(self._touched)

    @property
    def _sparse_tables(self) -> bool:
        return any(isinstance(t, nn.Embedding) and t.sparse for t in self.dlrm.embeddings)

    def _make_optimizers(self, lr: float, s: OptimizerSettings) -> list[torch.optim.Optimizer]:
        if not self._sparse_tables:
            return [self._make_optimizer(lr, s)]
        tables = list(self.dlrm.embeddings.parameters())
        table_ids = {id(t) for t in tables}
        mlps = [p for p in self.dlrm.parameters() if id(p) not in table_ids]
        # The tables' weight decay is the lazy penalty in fit(), not the optimizer's.
        if s.name == "adam":
            return [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(mlps, lr=lr, weight_decay=s.weight_decay)]
        return [
            torch.optim.SGD(tables, lr=lr, momentum=s.momentum),
            torch.optim.SGD(mlps, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay),
        ]

    def fit(self, config: FitConfig) -> FitResult:
        data = self._criteo_train
        if data is None or len(data) == 0:
            raise ValueError("this trainer has no training data")
        assert data.labels is not None  # checked in __init__
        dense = torch.from_numpy(data.dense)
        categorical = torch.from_numpy(data.categorical)
        labels = torch.from_numpy(data.labels)
        settings = self._optimizer_for(config)
        lazy_decay = settings.weight_decay if self._sparse_tables else 0.0
        loss_fn = nn.BCELoss()

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
            yb = labels[idx]
            prob = self.dlrm(dense[idx], categorical[idx]).clamp(_EPS, 1 - _EPS)
            loss = loss_fn(prob, yb)
            objective = loss + 0.5 * lazy_decay * self.dlrm.embedding_norm(categorical[idx]) if lazy_decay else loss
            return objective, loss, int(((prob.detach() > 0.5).float() == yb).sum())

        result = self._minibatch_loop(len(labels), config, self._make_optimizers(config.lr, settings), batch_loss)
        # Every epoch visits every local sample, so the touched rows are the data's ids.
        self._touched = {
            name: np.unique(data.categorical[:, j]).astype(np.int64) for j, name in enumerate(self.sparse_tensors)
        }
        return result

    def predict(self, data: CriteoData) -> npt.NDArray[np.float32]:
        """Click probabilities for ``data`` (labels not needed: works on the test format)."""
        self.model.eval()
        out: list[npt.NDArray[np.float32]] = []
        with torch.no_grad():
            for start in range(0, len(data), self._eval_batch):
                stop = start + self._eval_batch
                prob = self.dlrm(torch.from_numpy(data.dense[start:stop]), torch.from_numpy(data.categorical[start:stop]))
                out.append(prob.numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def evaluate(self) -> Mapping[str, float]:
        data = self._criteo_eval
        if data is None or data.labels is None or len(data) == 0:
            return {}
        prob = np.clip(self.predict(data).astype(np.float64), _EPS, 1 - _EPS)
        y = data.labels.astype(np.float64)
        accuracy = float(np.mean((prob > 0.5) == (y > 0.5)))
        return {"loss": binary_log_loss(y, prob), "accuracy": accuracy, "auc": binary_auc(y, prob)}
