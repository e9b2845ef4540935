"""Checks for the notebooks' exercises: each compares a student's function with tinyrefine and says what is wrong.

Every ``check_*`` prints one verdict per test case and returns True when all pass. A stub that still raises
``NotImplementedError`` is reported as "not attempted yet" (and returns False) rather than crashing, so the
student notebooks execute top to bottom in CI; the solution notebooks (``notebooks/solutions/``) assert the
result. Inputs are float64 and small, so the comparisons are exact up to rounding (``atol`` 1e-8).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import numpy as np

from . import functional as F
from .engine import Function, Tensor
from .gradcheck import GradcheckError, gradcheck

ATOL = 1e-8


class _Fail(Exception):
    """One check failed; the message says why."""


def _report(name: str, cases: Iterable[Tuple[str, Callable[[], None]]]) -> bool:
    ok = True
    for label, run in cases:
        try:
            run()
        except NotImplementedError:
            print(f"{name}: not attempted yet (the stub still raises NotImplementedError)")
            return False
        except _Fail as failure:
            print(f"{name} [{label}]: WRONG: {failure}")
            ok = False
        except Exception as error:  # a crash in the student's code is a failed case, not a crashed notebook
            print(f"{name} [{label}]: ERROR {type(error).__name__}: {error}")
            ok = False
        else:
            print(f"{name} [{label}]: correct")
    return ok


def _array(value) -> np.ndarray:
    return np.asarray(value.data if isinstance(value, Tensor) else value, dtype=np.float64)


def _compare(got, expected, what: str, hint: Optional[Callable[[np.ndarray, np.ndarray], Optional[str]]] = None) -> None:
    got, expected = _array(got), _array(expected)
    if got.shape != expected.shape:
        raise _Fail(f"{what} has shape {got.shape}, expected {expected.shape}")
    if not np.allclose(got, expected, atol=ATOL, rtol=1e-6):
        index = np.unravel_index(np.abs(got - expected).argmax(), got.shape)
        message = (f"{what} differs: at {tuple(int(i) for i in index)} got {got[index]:.6g}, "
                   f"expected {expected[index]:.6g}")
        extra = hint(got, expected) if hint else None
        raise _Fail(message + (f". {extra}" if extra else ""))


# --------------------------------------------------------------------------- 01: a Function
def check_sigmoid(sigmoid_class) -> bool:
    """Notebook 01: ``Sigmoid(Function)`` with forward 1/(1+exp(-x)) and backward sigma(1-sigma) g."""
    rng = np.random.default_rng(0)

    def forward():
        x = rng.standard_normal((3, 4)) * 3
        _compare(sigmoid_class()(Tensor(x)), 1 / (1 + np.exp(-x)), "forward")

    def backward():
        x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
        s = 1 / (1 + np.exp(-x.data))
        g = rng.standard_normal((3, 4))
        sigmoid_class()(x).backward(g)
        if x.grad is None:
            raise _Fail("no gradient reached the input: does backward return it?")

        def hint(got, expected):
            if np.allclose(got, s * g):
                return "you return sigma * g: the derivative is sigma * (1 - sigma)"
            if np.allclose(got, s * (1 - s)):
                return "you forgot to multiply by the upstream gradient g"
            if np.allclose(got, x.data * (1 - x.data) * g):
                return "you used the input x where sigma(x) belongs (save the output in forward)"
            return None
        _compare(x.grad, s * (1 - s) * g, "backward", hint)

    def finite_differences():
        x = Tensor(rng.standard_normal((2, 5)), requires_grad=True)
        try:
            gradcheck(lambda t: sigmoid_class()(t), [x])
        except GradcheckError as error:
            raise _Fail(str(error))

    return _report("Sigmoid", [("forward", forward), ("backward", backward), ("gradcheck", finite_differences)])


# --------------------------------------------------------------------------- 02: im2col
def check_im2col(im2col, conv2d=None) -> bool:
    """Notebook 02: ``im2col(x, kh, kw, stride, padding)`` -> (N, C, kh, kw, Ho, Wo) as ``F.im2col``;
    optionally ``conv2d(x, w, stride, padding)`` built on it, against ``F.conv2d``."""
    rng = np.random.default_rng(1)
    configs = [((1, 1, 4, 4), 3, 3, 1, 0), ((2, 3, 5, 6), 3, 3, 1, 1), ((1, 2, 7, 7), 3, 3, 2, 1),
               ((1, 2, 6, 5), 2, 3, 2, 0)]

    def case(shape, kh, kw, stride, padding):
        def run():
            x = rng.standard_normal(shape)
            expected = F.im2col(x, (kh, kw), (stride, stride), (padding, padding), (1, 1))

            def hint(got, exp):
                if padding and got.shape == exp.shape and np.allclose(got[..., 1:-1, 1:-1], exp[..., 1:-1, 1:-1]):
                    return "the interior is right: check the zero padding at the border"
                return None
            got = im2col(x, kh, kw, stride, padding)
            if np.shape(got) != expected.shape:
                H, W = shape[2:]
                raise _Fail(f"shape {np.shape(got)}, expected {expected.shape}: the output size is "
                            f"(H + 2p - k) // s + 1 = ({H} + {2 * padding} - {kh}) // {stride} + 1")
            _compare(got, expected, "columns", hint)
            if conv2d is not None:
                w = rng.standard_normal((4, shape[1], kh, kw))
                _compare(conv2d(x, w, stride, padding), F.conv2d(Tensor(x), Tensor(w), stride=stride, padding=padding),
                         "conv2d built on your im2col")
        return f"{shape} k{kh}x{kw} s{stride} p{padding}", run

    return _report("im2col", [case(*c) for c in configs])


# --------------------------------------------------------------------------- 03: max-pool backward, interpolation
def check_max_pool_backward(max_pool_backward) -> bool:
    """Notebook 03: ``max_pool_backward(x, grad_out, k, stride)`` (no padding) -> dL/dx, as F.max_pool2d's."""
    rng = np.random.default_rng(2)

    def reference(x, g, k, s):
        xt = Tensor(x, requires_grad=True)
        F.max_pool2d(xt, k, s).backward(g)
        return xt.grad

    def case(label, x, k, s):
        def run():
            g = rng.standard_normal(F.max_pool2d(Tensor(x), k, s).shape)
            expected = reference(x, g, k, s)

            def hint(got, exp):
                if "overlap" in label:
                    return "a pixel that is the max of several windows must get the SUM of their gradients (+=, not =)"
                if "tie" in label:
                    return "with a tie the whole gradient goes to the first max in row-major order (np.argmax's rule)"
                return None
            _compare(max_pool_backward(x, g, k, s), expected, "dL/dx", hint)
        return label, run

    ties = np.zeros((1, 1, 4, 4))
    ties[0, 0, 1, 1] = ties[0, 0, 1, 0] = ties[0, 0, 0, 1] = 1.0
    return _report("max_pool_backward", [
        case("2x2 stride 2", rng.standard_normal((2, 2, 4, 6)), 2, 2),
        case("3x3 stride 1, overlapping windows", rng.standard_normal((1, 2, 5, 5)), 3, 1),
        case("2x2 stride 2 with ties", ties, 2, 2)])


