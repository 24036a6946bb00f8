"""Residual networks for 32x32 (CIFAR) and 28x28 (MNIST-like) images.

* :func:`resnet_cifar`: the CIFAR ResNets of depth 6n+2 (20, 32, 44, 56, 110)
  with 16-32-64 filters, v1 from He et al. 2016, "Deep Residual Learning for
  Image Recognition" (section 4.2), v2 (pre-activation: BN-ReLU-conv) from He
  et al. 2016, "Identity Mappings in Deep Residual Networks". Shortcuts where
  the shape changes are option A by default (the paper's CIFAR choice:
  subsample by 2 and zero-pad the new channels, no parameters; resnet20 has
  0.27M parameters); ``shortcut="B"`` uses a 1x1 convolution + BN instead.
* :func:`resnet18`: ImageNet's ResNet-18 (BasicBlock [2, 2, 2, 2], 64-512
  filters, 1x1-conv shortcuts) with the usual CIFAR stem: one 3x3 conv, stride
  1, no max-pool.

All take ``in_channels`` (1 for (Fashion-)MNIST, whose 28x28 inputs shrink to
7x7 in the last stage) and end in global average pooling, so any input at
least 8x8 works. Output: logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enclavefl.errors import ConfigError

__all__ = ["ResNet", "resnet18", "resnet20", "resnet32", "resnet56", "resnet_cifar"]


class _PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # (B, C, H, W) -> (B, C + extra, H, W), the new channels split before/after.
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _shortcut(in_planes: int, planes: int, stride: int, kind: str, with_bn: bool) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if kind == "A":
        return _PadShortcut(in_planes, planes, stride)
    conv = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(planes)) if with_bn else conv


class _BasicBlock(nn.Module):
    """v1 block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut, with_bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """v2 block: BN-ReLU-conv-BN-ReLU-conv, add the shortcut; no activation after."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.projects = shortcut == "B" and (stride != 1 or in_planes != planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        # A projection sees the pre-activated input (as in the paper's code);
        # identity and option A carry the raw x.
        skip: Tensor = self.shortcut(pre if self.projects else x)
        out: Tensor = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + skip


class ResNet(nn.Module):
    """Stem conv, stages of residual blocks, global average pool, linear classifier."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        preact: bool,
        shortcut: str,
    ) -> None:
        super().__init__()
        self.stem = _conv3x3(in_channels, widths[0])
        # v1 normalises the stem output; v2 defers BN-ReLU to the first block.
        self.stem_bn: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(widths[0])
        block = _PreActBlock if preact else _BasicBlock
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (count, planes) in enumerate(zip(blocks_per_stage, widths)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.stages = nn.Sequential(*layers)
        # v2 ends with the BN-ReLU that the last block left out.
        self.final_bn: nn.Module = nn.BatchNorm2d(in_planes) if preact else nn.Identity()
        self.preact = preact
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_bn(out))
        out = self.stages(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        # (B, C, H, W) -> (B, C)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits: Tensor = self.fc(out)
        return logits


def resnet_cifar(
    depth: int = 20, version: int = 1, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"
) -> ResNet:
    """CIFAR ResNet of ``depth`` = 6n+2 layers: 3 stages of n blocks, 16-32-64 filters.

    Args:
        depth: 20, 32, 44, 56, 110, ... (any 6n+2 with n >= 1).
        version: 1 (post-activation) or 2 (pre-activation).
        num_classes: classifier outputs.
        in_channels: 3 for CIFAR, 1 for (Fashion-)MNIST.
        shortcut: "A" (parameter-free, default) or "B" (1x1 conv) where the shape changes.

    Raises:
        ConfigError: a depth not of the form 6n+2, or a bad version/shortcut/size.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"resnet_cifar: depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}")
    if version not in (1, 2):
        raise ConfigError(f"resnet_cifar: version must be 1 or 2, got {version}")
    if shortcut not in ("A", "B"):
        raise ConfigError(f"resnet_cifar: shortcut must be 'A' or 'B', got {shortcut!r}")
    _check_sizes("resnet_cifar", num_classes, in_channels)
    n = (depth - 2) // 6
    return ResNet(
        (n, n, n), (16, 32, 64), num_classes=num_classes, in_channels=in_channels,
        preact=version == 2, shortcut=shortcut,
    )


def resnet20(num_classes: int = 10, in_channels: int = 3, version: int = 1) -> ResNet:
    """ResNet-20 (0.27M parameters), the reference CIFAR-10 workload."""
    return resnet_cifar(20, version, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3, version: int = 1) -> ResNet:
    """ResNet-32 (0.46M parameters)."""
    return resnet_cifar(32, version, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3, version: int = 1) -> ResNet:
    """ResNet-56 (0.85M parameters)."""
    return resnet_cifar(56, version, num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 with a CIFAR stem (11.2M parameters for 10 classes).

    Raises:
        ConfigError: ``num_classes`` or ``in_channels`` < 1.
    """
    _check_sizes("resnet18", num_classes, in_channels)
    return ResNet(
        (2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_channels=in_channels,
        preact=False, shortcut="B",
    )


def _check_sizes(name: str, num_classes: int, in_channels: int) -> None:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"{name}: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
