"""Gradient-flow analysis: where does the gradient of the loss go, and by which paths?

RefineNet's long-range connections feed every encoder block output c_k (k = 1..3)
straight into the decoder through ``adapt_k``, besides the usual way up the
encoder through ``layer_{k+1}``. So the gradient arriving at c_k is a sum of two
terms, one per path:

    dL/dc_k = (through adapt_k: the long-range connection) + (through layer_{k+1}: up the encoder)

``encoder_gradient_paths`` measures the three quantities in three separate
backward passes (everything; the input of layer_{k+1} detached; the input of
adapt_k detached), so a test can check that the engine's accumulation really
is that sum. All functions leave the model as they found it (gradients and
BatchNorm statistics restored).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional

import numpy as np

from . import backend
from . import functional as F
from .engine import Tensor


@contextlib.contextmanager
def _preserved(model) -> Iterator[None]:
    """Restore every parameter's .grad and every buffer's value on exit."""
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.data.copy()) for _, b in model.named_buffers()]
    try:
        for p, _ in grads:
            p.grad = None
        yield
    finally:
        for p, g in grads:
            p.grad = g
        for b, value in buffers:
            b.data = value


def _as_tensor(images) -> Tensor:
    return images if isinstance(images, Tensor) else Tensor(images)


def _norm(array) -> float:
    return float(np.sqrt(float((backend.as_numpy(array).astype(np.float64) ** 2).sum())))


def _loss(model, logits: Tensor, target, ignore_index: int) -> Tensor:
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def gradient_norms(model, images, target, ignore_index: int = 255) -> "OrderedDict[str, float]":
    """One forward/backward of the cross-entropy loss: parameter name -> L2 norm of its gradient,
    in module order (trainable parameters only; one that got no gradient reports 0.0)."""
    with _preserved(model):
        loss = _loss(model, model(_as_tensor(images)), target, ignore_index)
        loss.backward()
        return OrderedDict((name, _norm(p.grad) if p.grad is not None else 0.0)
                           for name, p in model.named_parameters() if p.requires_grad)


def encoder_output_gradients(model, images, target, ignore_index: int = 255) -> List[np.ndarray]:
    """The full gradients dL/dc1..dL/dc4 of the encoder block outputs (host arrays), caught with
    ``Tensor.register_hook`` through ``RefineNet.feature_hook``."""
    return _encoder_pass(model, images, target, ignore_index)[0]


def _encoder_pass(model, images, target, ignore_index: int):
    """One forward/backward: ([dL/dc1..dL/dc4], parameter name -> gradient norm)."""
    caught: List[Optional[np.ndarray]] = [None] * 4
    norms: "OrderedDict[str, float]" = OrderedDict()

    def hook_features(features: List[Tensor]) -> None:
        for k, c in enumerate(features):
            if c.requires_grad:
                c.register_hook(lambda g, k=k: caught.__setitem__(k, backend.as_numpy(g.data).copy()))

    previous = model.feature_hook
    model.feature_hook = hook_features
    try:
        with _preserved(model):
            images = _as_tensor(images)
            if not any(p.requires_grad for p in model.encoder.parameters()) and not images.requires_grad:
                raise ValueError("nothing below the encoder outputs needs a gradient: pass images with requires_grad")
            _loss(model, model(images), target, ignore_index).backward()
            norms.update((name, _norm(p.grad) if p.grad is not None else 0.0)
                         for name, p in model.named_parameters() if p.requires_grad)
    finally:
        model.feature_hook = previous
    return [g if g is not None else np.zeros(1) for g in caught], norms


def encoder_block_gradients(model, images, target, ignore_index: int = 255) -> "OrderedDict[str, float]":
    """'layer1'..'layer4' -> L2 norm of the gradient arriving at that encoder block's output."""
    grads = encoder_output_gradients(model, images, target, ignore_index)
    return OrderedDict((f"layer{k + 1}", _norm(g)) for k, g in enumerate(grads))


def gradient_flow(model, images, target, ignore_index: int = 255):
    """``encoder_block_gradients`` and ``gradient_norms`` from one forward/backward:
    ('layer1'..'layer4' -> norm of dL/dc_k, parameter name -> norm of its gradient)."""
    grads, norms = _encoder_pass(model, images, target, ignore_index)
    return OrderedDict((f"layer{k + 1}", _norm(g)) for k, g in enumerate(grads)), norms