def check_interpolation_matrix(interpolation_matrix) -> bool:
    """Notebook 03: ``interpolation_matrix(n_in, n_out, align_corners)`` -> (n_out, n_in), as F's."""
    def case(n_in, n_out, align_corners):
        def run():
            expected = F.interpolation_matrix(n_in, n_out, align_corners)

            def hint(got, exp):
                if not np.allclose(got.sum(axis=1), 1):
                    return "every row must sum to 1 (the weights 1 - lambda and lambda)"
                if np.allclose(got, F.interpolation_matrix(n_in, n_out, not align_corners)):
                    return "this is the other align_corners convention"
                if not align_corners:
                    return "with align_corners=False, src = (o + 0.5) * n_in / n_out - 0.5, clamped at 0 and at n_in - 1"
                return "with align_corners=True, src = o * (n_in - 1) / (n_out - 1)"
            _compare(interpolation_matrix(n_in, n_out, align_corners), expected, "A", hint)
        return f"{n_in} -> {n_out}, align_corners={align_corners}", run

    return _report("interpolation_matrix", [case(*c) for c in
                                            ((4, 7, True), (4, 7, False), (8, 4, False), (8, 3, True), (5, 5, False))])


# --------------------------------------------------------------------------- 04: RCU and CRP
def check_rcu(rcu_forward) -> bool:
    """Notebook 04: ``rcu_forward(x, w1, b1, w2)`` (Tensors) -> the ResidualConvUnit's output."""
    from .models.refinenet import ResidualConvUnit
    rng = np.random.default_rng(3)
    unit = ResidualConvUnit(3, rng=rng).astype(np.float64)
    x = Tensor(rng.standard_normal((2, 3, 6, 6)))
    w1, b1, w2 = unit.conv1.weight, unit.conv1.bias, unit.conv2.weight

    def forward():
        branch = unit.conv2(F.relu(unit.conv1(F.relu(x)))).data

        def hint(got, exp):
            if np.allclose(got, branch):
                return "this is the branch alone: add the input back (the shortcut)"
            if np.allclose(got, x.data + unit.conv2(F.relu(unit.conv1(x))).data):
                return "the first ReLU is missing (RCU starts with relu(x))"
            return None
        _compare(rcu_forward(x, w1, b1, w2), unit(x), "RCU(x)", hint)

    def backward():
        xt = Tensor(x.data.copy(), requires_grad=True)
        try:
            gradcheck(lambda t: rcu_forward(t, w1, b1, w2), [xt], n_samples=20)
        except GradcheckError as error:
            raise _Fail(f"{error} (build it from tinyrefine.functional ops so the engine records it)")

    return _report("RCU", [("forward", forward), ("gradcheck", backward)])


