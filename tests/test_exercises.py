"""The notebooks' exercise checks (tinyrefine.exercises) and the student/solution notebook pairs."""
import subprocess
import sys
from pathlib import Path

import numpy as np

import tinyrefine.functional as F
from tinyrefine import exercises
from tinyrefine.engine import Function
from tinyrefine.models.refinenet import ChainedResidualPooling, ResidualConvUnit

ROOT = Path(__file__).resolve().parent.parent


def stub(*args, **kwargs):
    raise NotImplementedError


def test_a_stub_is_reported_as_not_attempted(capsys):
    for check in (exercises.check_im2col, exercises.check_max_pool_backward, exercises.check_interpolation_matrix,
                  exercises.check_rcu, exercises.check_crp, exercises.check_zero_init):
        assert check(stub) is False
    assert capsys.readouterr().out.count("not attempted yet") == 6


def test_sigmoid_check_names_the_mistake(capsys):
    class Good(Function):
        def forward(self, x):
            self.y = 1 / (1 + np.exp(-x))
            return self.y

        def backward(self, gy):
            return self.y * (1 - self.y) * gy

    class MissingFactor(Good):
        def backward(self, gy):
            return self.y * gy

    assert exercises.check_sigmoid(Good)
    assert not exercises.check_sigmoid(MissingFactor)
    assert "derivative is sigma * (1 - sigma)" in capsys.readouterr().out


def test_max_pool_check_catches_overwriting_and_ties(capsys):
    def backward(x, g, k, s, accumulate=True, last_tie=False):
        dx = np.zeros_like(x)
        for n, c, i, j in np.ndindex(*g.shape):
            w = x[n, c, i * s:i * s + k, j * s:j * s + k]
            flat = w.size - 1 - np.argmax(w.ravel()[::-1]) if last_tie else np.argmax(w)
            p, q = np.unravel_index(flat, w.shape)
            if accumulate:
                dx[n, c, i * s + p, j * s + q] += g[n, c, i, j]
            else:
                dx[n, c, i * s + p, j * s + q] = g[n, c, i, j]
        return dx

    assert exercises.check_max_pool_backward(backward)
    assert not exercises.check_max_pool_backward(lambda *a: backward(*a, accumulate=False))
    assert "SUM of their gradients" in capsys.readouterr().out
    assert not exercises.check_max_pool_backward(lambda *a: backward(*a, last_tie=True))
    assert "first max in row-major order" in capsys.readouterr().out


def test_interpolation_and_im2col_checks():
    assert exercises.check_interpolation_matrix(F.interpolation_matrix)
    assert not exercises.check_interpolation_matrix(lambda i, o, ac: F.interpolation_matrix(i, o, not ac))

    def im2col(x, kh, kw, s, p):
        return F.im2col(x, (kh, kw), (s, s), (p, p), (1, 1))
    assert exercises.check_im2col(im2col)
    assert not exercises.check_im2col(lambda x, kh, kw, s, p: im2col(x, kh, kw, s, 0))


def test_rcu_crp_zero_init_checks(capsys):
    def rcu(x, w1, b1, w2):
        return F.add(x, F.conv2d(F.relu(F.conv2d(F.relu(x), w1, b1, padding=1)), w2, padding=1))
    assert exercises.check_rcu(rcu)
    assert not exercises.check_rcu(lambda x, w1, b1, w2: F.conv2d(F.relu(F.conv2d(F.relu(x), w1, b1, padding=1)),
                                                                w2, padding=1))
    assert "add the input back" in capsys.readouterr().out

    def crp(x, weights, improved):
        module = ChainedResidualPooling(x.shape[1], len(weights), improved=improved).astype(np.float64)
        for conv, w in zip(module.convs, weights):
            conv.weight = w
        return module(x)
    assert exercises.check_crp(crp)
    assert not exercises.check_crp(lambda x, weights, improved: crp(x, weights, not improved))
    assert "other order" in capsys.readouterr().out

    def zero_all(model):
        for m in model.modules():
            if isinstance(m, ResidualConvUnit):
                m.conv1.weight.data[...] = 0
                m.conv2.weight.data[...] = 0
    assert exercises.check_zero_init(lambda model: model.zero_init_residual_branches())
    assert not exercises.check_zero_init(zero_all)


def test_student_notebooks_are_generated_from_the_solutions():
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "make_student.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    solutions = sorted(p.name for p in (ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    assert solutions and all((ROOT / "notebooks" / name).exists() for name in solutions)


def test_loss_and_optimisation_checks(capsys):
    import tinyrefine as tr
    from tinyrefine.optim import poly_lr

    def ce(logits, target, ignore_index, divide_by_all=False):
        x = tr.Tensor(logits, requires_grad=True)
        loss = F.cross_entropy(x, target, ignore_index=ignore_index)
        loss.backward()
        if divide_by_all:
            n_valid, n = (target != ignore_index).sum(), target.size
            return loss.item() * n_valid / n, x.grad * n_valid / n
        return loss.item(), x.grad
    assert exercises.check_cross_entropy(ce)
    assert not exercises.check_cross_entropy(lambda *a: ce(*a, divide_by_all=True))
    assert "NOT ignored" in capsys.readouterr().out

    def sgd(p, g, v, lr, mu, wd, decay_outside=False):
        v = (g.copy() if v is None else mu * v + g) if decay_outside else \
            ((g + wd * p).copy() if v is None else mu * v + g + wd * p)
        return (p - lr * v - (lr * wd * p if decay_outside else 0)), v
    assert exercises.check_sgd_step(sgd)
    assert not exercises.check_sgd_step(lambda *a: sgd(*a, decay_outside=True))
    assert exercises.check_poly_lr(poly_lr)
    assert not exercises.check_poly_lr(lambda b, i, m, p: b * (1 - i / m) ** 2)
    assert exercises.check_cross_entropy(stub) is False


