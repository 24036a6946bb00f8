"""LeNet-5 for 28x28 single-channel images (MNIST, Fashion-MNIST, FEMNIST).

LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition".
Kept from the paper: the layer sizes (C1 6@5x5, S2, C3 16@5x5, S4, C5 120,
F6 84, output) and padding 28x28 inputs by 2 so C1 sees the paper's 32x32.
Changed as is usual today: ReLU instead of scaled tanh, max instead of
trainable average pooling, C3 fully connected to S2 (the paper used a sparse
table), and a linear output giving logits instead of RBF units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enclavefl.errors import ConfigError

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """Input ``(B, C, S, S)`` with S = 32 - 2 * padding; output logits ``(B, num_classes)``."""

    def __init__(self, num_classes: int, in_channels: int, padding: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding)  # -> (B, 6, 28, 28)
        self.c3 = nn.Conv2d(6, 16, kernel_size=5)  # (B, 6, 14, 14) -> (B, 16, 10, 10)
        self.c5 = nn.Linear(16 * 5 * 5, 120)  # after S4: (B, 16, 5, 5) flattened
        self.f6 = nn.Linear(120, 84)
        self.out = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.c5(x))
        x = F.relu(self.f6(x))
        logits: Tensor = self.out(x)
        return logits


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> LeNet5:
    """LeNet-5 for ``image_size`` x ``image_size`` inputs (28: padded by 2; 32: unpadded).

    Raises:
        ConfigError: ``image_size`` not 28/30/32, or sizes < 1.
    """
    if image_size not in (28, 30, 32):
        raise ConfigError(f"lenet5: image_size must be 28, 30 or 32, got {image_size}")
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"lenet5: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
    return LeNet5(num_classes, in_channels, padding=(32 - image_size) // 2)