def check_crp(crp_forward) -> bool:
    """Notebook 04: ``crp_forward(x, weights, improved)`` -> ChainedResidualPooling's output."""
    from .models.refinenet import ChainedResidualPooling
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((1, 2, 7, 7)))

    def case(n_blocks, improved):
        def run():
            crp = ChainedResidualPooling(2, n_blocks, improved=improved, rng=rng).astype(np.float64)
            weights = [conv.weight for conv in crp.convs]
            h = F.relu(x)
            path, last = h, None
            for w in weights:
                last = path = F.max_pool2d(F.conv2d(path, w, padding=1), 5, 1, 2) if improved else \
                    F.conv2d(F.max_pool2d(path, 5, 1, 2), w, padding=1)
            crp.improved = not improved
            other_order = crp(x)
            crp.improved = improved
            unchained = h.data + sum(F.conv2d(F.max_pool2d(h, 5, 1, 2), w, padding=1).data for w in weights)

            def hint(got, exp):
                if np.allclose(got, last.data):
                    return "you return the last link only: every link is ADDED onto relu(x)"
                if n_blocks > 1 and not improved and np.allclose(got, unchained):
                    return "each link must pool the previous link's output (a chain), not relu(x) again"
                if np.allclose(got, other_order.data):
                    return "this is the other order (paper: pool then conv; improved: conv then pool)"
                return "check the order (paper: pool then conv; improved: conv then pool) and the leading ReLU"
            _compare(crp_forward(x, weights, improved), crp(x), "CRP(x)", hint)
        return f"{n_blocks} blocks, improved={improved}", run

    return _report("CRP", [case(1, False), case(4, False), case(4, True)])


# --------------------------------------------------------------------------- 05: zero init
def check_zero_init(zero_init) -> bool:
    """Notebook 05: ``zero_init(model)`` zeroes each RCU's conv2 and each CRP conv, and nothing else."""
    from .models import RefineNet

    def run():
        kwargs = dict(num_classes=3, encoder="resnet18", encoder_width=4, features=4, seed=0)
        mine, reference = RefineNet(**kwargs), RefineNet(**kwargs)
        zero_init(mine)
        reference.zero_init_residual_branches()
        expected = dict(reference.named_parameters())
        too_many = [n for n, p in mine.named_parameters() if not p.data.any() and expected[n].data.any()]
        missed = [n for n, p in mine.named_parameters() if p.data.any() and not expected[n].data.any()]
        if missed:
            raise _Fail(f"{len(missed)} weights should be zero but are not, e.g. {missed[:3]}")
        if too_many:
            raise _Fail(f"{len(too_many)} weights are zero that should not be, e.g. {too_many[:3]} "
                        "(only the LAST conv of each residual branch)")
        for name, p in mine.named_parameters():
            _compare(p.data, expected[name].data, name)

    return _report("zero_init", [("every parameter", run)])


