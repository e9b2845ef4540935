"""DeepLabv3 (Chen et al. 2017, "Rethinking Atrous Convolution") with torchvision's names.

The network is an atrous ResNet followed by ASPP (atrous spatial pyramid pooling): a 1x1
conv, three 3x3 convs at rates (12, 24, 36) and an image-level branch (global average
pool, 1x1 conv, upsampled back), each with BN and ReLU, concatenated and projected to 256
channels. A 3x3 conv and a 1x1 classifier follow, and the logits are upsampled (bilinear)
to the input size. The paper's Sec. 3 describes the blocks; the layout, the names and the
defaults (output stride 8, rates 12/24/36, dropout 0.5 after the projection, an FCN aux
head on layer3) are torchvision's ``deeplabv3_resnet50/101``, so its state dicts
(``backbone.*``, ``classifier.*``, ``aux_classifier.*``) load unchanged. The paper's own
setting (output stride 16, rates 6/12/18, multi-grid (1, 2, 4) in block4) is an option.

    backbone (ResNet, output stride 8)  (N, 2048, H/8, W/8)
    classifier.0  ASPP                  (N,  256, H/8, W/8)
    classifier.1-3 3x3 conv, BN, ReLU   (N,  256, H/8, W/8)
    classifier.4  1x1 conv              (N,    C, H/8, W/8)  -> bilinear to (N, C, H, W)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .. import functional as F
from ..engine import Tensor
from ..nn import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Module, ModuleList, ReLU, Sequential
from .refinenet import ENCODERS
from .resnet import ResNet

# DeepLabv3, Sec. 3.3: the ASPP rates are doubled when the output stride halves
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
DILATION = {8: [False, True, True], 16: [False, False, True]}


class ASPPConv(Sequential):
    """One atrous branch: 3x3 conv at ``rate`` (padding = rate keeps the size), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rate: int, rng: Optional[np.random.Generator] = None):
        super().__init__(Conv2d(in_channels, out_channels, 3, 1, rate, rate, bias=False, rng=rng),
                         BatchNorm2d(out_channels), ReLU())


class ASPPPooling(Sequential):
    """Image-level features (DeepLabv3, Sec. 3.3): global average pool, 1x1 conv, BN, ReLU, and
    bilinear upsampling of the 1x1 map back to the input's size (every pixel gets the same vector)."""

    def __init__(self, in_channels: int, out_channels: int, rng: Optional[np.random.Generator] = None):
        super().__init__(AdaptiveAvgPool2d(1), Conv2d(in_channels, out_channels, 1, bias=False, rng=rng),
                         BatchNorm2d(out_channels), ReLU())

    def forward(self, x: Tensor) -> Tensor:
        pooled = super().forward(x)                                            # (N, 256, 1, 1)
        return F.interpolate(pooled, size=x.shape[2:], align_corners=False)    # (N, 256, H, W)


class ASPP(Module):
    """Atrous spatial pyramid pooling: [1x1, 3x3 at each rate, image pooling] -> concat -> 1x1 projection."""

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256,
                 rng: Optional[np.random.Generator] = None, dropout_rng: Optional[np.random.Generator] = None) -> None:
        branches = [Sequential(Conv2d(in_channels, out_channels, 1, bias=False, rng=rng),
                               BatchNorm2d(out_channels), ReLU())]
        branches += [ASPPConv(in_channels, out_channels, rate, rng=rng) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels, rng=rng))
        self.convs = ModuleList(branches)
        # (N, 256 * 5, H, W) -> (N, 256, H, W); the dropout is torchvision's
        self.project = Sequential(Conv2d(len(branches) * out_channels, out_channels, 1, bias=False, rng=rng),
                                  BatchNorm2d(out_channels), ReLU(), Dropout(0.5, dropout_rng))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(F.concat([branch(x) for branch in self.convs], axis=1))


