"""DLRM: the click-through-rate model of the reference recommendation workload.

Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization
and Recommendation Systems" (arXiv:1906.00091). Dense features go through a
bottom MLP to a vector of ``embedding_dim``; each categorical feature looks up
its own embedding table; the model takes the dot product of every pair of
these vectors (upper triangle, no self-products), appends the bottom MLP
output, and a top MLP maps that to the click probability.

Shapes (B = batch, F = 1 + number of tables, D = embedding_dim)::

    dense (B, 13) --bottom MLP--> (B, D) --+
    categorical (B, 26) --tables--> 26 x (B, D) --stack--> (B, F, D)
    (B, F, D) @ (B, D, F) -> (B, F, F) -> upper triangle (B, F(F-1)/2)
    concat with (B, D) --top MLP--> (B, 1) --sigmoid--> (B,)

Embedding tables are initialised uniform in ``±sqrt(1 / rows)`` as in the
reference implementation. With ``sparse_gradients`` (the reference's default
too) a backward pass yields gradients for the looked-up rows only, so an
optimizer step costs the batch's rows instead of whole tables: on Criteo-sized
tables that is most of the training time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from enclavefl.errors import ConfigError, DataError

__all__ = ["DLRM"]


def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM with dot interaction; ``forward(dense, categorical)`` returns click probabilities.

    Args (keyword-only):
        num_dense: dense features per sample (13 for Criteo).
        embedding_sizes: rows of each categorical feature's table (26 for Criteo).
        embedding_dim: width of every embedding (D).
        bottom_mlp: layer widths of the bottom MLP; the last must equal ``embedding_dim``.
        top_mlp: layer widths of the top MLP; the last must be 1.
        sparse_gradients: embedding tables produce sparse gradients (they then
            need an optimizer that accepts them: ``SparseAdam``, or ``SGD`` without weight decay).

    Raises:
        ConfigError: inconsistent sizes.
    """

    _pair_rows: Tensor
    _pair_cols: Tensor
    _table_rows: Tensor

    def __init__(
        self,
        *,
        num_dense: int = 13,
        embedding_sizes: Sequence[int],
        embedding_dim: int = 16,
        bottom_mlp: Sequence[int] = (64, 32, 16),
        top_mlp: Sequence[int] = (64, 32, 1),
        sparse_gradients: bool = False,
    ) -> None:
        super().__init__()
        if not embedding_sizes or any(rows < 1 for rows in embedding_sizes):
            raise ConfigError(f"DLRM: embedding_sizes must be non-empty positive row counts, got {list(embedding_sizes)}")
        if num_dense < 1 or embedding_dim < 1 or not bottom_mlp or not top_mlp:
            raise ConfigError("DLRM: num_dense, embedding_dim and both MLPs must be non-empty/positive")
        if bottom_mlp[-1] != embedding_dim:
            raise ConfigError(
                f"DLRM: the bottom MLP must end in embedding_dim={embedding_dim} for the dot "
                f"interaction, got {list(bottom_mlp)}"
            )
        if top_mlp[-1] != 1:
            raise ConfigError(f"DLRM: the top MLP must end in 1 output, got {list(top_mlp)}")
        if any(width < 1 for width in (*bottom_mlp, *top_mlp)):
            raise ConfigError("DLRM: MLP widths must be >= 1")
        self.num_dense = num_dense
        self.bottom = _mlp([num_dense, *bottom_mlp], last_relu=True)
        tables = [nn.Embedding(rows, embedding_dim, sparse=sparse_gradients) for rows in embedding_sizes]
        for table in tables:
            bound = (1.0 / table.num_embeddings) ** 0.5
            nn.init.uniform_(table.weight, -bound, bound)
        self.embeddings = nn.ModuleList(tables)
        features = 1 + len(embedding_sizes)
        rows, cols = torch.triu_indices(features, features, offset=1)
        self.register_buffer("_pair_rows", rows, persistent=False)
        self.register_buffer("_pair_cols", cols, persistent=False)
        self.register_buffer(
            "_table_rows", torch.tensor(list(embedding_sizes), dtype=torch.int64), persistent=False
        )
        interaction = features * (features - 1) // 2 + embedding_dim
        self.top = _mlp([interaction, *top_mlp], last_relu=False)

    def embedding_norm(self, categorical: Tensor) -> Tensor:
        """Sum of squared entries of the distinct rows ``categorical`` looks up, over all tables.

        A lazy L2 penalty for sparse tables: its gradient is sparse too, and
        touches each looked-up row once however often the batch repeats it.
        """
        total = categorical.new_zeros((), dtype=torch.float32)
        for j, table in enumerate(self.embeddings):
            total = total + table(torch.unique(categorical[:, j])).pow(2).sum()
        return total

    def forward(self, dense: Tensor, categorical: Tensor) -> Tensor:
        """Click probability per sample.

        Args:
            dense: float ``(B, num_dense)``.
            categorical: int64 ``(B, tables)``, column j in ``[0, embedding_sizes[j])``.

        Returns:
            Probabilities in (0, 1), shape ``(B,)``.

        Raises:
            DataError: wrong shapes or an index outside its table.
        """
        tables = len(self.embeddings)
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise DataError(f"DLRM: dense must be (B, {self.num_dense}), got {tuple(dense.shape)}")
        if categorical.shape != (dense.shape[0], tables) or categorical.dtype != torch.int64:
            raise DataError(
                f"DLRM: categorical must be int64 ({dense.shape[0]}, {tables}), "
                f"got {categorical.dtype} {tuple(categorical.shape)}"
            )
        if bool(((categorical < 0) | (categorical >= self._table_rows)).any()):
            raise DataError("DLRM: a categorical index lies outside its embedding table")
        bottom = self.bottom(dense)  # (B, D)
        vectors = [bottom] + [table(categorical[:, j]) for j, table in enumerate(self.embeddings)]
        stacked = torch.stack(vectors, dim=1)  # (B, F, D)
        products = torch.bmm(stacked, stacked.transpose(1, 2))  # (B, F, F)
        pairs = products[:, self._pair_rows, self._pair_cols]  # (B, F(F-1)/2)
        logits = self.top(torch.cat([bottom, pairs], dim=1))  # (B, 1)
        return torch.sigmoid(logits).squeeze(1)