# --------------------------------------------------------------------------- 06: a training step, warm-up + poly
def check_train_step(train_step) -> bool:
    """Notebook 06: ``train_step(model, optimizer, images, masks, micro_batches)`` -> the batch's loss, after one
    optimiser step on the whole batch, its gradient accumulated over ``micro_batches`` equal slices. Checked
    against a plain full-batch step (forward, cross-entropy with ignore_index 255, zero_grad, backward, step).
    SGD, not Adam: Adam's step barely changes when the gradient is scaled, so it would hide a missing 1/k."""
    from .models import RefineNet
    from .optim import SGD

    def setup():
        model = RefineNet(3, "resnet18", encoder_width=4, features=4, seed=0).astype(np.float64)  # BN frozen
        return model, SGD(model.parameters(), lr=0.1, momentum=0.9)

    def reference_step(model, optimizer, images, masks) -> float:
        loss = F.cross_entropy(model(Tensor(images)), masks, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.item())

    rng = np.random.default_rng(10)
    batches = [(rng.standard_normal((2, 3, 32, 32)), rng.integers(0, 3, (2, 32, 32))) for _ in range(2)]
    for _, masks in batches:
        masks[:, :, :3] = 255   # the same number of ignored pixels in every image, so slices weigh equally

    def case(micro_batches):
        def run():
            mine, reference = setup(), setup()
            before = {n: p.data.copy() for n, p in mine[0].named_parameters()}
            for step, (images, masks) in enumerate(batches):
                got = train_step(*mine, images, masks, micro_batches)
                expected = reference_step(*reference, images, masks)
                moved = [n for n, p in mine[0].named_parameters() if not np.array_equal(p.data, before[n])]
                if step == 0 and not moved:
                    raise _Fail("no weight changed: call optimizer.step() after backward(), and do not clear the "
                                "gradients (zero_grad) between backward() and step()")
                _compare(np.asarray(float(got.item() if isinstance(got, Tensor) else got)), np.asarray(expected),
                         f"returned loss at step {step + 1}",
                         lambda g, e: "return the loss of the WHOLE batch: the mean of the equal slices' losses")

                def hint(g, e, step=step):
                    if step == 1:
                        return ("the first step was right, the second is not: the gradients of the previous call "
                                "were still there. Call optimizer.zero_grad() before the first backward()")
                    if micro_batches > 1:
                        return ("accumulate by calling backward() once per slice on loss / micro_batches, with no "
                                "zero_grad() between the slices; step() once, after the last slice")
                    return None
                for name, p in reference[0].named_parameters():
                    _compare(dict(mine[0].named_parameters())[name].data, p.data, f"{name} after step {step + 1}", hint)
        return f"{micro_batches} micro-batch{'es' if micro_batches > 1 else ''}, 2 steps", run

    return _report("train_step", [case(1), case(2)])


def check_warmup_poly(lr_at) -> bool:
    """Notebook 06: ``lr_at(base_lr, iteration, max_iter, warmup, power)``, iterations counted from 0, as
    ``tinyrefine.optim.PolyLR``: poly decay times a linear warm-up factor min(1, (iteration + 1) / warmup)."""
    from .nn import Parameter
    from .optim import SGD, PolyLR, poly_lr

    def run():
        optimizer = SGD([Parameter(np.zeros(1))], lr=0.01)
        schedule = PolyLR(optimizer, max_iter=1000, power=0.9, warmup=100)
        for it in (0, 1, 49, 98, 99, 100, 500, 999):
            schedule.step(it)

            def hint(got, exp, it=it):
                if np.isclose(got, poly_lr(0.01, it, 1000, 0.9)):
                    return "that is poly alone: during warm-up multiply it by (iteration + 1) / warmup"
                if it == 0 and got == 0:
                    return ("iteration 0 must already take a step: the factor is (iteration + 1) / warmup, "
                            "not iteration / warmup")
                if it >= 100:
                    return "after warm-up the factor stays 1: min(1, (iteration + 1) / warmup)"
                return "lr = base_lr * min(1, (iteration + 1) / warmup) * (1 - iteration / max_iter) ** power"
            _compare(np.asarray(lr_at(0.01, it, 1000, 100, 0.9)), np.asarray(optimizer.param_groups[0]["lr"]),
                     f"lr at iteration {it}", hint)

    return _report("warmup_poly", [("base 0.01, 1000 iterations, warm-up 100, power 0.9", run)])


# --------------------------------------------------------------------------- 07: the cost of a conv, by hand
def _conv_relu(c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int):
    from .nn import Conv2d, Module, ReLU

    class ConvReLU(Module):
        def __init__(self):
            self.conv = Conv2d(c_in, c_out, k, stride, padding, dilation=dilation, rng=np.random.default_rng(0))
            self.relu = ReLU()

        def forward(self, x):
            return self.relu(self.conv(x))
    return ConvReLU()


_CONV_CASES = [((1, 3, 8, 8), 4, 3, 1, 1, 1), ((2, 3, 9, 10), 8, 3, 2, 1, 1), ((1, 4, 12, 11), 6, 3, 1, 2, 2),
               ((2, 5, 7, 7), 3, 1, 1, 0, 1)]


def _conv_label(shape, c_out, k, stride, padding, dilation) -> str:
    return f"{shape} -> {c_out} ch, k{k} s{stride} p{padding} d{dilation}"


