"""ResNet-18 (He et al. 2016, post-activation basic blocks) with torchvision's module names.

Written from the architecture's description, no torchvision import. The state_dict has torchvision's 122
entries: ``conv1``, ``bn1`` (the stem), ``layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2}``,
``layer{2,3,4}.0.downsample.{0,1}`` (1x1 conv + BN projection) and ``fc``, so a torchvision ResNet-18 whose
classifier was replaced for K classes loads with ``strict=True``. BackdoorBench's ``resnet18`` is the same
network. Like the other zoo models, the first conv takes 1 or 3 channels and all channel counts scale with
``width``.

A block computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: every conv is followed by its own BN,
and the residual stream is the sum *after* the BNs.

``stem``: ``"imagenet"`` (torchvision's: 7x7 conv, stride 2, then 3x3 max-pool, stride 2; input shrinks 4x
before ``layer1``) or ``"cifar"`` (the usual small-input variant: 3x3 conv, stride 1, no max-pool). The stem
changes only the shape of ``conv1.weight``, never a key name.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .registry import register_model, scaled

__all__ = ["BasicBlock", "ResNet18", "STEMS"]

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, plus the identity or a 1x1-conv + BN projection (``downsample``), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 stem: Literal["imagenet", "cifar"] = "imagenet") -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"resnet18 stem must be one of {', '.join(STEMS)}, got {stem!r}")
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.in_planes = planes[0]
        self.layer1 = self._make_layer(planes[0], stride=1)
        self.layer2 = self._make_layer(planes[1], stride=2)
        self.layer3 = self._make_layer(planes[2], stride=2)
        self.layer4 = self._make_layer(planes[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3], num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: float,
             stem: Literal["imagenet", "cifar"] = "imagenet") -> nn.Module:
    """torchvision-named ResNet-18; ``stem="cifar"`` for small inputs (28-32 px)."""
    return ResNet18(num_classes=num_classes, in_channels=in_channels, width=width, stem=stem)
