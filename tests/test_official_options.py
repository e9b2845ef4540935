"""The official code's options (guosheng/refinenet), off by default: dropout, a 3x3 classifier, the 1.2x input."""
import numpy as np
import pytest

import tinyrefine as tr
from tinyrefine.models import RefineNet

SMALL = dict(num_classes=5, encoder="resnet50", encoder_width=4, features=8, n_crp=1, seed=3)


def image(size=40, seed=0):
    return tr.Tensor(np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32))


def test_defaults_are_unchanged_and_eval_mode_ignores_dropout():
    plain, dropped = RefineNet(**SMALL), RefineNet(**SMALL, dropout=0.5)
    for (name, a), b in zip(plain.state_dict().items(), dropped.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)     # same weights: dropout has its own random stream
    x = image()
    np.testing.assert_array_equal(plain.eval()(x).data, dropped.eval()(x).data)
    dropped.train()
    a, b = dropped(x).data, dropped(x).data
    assert not np.array_equal(a, b) and not np.array_equal(a, plain.train()(x).data)


def test_dropout_hits_encoder_outputs_over_512_channels_only():
    model = RefineNet(**{**SMALL, "encoder_width": 64 // 8}, dropout=0.5)   # channels 32, 64, 128, 256: none > 512
    seen = []
    model.feature_hook = lambda fs: seen.extend(f.shape[1] for f in fs)
    x = image(64)
    model.train()
    model(x)
    assert seen == [32, 64, 128, 256]
    wide = RefineNet(**{**SMALL, "encoder_width": 64}, dropout=0.5)         # 256, 512, 1024, 2048
    calls = []
    wide.encoder_dropout.forward = lambda t: calls.append(t.shape[1]) or t
    wide.train()(image(64))
    assert calls == [1024, 2048]


def test_3x3_classifier_and_its_padding():
    model = RefineNet(**SMALL, classifier_kernel=3)
    assert model.head.classifier.weight.shape == (5, 8, 3, 3)
    assert model.eval()(image()).shape == (2, 5, 40, 40)
    with pytest.raises(ValueError, match="classifier_kernel must be 1"):
        RefineNet(**SMALL, classifier_kernel=5)


def test_input_scale_resizes_what_the_encoder_sees_and_not_the_output():
    model = RefineNet(**SMALL, input_scale=1.2)
    shapes = []
    model.feature_hook = lambda fs: shapes.append(fs[0].shape[2:])
    out = model.eval()(image(80))
    assert shapes == [(24, 24)] and out.shape == (2, 5, 80, 80)    # 80 * 1.2 = 96, /4 = 24
    with pytest.raises(ValueError, match="input_scale"):
        RefineNet(**SMALL, input_scale=1.2, two_scale=True)


def test_resume_refuses_a_changed_classifier(tmp_path):
    from tinyrefine.train import TrainConfig, train
    config = dict(data="shapes:32", encoder="resnet18", encoder_width=4, features=8, n_crp=1, crop=32, batch_size=2,
                  iters=1, eval_every=0, out=str(tmp_path / "run"))
    train(TrainConfig(**config), progress=False)
    with pytest.raises(ValueError, match="classifier_kernel: checkpoint 1 vs now 3"):
        train(TrainConfig(**config, classifier_kernel=3), resume=True, progress=False)


def test_the_torch_twin_refuses_options_it_lacks():
    pytest.importorskip("torch")
    from tinyrefine.interop.torch_twin import twin_from
    with pytest.raises(ValueError, match="no classifier_kernel option"):
        twin_from(RefineNet(**SMALL, classifier_kernel=3))
