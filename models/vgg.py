"""CIFAR VGG-16 with BatchNorm."""

from __future__ import annotations

from torch import Tensor, nn

from ._shapes import image_shape

_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


class VGG16(nn.Module):
    """VGG-16 (13 conv3x3+BN+ReLU layers, 5 max pools) with one Linear classifier.

    Convs keep their bias (as in the widely used CIFAR reference implementation) so
    the count matches the commonly cited 14.7M. Pools use ceil_mode so inputs smaller than 32x32 (e.g. 8x8) keep a 1x1 map
    instead of collapsing to zero; for even sizes this equals the usual pooling.
    Exactly 14,728,266 parameters for (3, 32, 32) inputs and 10 classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(channels, v, 3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def build_vgg16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-16-BN on any (C, H, W) image."""
    c, _, _ = image_shape("vgg16", input_shape)
    return VGG16(c, num_classes)
