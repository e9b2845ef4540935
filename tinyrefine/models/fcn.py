"""FCN (Long et al. 2015) as torchvision builds it: an atrous ResNet and an FCNHead.

torchvision's ``fcn_resnet50/101`` is not the paper's VGG FCN-8s with skip layers: it is
the DeepLab-style variant, a ResNet at output stride 8 (layer3 and layer4 dilated), a
3x3 conv to 512 channels + BN + ReLU + Dropout(0.1), a 1x1 classifier, and bilinear
upsampling to the input size. The names and shapes are torchvision's, so its state
dicts (``backbone.*``, ``classifier.*``, ``aux_classifier.*``) load unchanged.

    backbone (ResNet, output stride 8)  (N, 2048, H/8, W/8)
    classifier  FCNHead                 (N,    C, H/8, W/8)  -> bilinear to (N, C, H, W)
"""
from __future__ import annotations

import numpy as np

from .deeplabv3 import FCNHead, SegmentationModel, _backbone


class FCN(SegmentationModel):
    """``FCN(21, 'resnet50')`` has torchvision's ``fcn_resnet50`` state dict; ``aux_loss`` adds the
    FCNHead on layer3; ``width`` scales the ResNet (64 is the real one) for small experiments."""

    def __init__(self, num_classes: int = 21, encoder: str = "resnet50", aux_loss: bool = False,
                 output_stride: int = 8, width: int = 64, freeze_bn: bool = False, seed: int = 0) -> None:
        rng, dropout_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])  # masks: their own stream
        self.backbone = _backbone(encoder, output_stride, None, width, freeze_bn, rng)
        _, _, c3, c4 = self.backbone.out_channels                # (256, 512, 1024, 2048) for ResNet-50
        self.classifier = FCNHead(c4, num_classes, rng=rng, dropout_rng=dropout_rng)      # 2048 -> 512 -> C
        self.aux_classifier = FCNHead(c3, num_classes, rng=rng, dropout_rng=dropout_rng) if aux_loss else None
        self.num_classes, self.output_stride = num_classes, output_stride
