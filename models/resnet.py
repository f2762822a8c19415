"""CIFAR ResNet-32 (He et al. 2016, section 4.2)."""

from __future__ import annotations

from torch import Tensor, nn

from ._shapes import image_shape


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # Option-B projection: a real layer (prunable, fx-visible) instead of zero padding.
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet32(nn.Module):
    """ResNet-32 for CIFAR: 3 stages of 5 BasicBlocks (16/32/64 channels).

    Stage changes use option-B 1x1 conv+BN projection shortcuts rather than the
    paper's parameter-free zero padding (option A), which is why the count is
    ~0.47M instead of the paper's 0.46M: exactly 466,906 parameters for
    (3, 32, 32) inputs and 10 classes.
    """

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def build_resnet32(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-32 on any (C, H, W) image (global average pooling makes it size-agnostic)."""
    c, _, _ = image_shape("resnet32", input_shape)
    return ResNet32(c, num_classes)
