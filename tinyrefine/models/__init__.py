"""The networks: ResNet encoders, RefineNet, and DeepLabv3 and FCN (torchvision's) to compare with."""
from .refinenet import (ENCODERS, ChainedResidualPooling, Head, MultiResolutionFusion, RefineNet, RefineNetBlock,
                        ResidualConvUnit)
from .deeplabv3 import ASPP, ASPPConv, ASPPPooling, DeepLabHead, DeepLabV3, FCNHead
from .fcn import FCN
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "BasicBlock", "Bottleneck", "ChainedResidualPooling", "DeepLabHead",
           "DeepLabV3", "ENCODERS", "FCN", "FCNHead", "Head", "MultiResolutionFusion", "RefineNet", "RefineNetBlock",
           "ResNet", "ResidualConvUnit"]
