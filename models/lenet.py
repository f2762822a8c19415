"""LeNet-300-100 and LeNet-5 (Caffe variant), the classic pruning benchmarks."""

from __future__ import annotations

import math

from torch import Tensor, nn

from compressor.errors import CompressError
from ._shapes import image_shape


class LeNet300(nn.Module):
    """LeNet-300-100 MLP: 266,610 parameters for (1, 28, 28) inputs and 10 classes."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5 (20 and 50 5x5 filters, 500 hidden units).

    431,080 parameters for (1, 28, 28) inputs and 10 classes.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        h, w = _lenet5_feature_hw(height, width)
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


def _lenet5_feature_hw(height: int, width: int) -> tuple[int, int]:
    """Spatial size after conv5 -> pool2 -> conv5 -> pool2."""
    return ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2


# Smallest side whose feature map survives both conv/pool stages (>= 1 pixel).
LENET5_MIN_HW = 16


def build_lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-300-100 on any input; it is flattened first."""
    shape = tuple(input_shape)
    if not shape or any(int(d) < 1 for d in shape):
        raise CompressError(f"lenet300 needs an input shape of positive sizes; got {shape}")
    return LeNet300(math.prod(int(d) for d in shape), num_classes)


def build_lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 on a (C, H, W) image with H, W >= 16."""
    c, h, w = image_shape("lenet5", input_shape, LENET5_MIN_HW)
    return LeNet5(c, h, w, num_classes)
