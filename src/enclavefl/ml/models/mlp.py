"""A small multi-layer perceptron, for tabular data and tiny images (sklearn digits)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from enclavefl.errors import ConfigError

__all__ = ["mlp"]


def mlp(in_features: int, hidden: Sequence[int] = (64,), num_classes: int = 10) -> nn.Sequential:
    """Flatten, then Linear-ReLU per hidden width, then a linear layer giving logits.

    Input ``(B, ...)`` with ``in_features`` values per sample (an 8x8 digit as
    ``(B, 1, 8, 8)`` or ``(B, 64)``); output ``(B, num_classes)``.

    Raises:
        ConfigError: a size < 1.
    """
    sizes = [in_features, *hidden, num_classes]
    if any(s < 1 for s in sizes):
        raise ConfigError(f"mlp: every size must be >= 1, got in={in_features} hidden={list(hidden)} out={num_classes}")
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)
