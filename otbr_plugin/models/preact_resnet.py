"""Pre-activation ResNet-18 (He et al. 2016) with BackdoorBench's module names.

The state_dict has exactly BackdoorBench's 102 entries (conv1, layer{1..4}.{0,1}.{bn1,conv1,bn2,conv2},
layer{2,3,4}.0.shortcut.0, linear) so its checkpoints load with ``strict=True``. Unlike BackdoorBench the
first conv takes 1 or 3 channels and all channel counts scale with ``width``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model, scaled


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, plus identity or 1x1-conv shortcut taken after the first BN-ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(planes[0], stride=1)
        self.layer2 = self._make_layer(planes[1], stride=2)
        self.layer3 = self._make_layer(planes[2], stride=2)
        self.layer4 = self._make_layer(planes[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes[3], num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register_model("preactresnet18")
def preactresnet18(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    return PreActResNet18(num_classes=num_classes, in_channels=in_channels, width=width)