def check_conv_flops(conv_flops) -> bool:
    """Notebook 07: ``conv_flops(input_shape, c_out, k, stride, padding, dilation)`` -> FLOPs of a k x k conv
    (2 x multiply-adds, bias left out), as ``summary.count_flops``."""
    from .functional.common import _out_size
    from .summary import count_flops

    def case(shape, c_out, k, stride, padding, dilation):
        def run():
            expected = count_flops(_conv_relu(shape[1], c_out, k, stride, padding, dilation), shape)
            n, c_in, h, w = shape
            ho, wo = _out_size(h, k, stride, padding, dilation), _out_size(w, k, stride, padding, dilation)

            def hint(got, exp):
                if np.isclose(got, exp / 2):
                    return "count 2 FLOPs per multiply-add (a multiply and an add)"
                if np.isclose(got, 2 * n * c_out * h * w * c_in * k * k):
                    return "that uses the INPUT size: count one multiply-add per OUTPUT pixel"
                undilated = _out_size(h, k, stride, padding, 1) * _out_size(w, k, stride, padding, 1)
                if dilation > 1 and np.isclose(got, 2 * n * c_out * c_in * k * k * undilated):
                    return ("dilation d spreads the kernel over d * (k - 1) + 1 pixels: "
                            "H_out = (H + 2p - d(k-1) - 1) // s + 1")
                if np.isclose(got, 2 * c_out * ho * wo * c_in * k * k) and n > 1:
                    return "every image of the batch costs the same again: multiply by N"
                return f"output {ho}x{wo}; FLOPs = 2 * N * C_out * H_out * W_out * C_in * k * k"
            _compare(np.asarray(float(conv_flops(shape, c_out, k, stride, padding, dilation))), np.asarray(expected),
                     "FLOPs", hint)
        return _conv_label(shape, c_out, k, stride, padding, dilation), run

    return _report("conv_flops", [case(*c) for c in _CONV_CASES])


def check_conv_relu_memory(conv_relu_bytes) -> bool:
    """Notebook 07: ``conv_relu_bytes(input_shape, c_out, k, stride, padding, dilation, itemsize)`` ->
    (bytes the conv keeps, bytes the ReLU after it keeps) in a training forward, as ``viz.activation_memory``
    counts them without the parameters: the conv keeps its input and its output, the ReLU its mask (one byte
    per element) and its output."""
    from .viz import activation_memory

    def case(shape, c_out, k, stride, padding, dilation, dtype):
        def run():
            model = _conv_relu(shape[1], c_out, k, stride, padding, dilation).astype(dtype)
            rows = dict(activation_memory(model, np.zeros(shape, dtype=dtype), include_parameters=False))
            size = np.dtype(dtype).itemsize
            got = conv_relu_bytes(shape, c_out, k, stride, padding, dilation, size)
            if np.shape(got) != (2,):
                raise _Fail(f"return two numbers (conv bytes, ReLU bytes), got {got!r}")
            n, c_in, h, w = shape
            elements = rows["relu"] // (size + 1)        # the ReLU keeps a one-byte mask and its output
            out = elements * size                           # the bytes of the conv's (and the ReLU's) output

            def conv_hint(g, e):
                if np.isclose(g, out):
                    return "the conv keeps its INPUT for backward (dL/dw needs it), besides its output"
                if np.isclose(g, n * c_in * h * w * size):
                    return "the conv's output counts too: the graph holds it until the ReLU has used it"
                return "conv: input N*C_in*H*W + output N*C_out*H_out*W_out elements, itemsize bytes each"

            def relu_hint(g, e):
                if np.isclose(g, 2 * out):
                    return "the ReLU's mask x > 0 is boolean: one byte per element, not itemsize"
                if np.isclose(g, out):
                    return "the ReLU also keeps its mask x > 0 (one byte per element) for backward"
                return "ReLU: a one-byte mask plus the output, N*C_out*H_out*W_out elements each"
            _compare(np.asarray(float(got[0])), np.asarray(rows["conv"]), "conv bytes", conv_hint)
            _compare(np.asarray(float(got[1])), np.asarray(rows["relu"]), "ReLU bytes", relu_hint)
        return f"{_conv_label(shape, c_out, k, stride, padding, dilation)}, {np.dtype(dtype).name}", run

    return _report("conv_relu_bytes", [case(*c, np.float32) for c in _CONV_CASES[:3]] +
                   [case(*_CONV_CASES[3], np.float64)])


