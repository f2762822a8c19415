"""CIFAR-size MobileNetV2 (Sandler et al. 2018), width multiplier 1.0."""

from __future__ import annotations

from torch import Tensor, nn

from ._shapes import image_shape

# (expansion t, output channels c, repeats n, first stride s)
_CFG: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 1 instead of ImageNet's 2: 32x32 inputs are already small
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(in_ch, hidden, 1) + [nn.ReLU6()]
        layers += _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden) + [nn.ReLU6()]
        layers += _conv_bn(hidden, out_ch, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: first conv stride 1, 1280-wide head.

    Exactly 2,236,682 parameters for (3, 32, 32) inputs and 10 classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn(in_channels, 32, 3) + [nn.ReLU6()]
        channels = 32
        for t, c, n, s in _CFG:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers += _conv_bn(channels, 1280, 1) + [nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.fc(self.dropout(x))


def build_mobilenetv2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """MobileNetV2 on any (C, H, W) image."""
    c, _, _ = image_shape("mobilenetv2", input_shape)
    return MobileNetV2(c, num_classes)
