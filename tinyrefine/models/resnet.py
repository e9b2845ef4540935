"""ResNet encoders (He et al. 2016) with torchvision's names and semantics (v1.5).

v1.5 puts a bottleneck's stride on its 3x3 conv, as torchvision does, so torchvision
weights load with no renaming. The encoder returns the four block outputs that
RefineNet refines: at 1/4, 1/8, 1/16 and 1/32 of the input resolution.
``replace_stride_with_dilation`` is torchvision's: three flags for layer2..layer4;
a flagged layer keeps stride 1 and multiplies the dilation by the stride it gave up
instead. As in torchvision, a dilated layer's first block keeps the previous
dilation and the others take the new one. ``[False, True, True]`` is output stride 8
(outputs at 1/4, 1/8, 1/8, 1/8; ``dilated=True`` is a shorthand for it),
``[False, False, True]`` output stride 16 (1/4, 1/8, 1/16, 1/16).
``multi_grid`` is DeepLabv3's (Chen et al. 2017, Sec. 3.2): layer4's blocks use the
layer's dilation times their unit rate, the first block included, so output stride
16 with (1, 2, 4) gives rates (2, 4, 8) in layer4.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..engine import Tensor
from ..nn import BatchNorm2d, Conv2d, MaxPool2d, Module, ReLU, Sequential
from .. import functional as F

DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
          101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}


class BasicBlock(Module):
    """Two 3x3 convs plus the identity (ResNet-18/34). out = relu(bn2(conv2(relu(bn1(conv1 x)))) + x)

    ``dilation`` dilates both 3x3 convs (torchvision refuses dilation in a BasicBlock; we allow it
    so that a small dilated ResNet-18 can serve as the output-stride-8 baseline)."""
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: Optional[Module] = None,
                 rng: Optional[np.random.Generator] = None, dilation: int = 1) -> None:
        self.conv1 = Conv2d(in_channels, channels, 3, stride, dilation, dilation, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(channels)
        self.relu = ReLU()
        self.conv2 = Conv2d(channels, channels, 3, 1, dilation, dilation, bias=False, rng=rng)
        self.bn2 = BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(F.add(self.bn2(self.conv2(out)), identity))


class Bottleneck(Module):
    """1x1 reduce, 3x3 (carrying the stride, v1.5), 1x1 expand by 4, plus the identity (ResNet-50+)."""
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: Optional[Module] = None,
                 rng: Optional[np.random.Generator] = None, dilation: int = 1) -> None:
        self.conv1 = Conv2d(in_channels, channels, 1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(channels)
        self.conv2 = Conv2d(channels, channels, 3, stride, dilation, dilation, bias=False, rng=rng)
        self.bn2 = BatchNorm2d(channels)
        self.conv3 = Conv2d(channels, channels * 4, 1, bias=False, rng=rng)
        self.bn3 = BatchNorm2d(channels * 4)
        self.relu = ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(F.add(self.bn3(self.conv3(out)), identity))


class ResNet(Module):
    """The convolutional trunk of a ResNet (no pooling head, no fc): image -> [c1, c2, c3, c4]."""

    def __init__(self, depth: int = 101, freeze_bn: bool = False, width: int = 64,
                 rng: Optional[np.random.Generator] = None, dilated: bool = False,
                 replace_stride_with_dilation: Optional[Sequence[bool]] = None,
                 multi_grid: Optional[Sequence[int]] = None) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        kind, counts = DEPTHS[depth]
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, True, True] if dilated else [False, False, False]
        elif dilated:
            raise ValueError("pass either dilated=True or replace_stride_with_dilation, not both")
        replace = [bool(flag) for flag in replace_stride_with_dilation]
        if len(replace) != 3:
            raise ValueError(f"replace_stride_with_dilation needs 3 flags (layer2, layer3, layer4), got {replace}")
        if multi_grid is not None:
            multi_grid = [int(rate) for rate in multi_grid]
            if len(multi_grid) != counts[3] or min(multi_grid) < 1:
                raise ValueError(f"multi_grid needs {counts[3]} positive unit rates (one per layer4 block of "
                                 f"ResNet-{depth}), got {multi_grid}")
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = Conv2d(3, width, 7, 2, 3, bias=False, rng=rng)           # (N, 64, H/2, W/2)
        self.bn1 = BatchNorm2d(width)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, 2, 1)                                      # (N, 64, H/4, W/4)
        in_channels, dilation, output_stride = width, 1, 4
        self.output_strides: List[int] = []
        for i, (count, stride) in enumerate(zip(counts, (1, 2, 2, 2))):
            channels = width * 2 ** i
            previous_dilation = dilation
            if i >= 1 and replace[i - 1]:  # trade the stride for dilation (torchvision's rule)
                dilation, stride = dilation * stride, 1
            output_stride *= stride
            self.output_strides.append(output_stride)
            # as torchvision: a layer's first block keeps the previous dilation, the others take the new one
            rates = [previous_dilation] + [dilation] * (count - 1)
            if i == 3 and multi_grid is not None:  # DeepLabv3: every layer4 block at rate x unit rate
                rates = [dilation * unit for unit in multi_grid]
            downsample = None
            if stride != 1 or in_channels != channels * block.expansion:
                downsample = Sequential(Conv2d(in_channels, channels * block.expansion, 1, stride, bias=False, rng=rng),
                                        BatchNorm2d(channels * block.expansion))
            blocks = [block(in_channels, channels, stride, downsample, rng=rng, dilation=rates[0])]
            in_channels = channels * block.expansion
            blocks += [block(in_channels, channels, rng=rng, dilation=rate) for rate in rates[1:]]
            setattr(self, f"layer{i + 1}", Sequential(*blocks))
        # channels of layer1..layer4: (64, 128, 256, 512) * expansion for width 64
        self.out_channels = [width * 2 ** i * block.expansion for i in range(4)]
        if freeze_bn:
            self.freeze_bn()

    def freeze_bn(self, frozen: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, BatchNorm2d):
                module.freeze(frozen)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)     # (N,  256, H/4,  W/4)  for a bottleneck ResNet
        c2 = self.layer2(c1)    # (N,  512, H/8,  W/8)
        c3 = self.layer3(c2)    # (N, 1024, H/16, W/16)
        c4 = self.layer4(c3)    # (N, 2048, H/32, W/32)
        return [c1, c2, c3, c4]
