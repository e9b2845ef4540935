"""Model size and cost: parameter counts, convolution FLOPs and a side-by-side table.

FLOPs here are 2 x the multiply-adds of the convolutions (bias, BN, ReLU, pooling and
upsampling are left out: they are a rounding error beside the convs). They are
counted by running a no_grad forward pass with every Conv2d instance temporarily
wrapped to record its output shape; the wrappers are removed afterwards, whatever
happens. ``dry_run=True`` (the default) skips the arithmetic of the convs and
returns zeros of the right shape, so counting a ResNet-101 at 512x512 is quick.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from . import backend
from .engine import Tensor, no_grad
from .functional.common import _out_size, _pair
from .nn import Conv2d, Module


def count_parameters(model: Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (only those with requires_grad when ``trainable_only``)."""
    return int(sum(p.size for p in model.parameters() if p.requires_grad or not trainable_only))


def count_trainable_parameters(model: Module) -> int:
    return count_parameters(model, trainable_only=True)


def conv_flops(weight_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """2 * N * C_out * H_out * W_out * C_in * kH * kW (multiply-adds, times two)."""
    c_out, c_in, kh, kw = weight_shape
    n, _, ho, wo = output_shape
    return 2 * n * c_out * ho * wo * c_in * kh * kw


@contextlib.contextmanager
def record_convs(model: Module, dry_run: bool = False) -> Iterator[List[Tuple[str, tuple, tuple]]]:
    """Within the block, every Conv2d of ``model`` appends (name, weight shape, output shape) to the
    yielded list when it runs. ``dry_run`` skips the convolution itself (zeros of the right shape)."""
    records: List[Tuple[str, tuple, tuple]] = []
    wrapped = []

    def wrap(name: str, conv: Conv2d) -> Callable:
        original = type(conv).forward.__get__(conv)

        def forward(x: Tensor) -> Tensor:
            if dry_run:
                N, _, H, W = x.shape
                (kh, kw) = conv.kernel_size
                s, p, d = _pair(conv.stride, "stride", 1), _pair(conv.padding, "padding", 0), _pair(conv.dilation, "dilation", 1)
                shape = (N, conv.out_channels, _out_size(H, kh, s[0], p[0], d[0]), _out_size(W, kw, s[1], p[1], d[1]))
                y = Tensor(backend.get_array_module(x.data).zeros(shape, dtype=x.dtype))
            else:
                y = original(x)
            records.append((name, tuple(conv.weight.shape), tuple(y.shape)))
            return y
        return forward

    try:
        for name, module in model.named_modules():
            if isinstance(module, Conv2d):
                module.forward = wrap(name, module)  # an instance attribute shadows the class's method
                wrapped.append(module)
        yield records
    finally:
        for module in wrapped:
            vars(module).pop("forward", None)


def conv_flops_by_layer(model: Module, input_shape: Sequence[int] = (1, 3, 512, 512),
                        dry_run: bool = True) -> Dict[str, int]:
    """name -> FLOPs of each Conv2d (a conv run twice appears once, summed)."""
    x = Tensor(np.zeros(tuple(input_shape), dtype=_float_dtype(model)))
    device = next((p.device for p in model.parameters()), "cpu")
    x = x.to(device)
    out: Dict[str, int] = {}
    with no_grad(), record_convs(model, dry_run) as records:
        model(x)
    for name, w_shape, y_shape in records:
        out[name] = out.get(name, 0) + conv_flops(w_shape, y_shape)
    return out


def count_flops(model: Module, input_shape: Sequence[int] = (1, 3, 512, 512), dry_run: bool = True) -> float:
    """Convolution FLOPs (2 x multiply-adds) of one forward pass on a batch of ``input_shape``."""
    return float(sum(conv_flops_by_layer(model, input_shape, dry_run).values()))


def _float_dtype(model: Module):
    return next((p.dtype for p in model.parameters() if p.dtype.kind == "f"), np.dtype(np.float32))


def summary_table(models: Dict[str, Module], input_size: Sequence[int] = (512, 512)) -> str:
    """A text table: parameters (M), trainable (M) and GFLOPs at 1 x 3 x ``input_size`` per model."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)[-2:]
    rows = [("model", "params (M)", "trainable (M)", f"GFLOPs @ {h}x{w}")]
    for name, model in models.items():
        rows.append((name, f"{count_parameters(model) / 1e6:.2f}", f"{count_trainable_parameters(model) / 1e6:.2f}",
                     f"{count_flops(model, (1, 3, h, w)) / 1e9:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)