# --------------------------------------------------------------------------- 08: loss and optimisation
def check_cross_entropy(cross_entropy) -> bool:
    """Notebook 08: ``cross_entropy(logits, target, ignore_index)`` -> (loss, dL/dlogits), NumPy arrays in and out,
    as ``F.cross_entropy`` (mean over the pixels whose label is not ignore_index)."""
    rng = np.random.default_rng(5)

    def case(label, scale, ignored):
        def run():
            logits = rng.standard_normal((2, 3, 4, 5)) * scale
            target = rng.integers(0, 3, (2, 4, 5))
            if ignored:
                target[:, 0] = 255
            x = Tensor(logits, requires_grad=True)
            loss = F.cross_entropy(x, target, ignore_index=255)
            loss.backward()
            got_loss, got_grad = cross_entropy(logits, target, 255)
            valid = target != 255

            def loss_hint(got, exp):
                if ignored and np.isclose(float(got), float(exp) * valid.sum() / valid.size):
                    return "you divide by all pixels: the mean is over the pixels that are NOT ignored"
                if not np.isfinite(float(got)):
                    return "overflow: subtract the max logit per pixel before exp (log-sum-exp)"
                return None

            def grad_hint(got, exp):
                if ignored and np.abs(got[:, :, 0]).max() > 0:
                    return "ignored pixels must get a zero gradient"
                if not np.all(np.isfinite(got)):
                    return "overflow: compute softmax as exp(z - max z) / sum exp(z - max z)"
                if np.allclose(got * valid.sum(), exp * valid.sum() * valid.sum()):
                    return "the gradient is (softmax - onehot) / (number of valid pixels)"
                return None
            _compare(np.asarray(got_loss), loss.data, "loss", loss_hint)
            _compare(got_grad, x.grad, "dL/dlogits", grad_hint)
        return label, run

    return _report("cross_entropy", [case("no ignored pixels", 1.0, False), case("with ignored pixels", 1.0, True),
                                     case("large logits (x1000)", 1000.0, True)])


def check_sgd_step(sgd_step) -> bool:
    """Notebook 08: ``sgd_step(p, grad, velocity, lr, momentum, weight_decay)`` -> (new p, new velocity), with
    velocity None before the first step: torch's SGD, as ``tinyrefine.optim.SGD``."""
    from .nn import Parameter
    from .optim import SGD
    rng = np.random.default_rng(6)

    def run():
        start = rng.standard_normal(5)
        param = Parameter(start.copy())
        optimizer = SGD([param], lr=0.1, momentum=0.9, weight_decay=0.01)
        p, velocity = start.copy(), None
        for step in range(3):
            grad = rng.standard_normal(5)
            param.grad = grad.copy()
            optimizer.step()
            before = p.copy()
            p, velocity = sgd_step(p, grad, velocity, 0.1, 0.9, 0.01)

            def hint(got, exp, step=step, before=before, grad=grad):
                if step == 0 and np.allclose(got, before - 0.1 * 0.1 * (grad + 0.01 * before)):
                    return "torch starts the velocity at the first gradient itself, not at (1 - momentum) * g or 0"
                return "v = momentum * v + (g + weight_decay * p); p = p - lr * v  (weight decay inside the velocity)"
            _compare(p, param.data, f"p after step {step + 1}", hint)

    return _report("sgd_step", [("3 steps, momentum 0.9, weight decay 0.01", run)])


def check_poly_lr(poly) -> bool:
    """Notebook 08: ``poly(base_lr, iteration, max_iter, power)`` as ``tinyrefine.optim.poly_lr``."""
    from .optim import poly_lr

    def run():
        for it in (0, 1, 250, 999, 1000):
            _compare(poly(0.01, it, 1000, 0.9), poly_lr(0.01, it, 1000, 0.9), f"lr at iteration {it}",
                     lambda got, exp: "lr = base_lr * (1 - iteration / max_iter) ** power")

    return _report("poly", [("base 0.01, 1000 iterations, power 0.9", run)])


# --------------------------------------------------------------------------- 09: evaluation
def check_confusion_matrix(confusion_matrix) -> bool:
    """Notebook 09: ``confusion_matrix(pred, target, num_classes, ignore_index)`` -> (K, K) counts, rows = truth."""
    from . import metrics
    rng = np.random.default_rng(7)

    def case(label, ignored):
        def run():
            target = rng.integers(0, 4, (2, 6, 7))
            pred = rng.integers(0, 4, (2, 6, 7))
            if ignored:
                target[:, :, 0] = 255

            def hint(got, exp):
                if np.array_equal(got, exp.T):
                    return "rows are the TRUE class, columns the prediction (cm[t, p])"
                if ignored and got.sum() == target.size:
                    return "pixels whose target is ignore_index must not be counted"
                return None
            _compare(confusion_matrix(pred, target, 4, 255), metrics.confusion_matrix(pred, target, 4, 255), "cm", hint)
        return label, run

    return _report("confusion_matrix", [case("no ignored pixels", False), case("with ignored pixels", True)])


