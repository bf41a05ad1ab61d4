"""VGG-19 with batch norm, laid out exactly like torchvision's ``vgg19_bn`` (same state_dict keys).

Own definition, no torchvision import. As in torchvision (and BackdoorBench, which uses it), features are
pooled to 7x7 before the classifier; five max-pools need an input of at least 32 pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled

_CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in _CFG_E:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = scaled(int(v), width)
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    if image_size < 32:
        raise ValueError(f"vgg19_bn halves the image five times and needs image_size >= 32, got {image_size}")
    return VGG(num_classes=num_classes, in_channels=in_channels, width=width)
