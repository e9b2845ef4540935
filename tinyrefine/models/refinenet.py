"""RefineNet (Lin et al. 2016): multi-path refinement on a ResNet encoder.

The parts follow the paper's Fig. 3:
  (b) ResidualConvUnit        relu -> conv3x3 -> relu -> conv3x3, plus the identity
  (c) MultiResolutionFusion   per path a conv3x3, upsample to the largest input, sum
  (d) ChainedResidualPooling  relu, then a chain of pool5x5 -> conv3x3 blocks summed onto the input
  (a) RefineNetBlock          2 RCUs per path -> fusion -> CRP -> 1 output RCU
and Fig. 2(c): four blocks cascaded from the coarsest encoder output (1/32) to the
finest (1/4), then two RCUs and a 1x1 classifier, upsampled to the input size.

Every RCU and CRP is a sum with an identity, and each block's coarse input flows
through fusion to its output: these are the short- and long-range connections
that let gradients reach the encoder directly (``shortcuts=False`` removes the
identities, for the gradient-flow notebook).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import functional as F
from ..engine import Tensor
from ..nn import Conv2d, Dropout, Module, ModuleList, Sequential
from .resnet import ResNet


class ResidualConvUnit(Module):
    """RCU: x + conv2(relu(conv1(relu(x)))); conv1 has a bias, conv2 none (as the official code)."""

    def __init__(self, channels: int, shortcut: bool = True, rng: Optional[np.random.Generator] = None) -> None:
        self.conv1 = Conv2d(channels, channels, 3, 1, 1, bias=True, rng=rng)
        self.conv2 = Conv2d(channels, channels, 3, 1, 1, bias=False, rng=rng)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        branch = self.conv2(F.relu(self.conv1(F.relu(x))))
        return F.add(x, branch) if self.shortcut else branch


class MultiResolutionFusion(Module):
    """Fuse paths of different resolutions: conv3x3 each to ``out_channels``, upsample
    (bilinear, align_corners=True) to the largest input resolution, and sum. One path: passes through."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, rng: Optional[np.random.Generator] = None) -> None:
        self.in_channels, self.out_channels = list(in_channels), out_channels
        if len(self.in_channels) > 1:
            self.convs = ModuleList([Conv2d(c, out_channels, 3, 1, 1, bias=False, rng=rng) for c in self.in_channels])

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        if len(xs) != len(self.in_channels):
            raise ValueError(f"MultiResolutionFusion expects {len(self.in_channels)} paths, got {len(xs)}")
        if len(xs) == 1:
            return xs[0]
        size = max((x.shape[2:] for x in xs), key=lambda hw: hw[0] * hw[1])
        out = None
        for conv, x in zip(self.convs, xs):
            y = conv(x)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, align_corners=True)
            out = y if out is None else F.add(out, y)
        return out


class ChainedResidualPooling(Module):
    """CRP: x = relu(x); path = x; for each block: path = conv(pool(path)); x = x + path.

    The pools (5x5, stride 1, -inf padding) chain, so later blocks see ever larger
    regions; each result is added onto x (a residual sum, not a replacement).
    ``improved=True`` convolves before pooling, as the official training code does.
    """

    def __init__(self, channels: int, n_blocks: int = 4, improved: bool = False, shortcut: bool = True,
                 leading_relu: bool = True, rng: Optional[np.random.Generator] = None) -> None:
        self.convs = ModuleList([Conv2d(channels, channels, 3, 1, 1, bias=False, rng=rng) for _ in range(n_blocks)])
        self.improved, self.shortcut, self.leading_relu = improved, shortcut, leading_relu

    def pooling_block(self, conv: Conv2d, path: Tensor) -> Tensor:
        """One block of Fig. 3d: a 5x5 max-pool (stride 1), then a 3x3 conv (improved: conv, then pool)."""
        if self.improved:
            return F.max_pool2d(conv(path), 5, 1, 2)
        return conv(F.max_pool2d(path, 5, 1, 2))

    def forward(self, x: Tensor) -> Tensor:
        if self.leading_relu:
            x = F.relu(x)                           # (N, C, H, W)
        out = x if self.shortcut else None          # ablation shortcut=False: x itself is left out of the sum
        path = x
        for conv in self.convs:
            path = self.pooling_block(conv, path)   # the chain: each block pools the previous block's output
            out = path if out is None else F.add(out, path)
        return out


