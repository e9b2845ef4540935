"""A PyTorch twin of tinyrefine's RefineNet, for checking parity and for benchmarks.

The twin has the same modules under the same attribute names as ours, so
``twin.load_state_dict(our_model.state_dict())`` works with strict=True and no
renaming, and its forward pass follows the same formulas in the same order.
It needs torch (not torchvision: the ResNet trunk is written out here); the
tinyrefine package never imports this module itself.

    import tinyrefine.interop.torch_twin as tt
    twin = tt.twin_from(model)            # same config, same weights, same dtype
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn

from tinyrefine.backend import as_numpy
from tinyrefine.models.refinenet import RefineNet, scaled_size

DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
          101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}
ENCODERS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding, bias=bias)


# --------------------------------------------------------------------------- ResNet trunk (torchvision names, v1.5)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, channels: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv(cin, channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = _conv(channels, channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, channels: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv(cin, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv(channels, channels, 3, stride, 1)     # v1.5: the stride on the 3x3
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv(channels, channels * 4, 1)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """conv1, bn1, relu, maxpool, layer1..layer4 (no avgpool, no fc): image -> [c1, c2, c3, c4]."""

    def __init__(self, depth: int = 101, width: int = 64) -> None:
        super().__init__()
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = _conv(3, width, 7, 2, 3)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, (count, stride) in enumerate(zip(counts, (1, 2, 2, 2))):
            channels = width * 2 ** i
            downsample = None
            if stride != 1 or cin != channels * block.expansion:
                downsample = nn.Sequential(_conv(cin, channels * block.expansion, 1, stride),
                                           nn.BatchNorm2d(channels * block.expansion))
            blocks = [block(cin, channels, stride, downsample)]
            cin = channels * block.expansion
            blocks += [block(cin, channels) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = [width * 2 ** i * block.expansion for i in range(4)]

    def forward(self, x) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


# --------------------------------------------------------------------------- RefineNet parts
class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))) -- out-of-place ReLUs: x itself is the identity branch."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 3, 1, 1, bias=True)
        self.conv2 = _conv(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = shortcut

    def forward(self, x):
        branch = self.conv2(TF.relu(self.conv1(TF.relu(x))))
        return x + branch if self.shortcut else branch


class MultiResolutionFusion(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        if len(self.in_channels) > 1:
            self.convs = nn.ModuleList([_conv(c, out_channels, 3, 1, 1) for c in self.in_channels])

    def forward(self, xs: Sequence[torch.Tensor]):
        if len(xs) == 1:
            return xs[0]
        size = max((tuple(x.shape[2:]) for x in xs), key=lambda hw: hw[0] * hw[1])
        out = None
        for conv, x in zip(self.convs, xs):
            y = conv(x)
            if tuple(y.shape[2:]) != size:
                y = TF.interpolate(y, size=size, mode="bilinear", align_corners=True)
            out = y if out is None else out + y
        return out


class ChainedResidualPooling(nn.Module):
    def __init__(self, channels: int, n_blocks: int = 4, improved: bool = False, shortcut: bool = True,
                 leading_relu: bool = True) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_conv(channels, channels, 3, 1, 1) for _ in range(n_blocks)])
        self.improved, self.shortcut, self.leading_relu = improved, shortcut, leading_relu

    def forward(self, x):
        if self.leading_relu:
            x = TF.relu(x)
        out, path = x, x
        for conv in self.convs:
            path = TF.max_pool2d(conv(path), 5, 1, 2) if self.improved else conv(TF.max_pool2d(path, 5, 1, 2))
            out = out + path if (self.shortcut or out is not x) else path
        return out


class RefineNetBlock(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int, n_crp: int = 4, improved_crp: bool = False,
                 shortcuts: bool = True, crp_relu: bool = True) -> None:
        super().__init__()
        self.rcus = nn.ModuleList([nn.Sequential(ResidualConvUnit(c, shortcuts), ResidualConvUnit(c, shortcuts))
                                   for c in in_channels])
        self.fusion = MultiResolutionFusion(in_channels, out_channels)
        self.crp = ChainedResidualPooling(out_channels, n_crp, improved_crp, shortcuts, crp_relu)
        self.out_rcu = ResidualConvUnit(out_channels, shortcuts)

    def forward(self, *xs):
        paths = [rcus(x) for rcus, x in zip(self.rcus, xs)]
        return self.out_rcu(self.crp(self.fusion(paths)))


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, shortcuts: bool = True) -> None:
        super().__init__()
        self.rcus = nn.Sequential(ResidualConvUnit(channels, shortcuts), ResidualConvUnit(channels, shortcuts))
        self.classifier = _conv(channels, num_classes, 1, bias=True)

    def forward(self, x):
        return self.classifier(self.rcus(x))


class TorchRefineNet(nn.Module):
    """The twin of ``tinyrefine.models.RefineNet`` (same arguments; ``seed`` and ``zero_init_residual``
    only shape the initial weights, which the twin loads instead)."""

    def __init__(self, num_classes: int = 21, encoder: str = "resnet101", n_crp: int = 4, cascade: int = 4,
                 freeze_bn: bool = True, improved_crp: bool = False, features: int = 256, encoder_width: int = 64,
                 shortcuts: bool = True, long_range: bool = True, crp_relu: bool = True, two_scale: bool = False,
                 zero_init_residual: bool = False, seed: int = 0) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}")
        if cascade not in (1, 2, 4) or (two_scale and cascade != 4):
            raise ValueError(f"cascade must be 1, 2 or 4 (4 with two_scale), got {cascade}")
        self.cascade, self.long_range, self.freeze_bn, self.two_scale = cascade, long_range, freeze_bn, two_scale
        self.encoder = ResNet(ENCODERS[encoder], encoder_width)
        c1, c2, c3, c4 = self.encoder.out_channels
        f, f2 = features, 2 * features
        self.adapt1 = _conv(c1, f, 3, 1, 1)
        self.adapt2 = _conv(c2, f, 3, 1, 1)
        self.adapt3 = _conv(c3, f, 3, 1, 1)
        self.adapt4 = _conv(c4, f2, 3, 1, 1)
        block = dict(n_crp=n_crp, improved_crp=improved_crp, shortcuts=shortcuts, crp_relu=crp_relu)
        if two_scale:
            self.encoder_small = ResNet(ENCODERS[encoder], encoder_width)
            self.adapt_small2 = _conv(c2, f, 3, 1, 1)
            self.adapt_small3 = _conv(c3, f2, 3, 1, 1)
            self.adapt_small4 = _conv(c4, f2, 3, 1, 1)
            self.refine4 = RefineNetBlock([f2, f2, f2], f2, **block)
            self.refine3 = RefineNetBlock([f2, f, f], f, **block)
            self.refine2 = RefineNetBlock([f, f], f, **block)
            self.refine1 = RefineNetBlock([f, f], f, **block)
        elif cascade == 4:
            self.refine4 = RefineNetBlock([f2], f2, **block)
            self.refine3 = RefineNetBlock([f2, f], f, **block)
            self.refine2 = RefineNetBlock([f, f], f, **block)
            self.refine1 = RefineNetBlock([f, f], f, **block)
        elif cascade == 2:
            self.refine2 = RefineNetBlock([f2, f], f, **block)
            self.refine1 = RefineNetBlock([f, f, f], f, **block)
        else:
            self.refine1 = RefineNetBlock([f2, f, f, f], f, **block)
        self.head = Head(f, num_classes, shortcuts)
        if freeze_bn:
            for m in self._encoder_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "TorchRefineNet":
        super().train(mode)
        if self.freeze_bn:  # frozen BN: running statistics always, as ours
            for m in self._encoder_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _encoder_modules(self):
        yield from self.encoder.modules()
        if self.two_scale:
            yield from self.encoder_small.modules()

    def decode(self, features: List[torch.Tensor], small: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        c1, c2, c3, c4 = features
        if not self.long_range:
            c1, c2, c3 = c1.detach(), c2.detach(), c3.detach()
        a1, a2, a3, a4 = self.adapt1(c1), self.adapt2(c2), self.adapt3(c3), self.adapt4(c4)
        if self.two_scale:
            _, s2, s3, s4 = small
            if not self.long_range:
                s2, s3 = s2.detach(), s3.detach()
            x = self.refine4(a4, self.adapt_small3(s3), self.adapt_small4(s4))
            x = self.refine3(x, a3, self.adapt_small2(s2))
            x = self.refine2(x, a2)
            x = self.refine1(x, a1)
        elif self.cascade == 4:
            x = self.refine4(a4)
            x = self.refine3(x, a3)
            x = self.refine2(x, a2)
            x = self.refine1(x, a1)
        elif self.cascade == 2:
            x = self.refine2(a4, a3)
            x = self.refine1(x, a2, a1)
        else:
            x = self.refine1(a4, a3, a2, a1)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.two_scale:
            large, small = (scaled_size(tuple(x.shape[2:]), s) for s in RefineNet.SCALES)
            def scaled(size):
                return TF.interpolate(x, size=size, mode="bilinear", align_corners=False)
            logits = self.decode(self.encoder(scaled(large)), self.encoder_small(scaled(small)))
        else:
            logits = self.decode(self.encoder(x))
        return TF.interpolate(logits, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)


def _config_of(model) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("twin_from needs a tinyrefine RefineNet (it reads model.config)")
    config = dict(config)
    # the official code's options are not in the twin: refuse rather than compare different networks
    official = {"dropout": 0.0, "classifier_kernel": 1, "input_scale": 1.0}
    unsupported = {k: config[k] for k, default in official.items() if config.get(k, default) != default}
    if unsupported:
        raise ValueError(f"the torch twin has no {', '.join(unsupported)} option (got {unsupported})")
    for k in official:
        config.pop(k, None)
    return config


def twin_from(model, device: str = "cpu") -> TorchRefineNet:
    """A TorchRefineNet with ``model``'s config, weights, dtype and train/eval mode."""
    config = _config_of(model)
    state = model.state_dict()
    dtype = next(a.dtype for a in state.values() if a.dtype.kind == "f")
    twin = TorchRefineNet(**config).to(dtype=torch.float64 if dtype == np.float64 else torch.float32)
    twin.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(as_numpy(v))) for k, v in state.items()}, strict=True)
    twin.train(bool(getattr(model, "training", True)))
    return twin.to(device)



def sgd_side_by_side(model, twin: nn.Module, batches, lr: float = 0.01, momentum: float = 0.9,
                     weight_decay: float = 1e-4):
    """Train ``model`` (tinyrefine) and ``twin`` on the same batches with the same SGD.

    ``batches`` yields (images, masks) numpy arrays; images are cast to the model's dtype.
    Returns the two lists of losses, one entry per step."""
    from tinyrefine import functional as F
    from tinyrefine.engine import Tensor
    from tinyrefine.optim import SGD
    dtype = next(iter(model.parameters())).dtype
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)
    topt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)
    model.train()
    twin.train()
    ours, theirs = [], []
    for images, masks in batches:
        images = images.astype(dtype)
        loss = F.cross_entropy(model(Tensor(images)), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tloss = TF.cross_entropy(twin(torch.from_numpy(images)), torch.from_numpy(masks), ignore_index=255)
        topt.zero_grad()
        tloss.backward()
        topt.step()
        ours.append(loss.item())
        theirs.append(tloss.item())
    return ours, theirs