def module_gradient_norms(norms: Dict[str, float], depth: int = 2) -> "OrderedDict[str, float]":
    """Parameter gradient norms grouped by module, in the order given: a parameter's module is its
    name without the last part, cut to ``depth`` parts ('refine4.rcus.0.1.conv2.weight' ->
    'refine4.rcus', 'adapt1.weight' -> 'adapt1', 'head.classifier.bias' -> 'head.classifier').
    A module's value is the L2 norm of all its parameters' gradients together: sqrt(sum of squares)."""
    if depth < 1:
        raise ValueError(f"depth must be 1 or more, got {depth}")
    squares: "OrderedDict[str, float]" = OrderedDict()
    for name, value in norms.items():
        parts = name.split(".")[:-1] or name.split(".")
        key = ".".join(parts[:depth])
        squares[key] = squares.get(key, 0.0) + float(value) ** 2
    return OrderedDict((k, float(np.sqrt(v))) for k, v in squares.items())


INIT_SCHEMES = ("default", "he", "zero")


def init_decoder(model, scheme: str, seed: int = 0):
    """Re-initialise a RefineNet's decoder (everything outside ``model.encoders()``) in place; returns it.

    'default'  leave it as built: torch's default conv init, weights ~ U(+-1/sqrt(fan_in)),
               variance 1/(3 fan_in) (what the official code gets)
    'he'       every decoder conv weight ~ N(0, 2/fan_in) (He et al. 2015), biases unchanged
    'zero'     the last conv of every residual branch zeroed (``zero_init_residual_branches``)
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "zero":
        model.zero_init_residual_branches()
    elif scheme == "he":
        rng = np.random.default_rng(seed)
        encoder_ids = {id(p) for encoder in model.encoders() for p in encoder.parameters()}
        for _, p in model.named_parameters():
            if id(p) in encoder_ids or p.data.ndim != 4:
                continue
            fan_in = int(np.prod(p.shape[1:]))
            xp = backend.get_array_module(p.data)
            p.data[...] = xp.asarray(rng.standard_normal(p.shape) * np.sqrt(2.0 / fan_in), dtype=p.dtype)
    return model


def _forward_cut(model, images: Tensor, block: int, cut: Optional[str], caught: list) -> Tensor:
    """RefineNet's forward with the encoder written out, so that the output c_block can be handed
    detached to one of its two consumers: ``cut='encoder'`` detaches the input of layer_{block+1},
    ``cut='decoder'`` the input of adapt_block (None cuts nothing). The gradient at c_block lands in
    ``caught``. For the 2-scale variant the cut is made in the 1.2x encoder."""
    out_size = images.shape[2:]
    images, small = model.scale_inputs(images)
    enc = model.encoder
    x = enc.maxpool(enc.relu(enc.bn1(enc.conv1(images))))
    features = []
    for k in range(1, 5):
        x = getattr(enc, f"layer{k}")(x)
        features.append(x)
        if k == block:
            if x.requires_grad:
                x.register_hook(lambda g: caught.append(backend.as_numpy(g.data).copy()))
            if cut == "encoder":
                x = x.detach()
            elif cut == "decoder":
                features[-1] = x.detach()
    logits = model.decode(features, small)
    return F.interpolate(logits, size=out_size, align_corners=False)


def encoder_gradient_paths(model, images, target, block: int = 1, ignore_index: int = 255) -> Dict[str, np.ndarray]:
    """The gradient at encoder output c_block, split by path, in three separate backward passes:

    'total'        every path (= the plain forward's dL/dc_block)
    'long_range'   only through adapt_block into the decoder (the input of layer_{block+1} detached)
    'encoder'      only up the encoder through layer_{block+1} (the input of adapt_block detached)

    so that total == long_range + encoder up to rounding. ``block`` is 1, 2 or 3.
    """
    if block not in (1, 2, 3):
        raise ValueError(f"block must be 1, 2 or 3 (layer4 has only the decoder path), got {block}")
    images = _as_tensor(images)
    out = {}
    for key, cut in (("total", None), ("long_range", "encoder"), ("encoder", "decoder")):
        caught: list = []
        with _preserved(model):
            loss = _loss(model, _forward_cut(model, images, block, cut, caught), target, ignore_index)
            loss.backward()
        out[key] = caught[0] if caught else None
    shape = next(g.shape for g in out.values() if g is not None)
    return {k: (g if g is not None else np.zeros(shape)) for k, g in out.items()}
