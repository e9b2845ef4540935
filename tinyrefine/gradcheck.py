"""Finite-difference gradient checking (Chainer-style: float64, random upstream gradient).

For a function y = f(x) and a random upstream gradient u, backward computes
d<u, f(x)>/dx. The check compares each entry with the central difference
(<u, f(x + eps e_i)> - <u, f(x - eps e_i)>) / (2 eps). A random u (not ones)
matters: with u = 1 an op whose outputs always sum to one, like softmax, has a
zero gradient and would pass whatever its backward returns.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from . import backend
from .engine import Tensor, no_grad


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with finite differences."""


def _finite_difference_pairs(fn, inputs, eps, params, seed, n_samples) -> Iterator[Tuple[str, Tensor, int, float, float]]:
    """Yield (name, tensor, flat index, analytic, numeric) for every checked entry."""
    inputs = list(inputs)
    named = [(f"input {i}", t) for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    named += [(getattr(p, "name", None) or f"param {i}", p) for i, p in enumerate(params)]
    if not named:
        raise ValueError("gradcheck: nothing to check (no input requires grad and no params given)")
    for name, t in named:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 tensors ({name} is {t.dtype}): float32 rounding swamps eps")
    rng = np.random.default_rng(seed)

    # analytic gradients for one random upstream gradient
    for _, t in named:
        t.grad = None
        if not t.data.flags.c_contiguous:  # reshape(-1) below must be a view for the nudges to reach t
            t.data = backend.get_array_module(t.data).ascontiguousarray(t.data)
    y = fn(*inputs)
    xp = backend.get_array_module(y.data)
    upstream = xp.asarray(rng.standard_normal(y.shape))
    y.backward(upstream)
    analytic = [t.grad if t.grad is not None else xp.zeros_like(t.data) for _, t in named]

    def objective() -> float:
        with no_grad():
            return float((fn(*inputs).data * upstream).sum())

    for (name, t), grad in zip(named, analytic):
        flat = t.data.reshape(-1)  # a view: nudging it nudges the tensor
        entries = range(flat.size) if n_samples is None or n_samples >= flat.size else \
            rng.choice(flat.size, size=n_samples, replace=False)
        for k in entries:
            k = int(k)
            original = float(flat[k])
            flat[k] = original + eps
            plus = objective()
            flat[k] = original - eps
            minus = objective()
            flat[k] = original
            yield name, t, k, float(grad.reshape(-1)[k]), (plus - minus) / (2 * eps)


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence, eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-3, params: Sequence[Tensor] = (), seed: int = 0,
              n_samples: Optional[int] = None) -> bool:
    """Check the gradient of ``fn(*inputs)`` against central finite differences.

    Checked: every input Tensor with ``requires_grad`` and every Tensor in ``params`` (for
    parameters ``fn`` uses internally, such as a module's weights). All must be float64.
    ``n_samples`` checks that many random entries per tensor instead of all of them.
    Returns True, or raises GradcheckError naming the tensor, the entry and both values.
    """
    for name, t, k, value, numeric in _finite_difference_pairs(fn, inputs, eps, params, seed, n_samples):
        if abs(value - numeric) > atol + rtol * abs(numeric):
            index = tuple(int(i) for i in np.unravel_index(k, t.shape))
            raise GradcheckError(f"gradcheck failed for {name} {t.shape} at entry {index}: "
                                 f"analytic {value:.10g} vs numeric {numeric:.10g} "
                                 f"(|diff| {abs(value - numeric):.3g} > atol {atol} + rtol {rtol} * |numeric|)")
    return True


def max_gradient_error(fn: Callable[..., Tensor], inputs: Sequence, eps: float = 1e-6, params: Sequence[Tensor] = (),
                       seed: int = 0, n_samples: Optional[int] = None) -> float:
    """The largest |analytic - numeric| / max(1, |numeric|) over the checked entries (for reports)."""
    return max(abs(value - numeric) / max(1.0, abs(numeric))
               for _, _, _, value, numeric in _finite_difference_pairs(fn, inputs, eps, params, seed, n_samples))