class DeepLabHead(Sequential):
    """ASPP, then a 3x3 conv + BN + ReLU and the 1x1 classifier (torchvision's DeepLabHead)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 24, 36),
                 channels: int = 256, rng: Optional[np.random.Generator] = None,
                 dropout_rng: Optional[np.random.Generator] = None) -> None:
        super().__init__(ASPP(in_channels, rates, channels, rng=rng, dropout_rng=dropout_rng),
                         Conv2d(channels, channels, 3, 1, 1, bias=False, rng=rng), BatchNorm2d(channels), ReLU(),
                         Conv2d(channels, num_classes, 1, rng=rng))


class FCNHead(Sequential):
    """3x3 conv to in/4 channels + BN + ReLU + Dropout(0.1) + 1x1 classifier (torchvision's FCNHead;
    used as the FCN's classifier and as both networks' auxiliary head on layer3)."""

    def __init__(self, in_channels: int, num_classes: int, rng: Optional[np.random.Generator] = None,
                 dropout_rng: Optional[np.random.Generator] = None) -> None:
        inter = in_channels // 4
        super().__init__(Conv2d(in_channels, inter, 3, 1, 1, bias=False, rng=rng), BatchNorm2d(inter), ReLU(),
                         Dropout(0.1, dropout_rng), Conv2d(inter, num_classes, 1, rng=rng))


class SegmentationModel(Module):
    """backbone + classifier (+ aux_classifier): what torchvision's DeepLabV3 and FCN share.

    ``model(x)`` returns the main logits (N, C, H, W); ``forward_with_aux(x)`` returns
    (main, aux) from one pass through the backbone (aux from layer3, for the auxiliary loss)."""

    backbone: ResNet
    classifier: Module
    aux_classifier: Optional[Module]

    def encoders(self):
        """The encoder, for the optimizer's encoder/decoder learning-rate groups."""
        return [self.backbone]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images of shape (N, 3, H, W), got {x.shape}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        _, _, _, c4 = self.backbone(x)                      # (N, 2048, H/8, W/8) at output stride 8
        logits = self.classifier(c4)                        # (N, C, H/8, W/8)
        return F.interpolate(logits, size=x.shape[2:], align_corners=False)

    def forward_with_aux(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.aux_classifier is None:
            raise ValueError(f"this {type(self).__name__} has no aux head; build it with aux_loss=True")
        self._check_input(x)
        _, _, c3, c4 = self.backbone(x)                     # c3: (N, 1024, H/8, W/8)
        size = x.shape[2:]
        main = F.interpolate(self.classifier(c4), size=size, align_corners=False)
        aux = F.interpolate(self.aux_classifier(c3), size=size, align_corners=False)
        return main, aux


def _backbone(encoder: str, output_stride: int, multi_grid, width: int, freeze_bn: bool, rng) -> ResNet:
    # torchvision uses ResNet-50/101; any of ours works (ResNet-18/34 for small experiments)
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
    if output_stride not in DILATION:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    return ResNet(ENCODERS[encoder], freeze_bn=freeze_bn, width=width, rng=rng,
                  replace_stride_with_dilation=DILATION[output_stride], multi_grid=multi_grid)


class DeepLabV3(SegmentationModel):
    """DeepLabv3 on an atrous ResNet; ``DeepLabV3(21, 'resnet50')`` has torchvision's
    ``deeplabv3_resnet50`` state dict (39.6 M parameters without the aux head).

    ``aspp_rates`` defaults to (12, 24, 36) at output stride 8 and (6, 12, 18) at 16 (the paper);
    ``multi_grid`` (e.g. (1, 2, 4)) sets layer4's unit rates; ``width`` (64 is the real ResNet) and
    ``aspp_channels`` (256) shrink the network for small experiments; ``aux_loss`` adds the FCN head
    on layer3."""

    def __init__(self, num_classes: int = 21, encoder: str = "resnet50", output_stride: int = 8,
                 aspp_rates: Optional[Sequence[int]] = None, multi_grid: Optional[Sequence[int]] = None,
                 aux_loss: bool = False, width: int = 64, aspp_channels: int = 256, freeze_bn: bool = False,
                 seed: int = 0) -> None:
        rng, dropout_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])  # masks: their own stream
        self.backbone = _backbone(encoder, output_stride, multi_grid, width, freeze_bn, rng)
        rates = tuple(ASPP_RATES[output_stride] if aspp_rates is None else aspp_rates)
        if not rates or min(rates) < 1:
            raise ValueError(f"aspp_rates must be positive integers, got {aspp_rates!r}")
        _, _, c3, c4 = self.backbone.out_channels                # (256, 512, 1024, 2048) for ResNet-50
        self.classifier = DeepLabHead(c4, num_classes, rates, channels=aspp_channels, rng=rng, dropout_rng=dropout_rng)
        self.aux_classifier = FCNHead(c3, num_classes, rng=rng, dropout_rng=dropout_rng) if aux_loss else None
        self.num_classes, self.output_stride, self.aspp_rates = num_classes, output_stride, rates
