"""Modules: parameters, buffers, train/eval, state dicts, and the basic layers.

A ``Module`` finds its parameters, buffers and sub-modules by walking its own
attributes in the order they were set, so names come out exactly as torch
names them (``layer1.0.conv1.weight``) and a PyTorch twin loads our state dict
unchanged.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import backend
from . import functional as F
from .engine import Tensor


class Parameter(Tensor):
    """A tensor that is learned: ``requires_grad`` unless frozen."""

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)


class Buffer(Tensor):
    """State that is saved but not learned (BatchNorm's running statistics)."""


class Module:
    """Base class: subclasses set parameters and sub-modules as attributes and define ``forward``."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # ----- walking the tree
    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> Iterator["Module"]:
        return (m for _, m in self.named_children())

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        stack = [(prefix, self)]
        while stack:  # iterative pre-order, children in attribute order
            name, module = stack.pop()
            yield name, module
            kids = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator["Module"]:
        return (m for _, m in self.named_modules())

    def _named_tensors(self, kind) -> Iterator[Tuple[str, Tensor]]:
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, kind):
                    yield (f"{prefix}.{name}" if prefix else name), value

    def named_parameters(self) -> Iterator[Tuple[str, Parameter]]:
        return self._named_tensors(Parameter)

    def parameters(self) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self) -> Iterator[Tuple[str, Buffer]]:
        return self._named_tensors(Buffer)

    # ----- state
    def state_dict(self) -> "OrderedDict[str, Any]":
        """name -> array (parameters, then buffers, each in module order)."""
        out = OrderedDict()
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, (Parameter, Buffer)):
                    out[f"{prefix}.{name}" if prefix else name] = value.data
        return out

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> Tuple[List[str], List[str]]:
        """Copy arrays into this module's parameters and buffers (onto their device and dtype).

        With ``strict``, any missing key, unexpected key or shape mismatch raises one
        KeyError/ValueError listing all of them. Returns (missing, unexpected)."""
        own = dict(self._named_tensors((Parameter, Buffer)))
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {own[k].shape}"
                      for k in own if k in state and tuple(np.shape(state[k])) != own[k].shape]
        if mismatched:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(mismatched))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}; unexpected keys {unexpected}")
        for name, tensor in own.items():
            if name in state:  # straight to the tensor's device (a GPU state dict never visits the host)
                value = backend.to_device(state[name], tensor.device, copy=True)
                tensor.data = value.astype(tensor.dtype, copy=False)
        return missing, unexpected

    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device: str) -> "Module":
        """Move every parameter and buffer (and gradient) to ``device``, in place."""
        for _, tensor in self._named_tensors((Parameter, Buffer)):
            tensor.data = backend.to_device(tensor.data, device)
            if tensor.grad is not None:
                tensor.grad = backend.to_device(tensor.grad, device)
        return self

    def astype(self, dtype) -> "Module":
        """Cast floating-point parameters and buffers (float64 for gradchecks)."""
        for _, tensor in self._named_tensors((Parameter, Buffer)):
            if tensor.dtype.kind == "f":
                tensor.data = tensor.data.astype(dtype)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self.named_children():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return lines[0] + (")" if len(lines) == 1 else "\n" + "\n".join(lines[1:]) + "\n)")


class Sequential(Module):
    """Apply modules in order; they are named '0', '1', ... like torch."""

    def __init__(self, *modules: Module) -> None:
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __getitem__(self, index: int) -> Module:
        return list(self.children())[index]

    def __len__(self) -> int:
        return len(list(self.children()))

    def __iter__(self) -> Iterator[Module]:
        return self.children()

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class ModuleList(Module):
    """A list of modules named '0', '1', ... (no forward of its own)."""

    def __init__(self, modules: Sequence[Module] = ()) -> None:
        for i, module in enumerate(modules):
            setattr(self, str(i), module)

    def __getitem__(self, index: int) -> Module:
        return list(self.children())[index]

    def __len__(self) -> int:
        return len(list(self.children()))

    def __iter__(self) -> Iterator[Module]:
        return self.children()


def _rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


class Conv2d(Module):
    """A 2-D convolution layer; weights drawn as torch draws them (Kaiming-uniform, a=sqrt(5))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = True, rng: Optional[np.random.Generator] = None,
                 algorithm: str = "auto") -> None:
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if algorithm not in F.winograd.ALGORITHMS:
            raise ValueError(f"Conv2d algorithm must be one of {F.winograd.ALGORITHMS}, got {algorithm!r}")
        fan_in = in_channels * k[0] * k[1]
        bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform(a=sqrt(5)) bound, as torch
        rng = _rng(rng)
        self.weight = Parameter(rng.uniform(-bound, bound, (out_channels, in_channels, *k)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, out_channels).astype(np.float32)) if bias else None
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.algorithm = algorithm  # 'auto': F.conv2d picks im2col or Winograd per shape (measured rule)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.algorithm)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}" + (f", dilation={self.dilation}" if self.dilation != 1 else "")
                + ("" if self.bias is not None else ", bias=False")
                + ("" if self.algorithm == "auto" else f", algorithm={self.algorithm!r}"))


