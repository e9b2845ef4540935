"""Optimizers against their formulas and against torch; the poly schedule; state round-trips."""
import numpy as np
import pytest

from tinyrefine.nn import Parameter
from tinyrefine.optim import SGD, Adam, PolyLR, poly_lr


def _params(rng, shapes=((3, 4), (5,))):
    return [Parameter(rng.standard_normal(s)) for s in shapes]


def _run(opt_cls, kwargs, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    params = _params(rng)
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]
    opt = opt_cls(params, **kwargs)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    return params, grads, opt


def _run_torch(torch, opt_name, kwargs, grads, seed=0):
    """The same start and gradients through ``torch.optim.<opt_name>``; returns the final parameters."""
    tparams = [torch.tensor(p.data).requires_grad_(True) for p in _params(np.random.default_rng(seed))]
    opt = getattr(torch.optim, opt_name)(tparams, **kwargs)
    for step in grads:
        for t, g in zip(tparams, step):
            t.grad = torch.tensor(g)
        opt.step()
    return [t.detach().numpy() for t in tparams]


@pytest.mark.parametrize("kwargs", [dict(lr=0.1, momentum=0.9, weight_decay=0.0),
                                    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
                                    dict(lr=0.1, momentum=0.0, weight_decay=0.0)])
def test_sgd_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    params, grads, _ = _run(SGD, kwargs)
    for p, t in zip(params, _run_torch(torch, "SGD", kwargs, grads)):
        np.testing.assert_allclose(p.data, t, rtol=1e-12, atol=1e-12)


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-3)
    params, grads, _ = _run(Adam, kwargs)
    for p, t in zip(params, _run_torch(torch, "Adam", kwargs, grads)):
        np.testing.assert_allclose(p.data, t, rtol=1e-10, atol=1e-12)


def test_sgd_first_step_is_plain_gradient_descent():
    p = Parameter(np.array([1.0, -2.0]))
    p.grad = np.array([0.5, 0.25])
    SGD([p], lr=0.1, momentum=0.9).step()
    np.testing.assert_allclose(p.data, [0.95, -2.025])


def test_frozen_parameters_are_left_out():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2), requires_grad=False)
    opt = SGD([a, b], lr=1.0)
    assert opt.param_groups[0]["params"] == [a]


def test_poly_schedule():
    assert poly_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert poly_lr(0.1, 50, 100) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(0.1, 100, 100) == 0.0
    p = Parameter(np.ones(1))
    opt = SGD([{"params": [p], "lr": 0.2}], lr=0.1)
    PolyLR(opt, 10).step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 0.9)
    with pytest.raises(ValueError, match="max_iter"):
        poly_lr(0.1, 0, 0)


@pytest.mark.parametrize("opt_cls,kwargs", [(SGD, dict(lr=0.1, momentum=0.9)), (Adam, dict(lr=0.01))])
def test_state_dict_resumes_exactly(opt_cls, kwargs):
    # 3 steps, save, 2 more; against 5 straight steps
    straight, grads, _ = _run(opt_cls, kwargs, steps=5)
    rng = np.random.default_rng(0)
    params = _params(rng)
    opt = opt_cls(params, **kwargs)
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    state = {k: np.array(v) for k, v in opt.state_dict().items()}
    opt2 = opt_cls(params, **kwargs)
    opt2.load_state_dict(state)
    for step in grads[3:]:
        for p, g in zip(params, step):
            p.grad = g
        opt2.step()
    for a, b in zip(params, straight):
        np.testing.assert_array_equal(a.data, b.data)


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