def check_iou(iou_from_confusion) -> bool:
    """Notebook 09: ``iou_from_confusion(cm)`` -> (per-class IoU with NaN for absent classes, mean IoU)."""
    from . import metrics
    cm = np.array([[50, 2, 3, 0], [4, 10, 0, 0], [6, 0, 20, 0], [0, 0, 0, 0]])

    def run():
        per_class, mean = iou_from_confusion(cm)
        per_class = np.asarray(per_class, dtype=np.float64)
        expected = metrics.per_class_iou(cm)
        if per_class.shape != expected.shape:
            raise _Fail(f"per-class IoU has shape {per_class.shape}, expected {expected.shape}")
        if not np.isnan(per_class[3]):
            raise _Fail("class 3 never occurs (in truth or prediction): its IoU is undefined (NaN), not "
                        f"{per_class[3]}, and it must not enter the mean")
        recall = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)

        def hint(got, exp):
            if np.allclose(got[:3], recall[:3]):
                return "that is TP / (TP + FN) (recall): IoU's denominator also counts the false positives"
            return "IoU = TP / (TP + FP + FN) = cm[c, c] / (row c + column c - cm[c, c])"
        _compare(np.nan_to_num(per_class, nan=-1), np.nan_to_num(expected, nan=-1), "per-class IoU", hint)
        _compare(np.asarray(mean), metrics.mean_iou(cm), "mean IoU",
                 lambda got, exp: "average over the classes that occur only (nanmean)")

    return _report("iou", [("4 classes, one absent", run)])


# --------------------------------------------------------------------------- 10: batch normalisation
def check_batch_norm(batch_norm_train) -> bool:
    """Notebook 10: ``batch_norm_train(x, gamma, beta, eps)`` -> training-mode BN output (batch statistics,
    per channel over N, H, W, biased variance), as ``F.batch_norm(..., training=True)``."""
    rng = np.random.default_rng(8)

    def run():
        x = rng.standard_normal((4, 3, 5, 5)) * 3 + 2
        gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
        expected = F.batch_norm(Tensor(x), None, None, Tensor(gamma), Tensor(beta), training=True, eps=1e-5)
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        c = lambda a: a[None, :, None, None]

        def hint(got, exp):
            per_image = (x - x.mean(axis=(2, 3), keepdims=True)) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
            if np.allclose(got, per_image * c(gamma) + c(beta)):
                return "the statistics are per channel over the whole batch: axes (0, 2, 3), not per image"
            if np.allclose(got, (x - c(mean)) / np.sqrt(c(x.var(axis=(0, 2, 3), ddof=1)) + 1e-5) * c(gamma) + c(beta)):
                return "normalise with the biased variance (ddof=0); the unbiased one only goes into the running average"
            return None
        _compare(batch_norm_train(x, gamma, beta, 1e-5), expected, "BN(x)", hint)

    return _report("batch_norm", [("(4, 3, 5, 5)", run)])


def check_fold_bn(fold_bn) -> bool:
    """Notebook 10: ``fold_bn(w, b, gamma, beta, mean, var, eps)`` -> (w', b') with
    conv(x, w', b') == eval-mode BN(conv(x, w, b))."""
    rng = np.random.default_rng(9)

    def run():
        w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
        gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
        mean, var = rng.standard_normal(4), rng.random(4) + 0.5
        x = Tensor(rng.standard_normal((2, 3, 6, 6)))
        expected = F.batch_norm(F.conv2d(x, Tensor(w), Tensor(b), padding=1), mean, var, Tensor(gamma), Tensor(beta),
                                training=False, eps=1e-5)
        w2, b2 = fold_bn(w, b, gamma, beta, mean, var, 1e-5)
        if np.shape(w2) != w.shape or np.shape(b2) != b.shape:
            raise _Fail(f"shapes {np.shape(w2)}, {np.shape(b2)}: expected {w.shape}, {b.shape} (scale each OUTPUT channel)")
        scale = gamma / np.sqrt(var + 1e-5)

        def hint(got, exp):
            if np.allclose(np.asarray(b2), beta - mean * scale):
                return "the conv's own bias b is normalised too: b' = (b - mean) * scale + beta"
            if np.allclose(np.asarray(w2), w * scale[None, :, None, None]):
                return "scale along the output channels: w[o] * scale[o]"
            return "scale = gamma / sqrt(var + eps); w' = w * scale[o]; b' = (b - mean) * scale + beta"
        _compare(F.conv2d(x, Tensor(np.asarray(w2)), Tensor(np.asarray(b2)), padding=1), expected,
                 "conv with the folded weights", hint)

    return _report("fold_bn", [("conv 3 -> 4, 3x3", run)])