class RefineNetBlock(Module):
    """One RefineNet: per input path two RCUs, then fusion, CRP and one output RCU.

    Path 0 is the coarser input (from the previous block), path 1.. the encoder features."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, n_crp: int = 4, improved_crp: bool = False,
                 shortcuts: bool = True, crp_relu: bool = True, rng: Optional[np.random.Generator] = None) -> None:
        self.rcus = ModuleList([Sequential(ResidualConvUnit(c, shortcuts, rng), ResidualConvUnit(c, shortcuts, rng))
                                for c in in_channels])
        self.fusion = MultiResolutionFusion(in_channels, out_channels, rng)
        self.crp = ChainedResidualPooling(out_channels, n_crp, improved_crp, shortcuts, crp_relu, rng)
        self.out_rcu = ResidualConvUnit(out_channels, shortcuts, rng)

    def forward(self, *xs: Tensor) -> Tensor:
        paths = [rcus(x) for rcus, x in zip(self.rcus, xs)]
        return self.out_rcu(self.crp(self.fusion(paths)))


class Head(Module):
    """Two RCUs and the classifier at 1/4 resolution (1x1 by default; the official code: dropout 0.5, then 3x3)."""

    def __init__(self, channels: int, num_classes: int, shortcuts: bool = True,
                 rng: Optional[np.random.Generator] = None, dropout: float = 0.0, classifier_kernel: int = 1,
                 dropout_rng: Optional[np.random.Generator] = None) -> None:
        self.rcus = Sequential(ResidualConvUnit(channels, shortcuts, rng), ResidualConvUnit(channels, shortcuts, rng))
        self.dropout = Dropout(dropout, dropout_rng) if dropout else None   # the official code's; off by default
        self.classifier = Conv2d(channels, num_classes, classifier_kernel, 1, classifier_kernel // 2, bias=True, rng=rng)

    def forward(self, x: Tensor) -> Tensor:
        x = self.rcus(x)
        return self.classifier(self.dropout(x) if self.dropout is not None else x)


ENCODERS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


class RefineNet(Module):
    """The cascaded RefineNet for semantic segmentation.

    cascade=4 (the paper's default, Fig. 2c):  refine4(adapt4) -> refine3(., adapt3) -> refine2 -> refine1
    cascade=2:  refine2(adapt4, adapt3) -> refine1(., adapt2, adapt1)       (the paper's 2-cascaded variant)
    cascade=1:  refine1(adapt4, adapt3, adapt2, adapt1)                     (a single RefineNet block)
    two_scale=True (the paper's 4-cascaded 2-scale RefineNet, Fig. 7c): ``encoder`` sees the image
    scaled by 1.2 and an independent ``encoder_small`` sees it scaled by 0.6; 7 of their 8 outputs
    (all but the small 1/4 map) enter the cascade, each beside the large map of (nearly) the same size:
        refine4(adapt4, adapt_small3, adapt_small4) -> refine3(., adapt3, adapt_small2) -> refine2 -> refine1
    ``features`` is the decoder width (256 in the paper; refine4 works at 2x that).

    Options from the official code (guosheng/refinenet), off by default (README: "paper / official
    code / tinyrefine"): ``dropout=0.5`` on the encoder outputs wider than 512 channels and before
    the classifier, ``classifier_kernel=3``, and ``input_scale=1.2``, the single-scale model's
    input resize (the logits are resized back to the input's size either way).
    """

    SCALES = (1.2, 0.6)   # the two input scales of the 2-scale variant

    def __init__(self, num_classes: int = 21, encoder: str = "resnet101", n_crp: int = 4, cascade: int = 4,
                 freeze_bn: bool = True, improved_crp: bool = False, features: int = 256, encoder_width: int = 64,
                 shortcuts: bool = True, long_range: bool = True, crp_relu: bool = True, two_scale: bool = False,
                 zero_init_residual: bool = False, dropout: float = 0.0, classifier_kernel: int = 1,
                 input_scale: float = 1.0, seed: int = 0) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        if cascade not in (1, 2, 4):
            raise ValueError(f"cascade must be 1, 2 or 4, got {cascade}")
        if two_scale and cascade != 4:
            raise ValueError(f"the 2-scale variant is 4-cascaded (the paper's Fig. 7c); got cascade={cascade}")
        if classifier_kernel not in (1, 3):
            raise ValueError(f"classifier_kernel must be 1 (the paper's figure) or 3 (the official code), got {classifier_kernel}")
        if not input_scale > 0 or (two_scale and input_scale != 1.0):
            raise ValueError(f"input_scale must be positive, and 1.0 with two_scale (it has its own scales), got {input_scale}")
        rng = np.random.default_rng(seed)
        # the constructor arguments, so a twin or a checkpoint can rebuild the same network
        self.config = dict(num_classes=num_classes, encoder=encoder, n_crp=n_crp, cascade=cascade, freeze_bn=freeze_bn,
                           improved_crp=improved_crp, features=features, encoder_width=encoder_width,
                           shortcuts=shortcuts, long_range=long_range, crp_relu=crp_relu, two_scale=two_scale,
                           zero_init_residual=zero_init_residual, dropout=dropout, classifier_kernel=classifier_kernel,
                           input_scale=input_scale, seed=seed)
        self.num_classes, self.cascade, self.long_range, self.two_scale = num_classes, cascade, long_range, two_scale
        self.input_scale = input_scale
        # optional: called as feature_hook([c1, c2, c3, c4]) on the encoder outputs in forward
        # (gradient-flow analysis registers Tensor hooks there); a returned list replaces them
        self.feature_hook = None
        self.encoder = ResNet(ENCODERS[encoder], freeze_bn=freeze_bn, width=encoder_width, rng=rng)
        c1, c2, c3, c4 = self.encoder.out_channels
        f, f2 = features, 2 * features
        # adapt convs: encoder channels -> decoder width (layer4 -> 2f, layer1-3 -> f)
        self.adapt1 = Conv2d(c1, f, 3, 1, 1, bias=False, rng=rng)
        self.adapt2 = Conv2d(c2, f, 3, 1, 1, bias=False, rng=rng)
        self.adapt3 = Conv2d(c3, f, 3, 1, 1, bias=False, rng=rng)
        self.adapt4 = Conv2d(c4, f2, 3, 1, 1, bias=False, rng=rng)
        block = dict(n_crp=n_crp, improved_crp=improved_crp, shortcuts=shortcuts, crp_relu=crp_relu, rng=rng)
        if two_scale:
            self.encoder_small = ResNet(ENCODERS[encoder], freeze_bn=freeze_bn, width=encoder_width, rng=rng)
            # every input of refine4 is adapted to 2f, as adapt4 is
            self.adapt_small2 = Conv2d(c2, f, 3, 1, 1, bias=False, rng=rng)
            self.adapt_small3 = Conv2d(c3, f2, 3, 1, 1, bias=False, rng=rng)
            self.adapt_small4 = Conv2d(c4, f2, 3, 1, 1, bias=False, rng=rng)
            self.refine4 = RefineNetBlock([f2, f2, f2], f2, **block)              # 1.2/32 (= 0.6/16)
            self.refine3 = RefineNetBlock([f2, f, f], f, **block)                 # 1.2/16 (= 0.6/8)
            self.refine2 = RefineNetBlock([f, f], f, **block)                     # 1.2/8
            self.refine1 = RefineNetBlock([f, f], f, **block)                     # 1.2/4
        elif cascade == 4:
            self.refine4 = RefineNetBlock([f2], f2, **block)                      # 1/32
            self.refine3 = RefineNetBlock([f2, f], f, **block)                    # 1/16
            self.refine2 = RefineNetBlock([f, f], f, **block)                     # 1/8
            self.refine1 = RefineNetBlock([f, f], f, **block)                     # 1/4
        elif cascade == 2:
            self.refine2 = RefineNetBlock([f2, f], f, **block)                    # 1/16
            self.refine1 = RefineNetBlock([f, f, f], f, **block)                  # 1/4
        else:
            self.refine1 = RefineNetBlock([f2, f, f, f], f, **block)              # 1/4
        dropout_rng = np.random.default_rng([seed, 1])  # its own stream: the weights' init does not change
        self.head = Head(f, num_classes, shortcuts, rng, dropout, classifier_kernel, dropout_rng)
        # the official code drops out the encoder outputs wider than 512 channels (layer3, layer4 of a ResNet-50+)
        self.encoder_dropout = Dropout(dropout, dropout_rng) if dropout else None
        if zero_init_residual:
            self.zero_init_residual_branches()

    def zero_init_residual_branches(self) -> None:
        """Zero the last conv of every decoder residual branch (each RCU's conv2, each CRP conv).

        The decoder then starts as identities plus the fusion convs, so its unnormalised sums
        (2 RCUs per path, 4 CRP branches, cascaded 4 times) cannot amplify the first optimizer
        step. Ours, after Fixup (Zhang et al. 2019) and "zero-gamma" (Goyal et al. 2017); the
        paper and the official code use the default init. The zeroed convs still learn: an RCU's
        conv2 and the first conv of each CRP chain get a gradient at the first step, each later CRP
        conv once the one before it is nonzero. Needs the shortcuts (else a branch is the whole
        signal and zero would cut it)."""
        if not self.config["shortcuts"]:
            raise ValueError("zero_init_residual needs shortcuts=True: without the identity a zeroed branch cuts the path")
        for module in self.modules():
            if isinstance(module, ResidualConvUnit):
                module.conv2.weight.data[...] = 0
            elif isinstance(module, ChainedResidualPooling):
                for conv in module.convs:
                    conv.weight.data[...] = 0

    def encoders(self) -> List[ResNet]:
        """The ResNet encoder(s): ``[encoder]``, or ``[encoder, encoder_small]`` for two_scale."""
        return [self.encoder, self.encoder_small] if self.two_scale else [self.encoder]

    def decode(self, features: List[Tensor], small: Optional[List[Tensor]] = None) -> Tensor:
        """Encoder features [c1..c4] (and, two_scale, the small encoder's) -> logits at 1/4 resolution."""
        if self.encoder_dropout is not None:
            features = [self.encoder_dropout(c) if c.shape[1] > 512 else c for c in features]
        c1, c2, c3, c4 = features
        if not self.long_range:
            # ablation: cut the gradient of the long-range connections, so the encoder
            # learns only through layer4 (the forward pass is unchanged)
            c1, c2, c3 = c1.detach(), c2.detach(), c3.detach()
        a1, a2, a3, a4 = self.adapt1(c1), self.adapt2(c2), self.adapt3(c3), self.adapt4(c4)
        if self.two_scale:
            _, s2, s3, s4 = small                       # the small 1/4 map is not used
            if not self.long_range:
                s2, s3 = s2.detach(), s3.detach()
            x = self.refine4(a4, self.adapt_small3(s3), self.adapt_small4(s4))   # (N, 512, 1.2H/32, ..)
            x = self.refine3(x, a3, self.adapt_small2(s2))                       # (N, 256, 1.2H/16, ..)
            x = self.refine2(x, a2)                                              # (N, 256, 1.2H/8,  ..)
            x = self.refine1(x, a1)                                              # (N, 256, 1.2H/4,  ..)
        elif self.cascade == 4:
            x = self.refine4(a4)                # (N, 512, H/32, W/32)
            x = self.refine3(x, a3)             # (N, 256, H/16, W/16)
            x = self.refine2(x, a2)             # (N, 256, H/8,  W/8)
            x = self.refine1(x, a1)             # (N, 256, H/4,  W/4)
        elif self.cascade == 2:
            x = self.refine2(a4, a3)            # (N, 256, H/16, W/16)
            x = self.refine1(x, a2, a1)         # (N, 256, H/4,  W/4)
        else:
            x = self.refine1(a4, a3, a2, a1)    # (N, 256, H/4,  W/4)
        return self.head(x)                     # (N, classes, H/4, W/4)

    def scale_inputs(self, x: Tensor) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """(input of ``encoder``, outputs of ``encoder_small`` or None).

        One scale: (x, None). two_scale: x resized by 1.2, and the small encoder run on x resized by 0.6."""
        if not self.two_scale:
            if self.input_scale == 1.0:
                return x, None
            return F.interpolate(x, size=scaled_size(x.shape[2:], self.input_scale), align_corners=False), None
        large_size, small_size = (scaled_size(x.shape[2:], s) for s in self.SCALES)
        if min(small_size) < 32:
            raise ValueError(f"the 2-scale RefineNet needs images of at least 53x53 (its 0.6x copy must be "
                             f"32x32 or more), got {x.shape}")
        small = self.encoder_small(F.interpolate(x, size=small_size, align_corners=False))
        return F.interpolate(x, size=large_size, align_corners=False), small

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RefineNet expects images of shape (N, 3, H, W), got {x.shape}")
        if min(x.shape[2:]) < 32:
            raise ValueError(f"RefineNet needs images of at least 32x32 (the encoder divides by 32), got {x.shape}")
        image, small = self.scale_inputs(x)
        features = self.encoder(image)                            # [c1, c2, c3, c4]
        if self.feature_hook is not None:
            features = self.feature_hook(features) or features
        logits = self.decode(features, small)                     # (N, classes, H/4, W/4)
        return F.interpolate(logits, size=x.shape[2:], align_corners=False)


def scaled_size(size: Sequence[int], scale: float) -> Tuple[int, int]:
    """(H, W) times ``scale``, rounded half up (the twin uses the same sizes)."""
    return tuple(int(np.floor(v * scale + 0.5)) for v in size)

