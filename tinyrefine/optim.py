"""Optimizers and the poly learning-rate schedule.

An optimizer holds parameter groups (so the encoder can learn slower than the
decoder, as in the paper) and updates ``p.data`` in place from ``p.grad``
under no graph. Its state (momentum buffers, step count) round-trips through
``state_dict()`` so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import backend
from .nn import Parameter

ParamGroups = Union[Iterable[Parameter], Sequence[Dict[str, Any]]]


class Optimizer:
    defaults: Dict[str, Any] = {}

    def __init__(self, params: ParamGroups, **defaults: Any) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: List[Dict[str, Any]] = []
        self.names: Dict[int, str] = {}  # position -> parameter name, where the groups named them
        position = 0
        for group in groups:
            merged = {**self.defaults, **defaults, **group}
            names = group.get("names") or [None] * len(group["params"])
            if len(names) != len(group["params"]):
                raise ValueError(f"a parameter group has {len(group['params'])} params but {len(names)} names")
            kept = [(p, n) for p, n in zip(group["params"], names) if p.requires_grad]  # frozen BN stays out
            merged["params"] = [p for p, _ in kept]
            merged.pop("names", None)
            merged.setdefault("initial_lr", merged["lr"])
            for _, name in kept:
                if name is not None:
                    self.names[position] = name
                position += 1
            self.param_groups.append(merged)
        self.state: Dict[int, Dict[str, Any]] = {}  # keyed by position over all groups
        self.steps = 0

    def _indexed(self):
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, group, p
                index += 1

    def zero_grad(self) -> None:
        for _, _, p in self._indexed():
            p.grad = None

    def step(self) -> None:
        for index, group, p in self._indexed():
            if p.grad is not None:
                self.update(p, p.grad, group, self.state.setdefault(index, {}))
        self.steps += 1

    def update(self, p: Parameter, grad, group: Dict[str, Any], state: Dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _key(self, index: int) -> str:
        return self.names.get(index, str(index))  # the parameter's name where known, else its position

    def state_dict(self) -> Dict[str, Any]:
        """Flat entries ``state.<parameter name>.<field>`` (saved to .npz by the checkpoint code)."""
        out: Dict[str, Any] = {"steps": np.asarray(self.steps)}
        for i, group in enumerate(self.param_groups):
            out[f"group{i}.lr"] = np.asarray(group["lr"])
            out[f"group{i}.initial_lr"] = np.asarray(group["initial_lr"])
        for index, state in self.state.items():
            for field, value in state.items():
                out[f"state.{self._key(index)}.{field}"] = backend.as_numpy(value)
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the state, matched to parameters by name (or position) and shape; every mismatch is named."""
        saved_groups = sum(1 for k in state if k.endswith(".initial_lr"))
        if saved_groups != len(self.param_groups):
            raise ValueError(f"optimizer state has {saved_groups} parameter groups, this optimizer {len(self.param_groups)}")
        params = {self._key(index): p for index, _, p in self._indexed()}
        index_of = {self._key(index): index for index, _, _ in self._indexed()}
        problems, restored = [], {}
        for entry, value in state.items():
            if not entry.startswith("state."):
                continue
            key, field = entry[len("state."):].rsplit(".", 1)
            if key not in params:
                problems.append(f"{key}: in the saved state, not among this optimizer's parameters")
            elif np.ndim(value) == 0:  # a counter (Adam's t): a host number, read once here, not each step
                restored.setdefault(index_of[key], {})[field] = backend.as_numpy(value).item()
            elif tuple(np.shape(value)) != params[key].shape:
                problems.append(f"{key}.{field}: saved shape {tuple(np.shape(value))}, parameter shape {params[key].shape}")
            else:                      # a buffer: straight onto the parameter's device, never shared
                restored.setdefault(index_of[key], {})[field] = backend.to_device(value, params[key].device, copy=True)
        if problems:
            raise ValueError(f"optimizer state does not fit this optimizer ({len(problems)} problems): "
                             + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
        self.state, self.steps = restored, int(state["steps"])
        for i, group in enumerate(self.param_groups):
            group["lr"] = float(state[f"group{i}.lr"])
            group["initial_lr"] = float(state[f"group{i}.initial_lr"])


class SGD(Optimizer):
    """v = momentum * v + (grad + weight_decay * p);  p -= lr * v   (torch's formulation)"""

    defaults = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0}

    def update(self, p, grad, group, state):
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p.data
        if group["momentum"]:
            if "momentum" not in state:
                state["momentum"] = grad.copy()
            else:
                state["momentum"] *= group["momentum"]
                state["momentum"] += grad
            grad = state["momentum"]
        p.data -= (group["lr"] * grad).astype(p.dtype, copy=False)


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * m_hat / (sqrt(v_hat) + eps)"""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

    def update(self, p, grad, group, state):
        xp = backend.get_array_module(p.data)
        b1, b2 = group["betas"]
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * p.data
        if "m" not in state:
            state["m"], state["v"], state["t"] = xp.zeros_like(p.data), xp.zeros_like(p.data), 0
        # t is a Python int: the bias corrections below are host numbers passed to the GPU as
        # kernel scalars (a device counter would need a sync each step to compute b1 ** t)
        state["t"] = t = int(state["t"]) + 1
        state["m"] *= b1
        state["m"] += (1 - b1) * grad
        state["v"] *= b2
        state["v"] += (1 - b2) * grad * grad
        m_hat = state["m"] / (1 - b1 ** t)
        v_hat = state["v"] / (1 - b2 ** t)
        p.data -= (group["lr"] * m_hat / (xp.sqrt(v_hat) + group["eps"])).astype(p.dtype, copy=False)


def clip_grad_norm(parameters: Iterable[Parameter], max_norm: float):
    """Scale every gradient by min(1, max_norm / ||g||), ||g|| the norm of all of them together (as torch's
    clip_grad_norm_). Returns ||g|| before clipping as a 0-d array on the gradients' device: nothing here
    waits for the GPU."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        raise ValueError("clip_grad_norm: no parameter has a gradient (call backward first)")
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be positive, got {max_norm}")
    xp = backend.get_array_module(params[0].grad)
    total = xp.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in params))
    scale = xp.minimum(1.0, max_norm / (total + 1e-6))
    for p in params:  # new arrays, not in place: a gradient array may be shared with another tensor
        p.grad = p.grad * scale.astype(p.grad.dtype)
    return total


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float = 0.9) -> float:
    """The poly schedule: lr = base_lr * (1 - iteration / max_iter) ^ power."""
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    return base_lr * (1.0 - min(iteration, max_iter) / max_iter) ** power