class BatchNorm2d(Module):
    """Batch normalisation. ``frozen=True`` fixes the statistics and the affine parameters.

    Why freeze: the official RefineNet code (MatConvNet, ``main/gen_net_opts_model_type1.m``) trains one image
    per batch (``batch_size=1``) and normalises with the stored statistics during training too
    (``bnorm_moment_type_trn='global'``): the statistics of one image's crops are too noisy to use. The batch
    size is the official code's setting, not a number quoted from the paper. Fixing gamma and beta as well is ours."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, frozen: bool = False) -> None:
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.running_mean = Buffer(np.zeros(num_features, dtype=np.float32))
        self.running_var = Buffer(np.ones(num_features, dtype=np.float32))
        self.num_batches_tracked = Buffer(np.zeros((), dtype=np.int64))
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.frozen = False
        self.freeze(frozen)

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        self.weight.requires_grad = self.bias.requires_grad = not frozen

    def forward(self, x: Tensor) -> Tensor:
        use_batch_stats = self.training and not self.frozen
        if use_batch_stats:
            self.num_batches_tracked.data = self.num_batches_tracked.data + 1
        return F.batch_norm(x, self.running_mean.data, self.running_var.data, self.weight, self.bias,
                            training=use_batch_stats, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}" + (", frozen" if self.frozen else "")


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size: int, stride: Optional[int] = None, padding: int = 0) -> None:
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class Identity(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Dropout(Module):
    """Inverted dropout (F.dropout) in training mode, the identity in eval mode.

    ``rng``: a numpy Generator for reproducible CPU masks; by default numpy's (CPU) or cupy's (CUDA)."""

    def __init__(self, p: float = 0.5, rng: Optional[np.random.Generator] = None) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng = p, rng

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=self.training, rng=self.rng if x.device == "cpu" else None)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AvgPool2d(Module):
    """Average pooling (torch's arguments and defaults: the zero padding counts, floor mode)."""

    def __init__(self, kernel_size: int, stride: Optional[int] = None, padding: int = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: Optional[int] = None) -> None:
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size, torch's bins (``1``: global average pooling, as in DeepLabv3's ASPP)."""

    def __init__(self, output_size) -> None:
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class ConvTranspose2d(Module):
    """A transposed convolution layer (FCN's learned upsampling), weight (in_channels, out_channels, kH, kW) as torch,
    drawn as torch draws it: Kaiming-uniform with a=sqrt(5), where torch's fan-in is weight.shape[1] * kH * kW."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 output_padding: int = 0, groups: int = 1, bias: bool = True, dilation: int = 1,
                 rng: Optional[np.random.Generator] = None) -> None:
        if groups != 1:
            raise NotImplementedError(f"ConvTranspose2d supports groups=1 only, got groups={groups!r}")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        bound = 1.0 / math.sqrt(out_channels * k[0] * k[1])
        rng = _rng(rng)
        self.weight = Parameter(rng.uniform(-bound, bound, (in_channels, out_channels, *k)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, out_channels).astype(np.float32)) if bias else None
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.output_padding, self.dilation = stride, padding, output_padding, dilation

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding, 1,
                                  self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}" + (f", output_padding={self.output_padding}" if self.output_padding else "")
                + (f", dilation={self.dilation}" if self.dilation != 1 else "")
                + ("" if self.bias is not None else ", bias=False"))