# --------------------------------------------------------------------------- 12: fast convolution (Winograd)
def _correlate(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Direct 'valid' correlation y[j] = sum_k g[k] d[j + k] (1-D or 2-D), the definition the checks compare with."""
    if d.ndim == 1:
        return np.array([g @ d[j:j + len(g)] for j in range(len(d) - len(g) + 1)])
    k = g.shape[0]
    return np.array([[np.sum(g * d[i:i + k, j:j + k]) for j in range(d.shape[1] - k + 1)] for i in range(d.shape[0] - k + 1)])


def check_winograd_f23(f23) -> bool:
    """Notebook 12: ``f23(d, g)`` -> the 2 outputs of the 3-tap correlation of the 4 inputs ``d`` with ``g``,
    computed by the transforms y = A^T [(G g) * (B^T d)] (4 multiplications instead of 6)."""
    rng = np.random.default_rng(12)

    def case(d, g):
        def run():
            expected = _correlate(d, g)

            def hint(got, exp):
                if np.allclose(got, _correlate(d, g[::-1])):
                    return "that is a convolution (the filter flipped): the layer correlates, y[j] = sum_k g[k] d[j+k]"
                if np.allclose(got, -exp):
                    return "the sign is flipped: check the signs of one row of G or B^T against its partner"
                return "y = A^T @ ((G @ g) * (B^T @ d)): G has 4 rows, B^T is 4 x 4, A^T is 2 x 4"
            _compare(f23(d.copy(), g.copy()), expected, "F(2,3) output", hint)
        return run

    d, g = rng.standard_normal(4), rng.standard_normal(3)
    return _report("winograd_f23", [("random d, g", case(d, g)), ("ramp d, asymmetric g", case(np.arange(1.0, 5.0),
                                                                                                np.array([1.0, -2.0, 0.5])))])


def check_winograd_tile(tile_2d) -> bool:
    """Notebook 12: ``tile_2d(d, g)`` -> the 2x2 output tile of a 4x4 input tile ``d`` and a 3x3 filter ``g``,
    by the nested transforms Y = A^T [(G g G^T) * (B^T d B)] A."""
    rng = np.random.default_rng(13)

    def run():
        d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
        expected = _correlate(d, g)

        def hint(got, exp):
            if np.allclose(got, exp.T):
                return "the output is transposed: Y = A^T M A, with M = U * V (rows of d along the first axis)"
            if np.allclose(got, _correlate(d, g.T)):
                return "the filter is transposed: U = G g G^T (not G g^T G^T)"
            return "U = G g G^T (4x4), V = B^T d B (4x4), Y = A^T (U * V) A (2x2)"
        _compare(tile_2d(d.copy(), g.copy()), expected, "F(2x2,3x3) tile", hint)

    return _report("winograd_tile", [("4x4 tile, 3x3 filter", run)])


# --------------------------------------------------------------------------- 11: atrous rates and the map size
def check_valid_weight_fraction(valid_weight_fraction) -> bool:
    """Notebook 11: ``valid_weight_fraction(size, rate)`` -> the share of a 3x3 conv's 9 weights that land on a
    size x size map rather than on its zero padding, averaged over the output pixels, for dilation = padding =
    ``rate`` and stride 1 (DeepLabv3's Fig. 4). Checked against a count over every pixel and every tap."""
    def counted(size: int, rate: int) -> float:
        inside = [sum(0 <= i + offset < size for offset in (-rate, 0, rate)) for i in range(size)]
        return sum(a * b for a in inside for b in inside) / (9 * size * size)

    def case(size: int, rate: int):
        def run():
            expected = counted(size, rate)

            def hint(got, exp):
                if np.isclose(got, 1.0):
                    return "a weight on the zero padding multiplies 0 and does not count"
                if np.isclose(got, np.sqrt(exp)):
                    return "that is one axis; a tap is on the map only when its row AND its column are: multiply"
                if got < 1 / 9 - ATOL:
                    return "the centre tap is always on the map: the share never drops below 1/9 (count at least 0)"
                if np.isclose(got, (exp * 9 * size * size - size * size) / (8 * size * size)):
                    return "count all 9 taps, the centre one included, and divide by 9"
                return "per axis, a pixel i has taps at i - rate, i and i + rate; count those inside 0..size-1"
            _compare(np.asarray(float(valid_weight_fraction(size, rate))), np.asarray(expected), "share", hint)
        return f"size {size}, rate {rate}", run

    cases = [(7, 1), (32, 6), (32, 12), (32, 24), (32, 36), (65, 24), (9, 9)]
    return _report("valid_weight_fraction", [case(*c) for c in cases])