def test_evaluation_and_batch_norm_checks(capsys):
    from tinyrefine import metrics
    assert exercises.check_confusion_matrix(metrics.confusion_matrix)
    assert not exercises.check_confusion_matrix(lambda p, t, k, i: metrics.confusion_matrix(p, t, k, i).T)
    assert "rows are the TRUE class" in capsys.readouterr().out
    assert exercises.check_iou(lambda cm: (metrics.per_class_iou(cm), metrics.mean_iou(cm)))
    assert not exercises.check_iou(lambda cm: (np.nan_to_num(metrics.per_class_iou(cm)), 0.5))

    def bn(x, g, b, eps, ddof=0):
        mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), ddof=ddof, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * g[None, :, None, None] + b[None, :, None, None]
    assert exercises.check_batch_norm(bn)
    assert not exercises.check_batch_norm(lambda *a: bn(*a, ddof=1))
    assert "biased variance" in capsys.readouterr().out

    def fold(w, b, g, beta, mean, var, eps, keep_bias=True):
        s = g / np.sqrt(var + eps)
        return w * s[:, None, None, None], ((b - mean) * s if keep_bias else -mean * s) + beta
    assert exercises.check_fold_bn(fold)
    assert not exercises.check_fold_bn(lambda *a: fold(*a, keep_bias=False))
    assert "own bias b is normalised too" in capsys.readouterr().out


def test_training_step_and_warmup_checks(capsys):
    import tinyrefine as tr
    from tinyrefine.optim import poly_lr

    def train_step(model, optimizer, images, masks, micro_batches=1, mistake=None):
        if mistake != "no zero_grad":
            optimizer.zero_grad()
        size, total = len(images) // micro_batches, 0.0
        for start in range(0, len(images), size):
            loss = F.cross_entropy(model(tr.Tensor(images[start:start + size])), masks[start:start + size],
                                   ignore_index=255)
            (loss if mistake == "no 1/k" else loss / micro_batches).backward()
            total += loss.item() / micro_batches
        if mistake != "no step":
            optimizer.step()
        return total
    assert exercises.check_train_step(train_step)
    capsys.readouterr()
    assert not exercises.check_train_step(lambda *a: train_step(*a, mistake="no zero_grad"))
    assert "gradients of the previous call were still there" in capsys.readouterr().out
    assert not exercises.check_train_step(lambda *a: train_step(*a, mistake="no 1/k"))
    out = capsys.readouterr().out
    assert "1 micro-batch, 2 steps]: correct" in out and "loss / micro_batches" in out
    assert not exercises.check_train_step(lambda *a: train_step(*a, mistake="no step"))
    assert "no weight changed" in capsys.readouterr().out

    def lr_at(base_lr, iteration, max_iter, warmup, power, start_at_zero=False):
        ramp = min(1.0, (iteration + (0 if start_at_zero else 1)) / warmup)
        return base_lr * ramp * (1 - iteration / max_iter) ** power
    assert exercises.check_warmup_poly(lr_at)
    assert not exercises.check_warmup_poly(lambda *a: lr_at(*a, start_at_zero=True))
    assert "not iteration / warmup" in capsys.readouterr().out
    assert not exercises.check_warmup_poly(lambda b, i, m, w, p: poly_lr(b, i, m, p))
    assert "poly alone" in capsys.readouterr().out
    assert exercises.check_train_step(stub) is False and exercises.check_warmup_poly(stub) is False


def test_conv_cost_checks(capsys):
    def out_size(n, k, s, p, d):
        return (n + 2 * p - d * (k - 1) - 1) // s + 1

    def flops(shape, c_out, k, s, p, d, ignore_dilation=False):
        n, c_in, h, w = shape
        d = 1 if ignore_dilation else d
        return 2 * n * c_out * out_size(h, k, s, p, d) * out_size(w, k, s, p, d) * c_in * k * k
    assert exercises.check_conv_flops(flops)
    capsys.readouterr()
    assert not exercises.check_conv_flops(lambda *a: flops(*a) // 2)
    assert "2 FLOPs per multiply-add" in capsys.readouterr().out
    assert not exercises.check_conv_flops(lambda *a: flops(*a, ignore_dilation=True))
    assert "d * (k - 1) + 1" in capsys.readouterr().out

    def memory(shape, c_out, k, s, p, d, itemsize, mistake=None):
        n, c_in, h, w = shape
        out = n * c_out * out_size(h, k, s, p, d) * out_size(w, k, s, p, d)
        conv = out * itemsize + (0 if mistake == "no input" else n * c_in * h * w * itemsize)
        relu = out * itemsize + out * (itemsize if mistake == "float mask" else 1)
        return conv, relu
    assert exercises.check_conv_relu_memory(memory)
    capsys.readouterr()
    assert not exercises.check_conv_relu_memory(lambda *a: memory(*a, mistake="no input"))
    assert "keeps its INPUT" in capsys.readouterr().out
    assert not exercises.check_conv_relu_memory(lambda *a: memory(*a, mistake="float mask"))
    assert "one byte per element" in capsys.readouterr().out
    assert exercises.check_conv_flops(stub) is False and exercises.check_conv_relu_memory(stub) is False
