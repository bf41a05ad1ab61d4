"""A small, fast conv net for tests and smoke runs: conv-BN-ReLU x3 (two pools), global pool, linear."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = scaled(16, width), scaled(32, width), scaled(64, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.features(x)), 1))


@register_model("smallcnn")
def smallcnn(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
