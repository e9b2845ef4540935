"""The networks: ResNet encoders and RefineNet."""
from .refinenet import (ENCODERS, ChainedResidualPooling, Head, MultiResolutionFusion, RefineNet, RefineNetBlock,
                        ResidualConvUnit)
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["BasicBlock", "Bottleneck", "ChainedResidualPooling", "ENCODERS", "Head", "MultiResolutionFusion",
           "RefineNet", "RefineNetBlock", "ResNet", "ResidualConvUnit"]