class PolyLR:
    """Sets every group's lr to poly_lr(group's initial lr, iteration, max_iter) at each step.

    ``warmup`` > 0 scales that by (iteration + 1) / warmup for the first ``warmup`` iterations: the
    linear warm-up of Goyal et al. (2017), which keeps the first large steps (Adam moves every
    weight by about lr on its first step) from blowing up an untrained network."""

    def __init__(self, optimizer: Optimizer, max_iter: int, power: float = 0.9, warmup: int = 0) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be 0 or more iterations, got {warmup}")
        self.optimizer, self.max_iter, self.power, self.warmup = optimizer, max_iter, power, warmup

    def step(self, iteration: Optional[int] = None) -> None:
        iteration = self.optimizer.steps if iteration is None else iteration
        ramp = min(1.0, (iteration + 1) / self.warmup) if self.warmup else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = ramp * poly_lr(group["initial_lr"], iteration, self.max_iter, self.power)


def encoder_decoder_groups(model, lr: float, encoder_lr: Optional[float] = None, weight_decay: float = 0.0):
    """Two parameter groups: ``model.encoders()`` at ``encoder_lr`` (default lr/10), the rest at ``lr``."""
    encoder_ids = {id(p) for encoder in model.encoders() for p in encoder.parameters()}
    named = list(model.named_parameters())  # names key the optimizer's saved state (checked on resume)
    encoder = [(n, p) for n, p in named if id(p) in encoder_ids]
    decoder = [(n, p) for n, p in named if id(p) not in encoder_ids]
    return [{"params": [p for _, p in encoder], "names": [n for n, _ in encoder],
             "lr": encoder_lr if encoder_lr is not None else lr / 10, "weight_decay": weight_decay},
            {"params": [p for _, p in decoder], "names": [n for n, _ in decoder], "lr": lr, "weight_decay": weight_decay}]
