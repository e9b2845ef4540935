"""What the demo shows a newcomer: labelled prediction panels with a class legend and each image's mIoU,
learning curves on a log axis with an mIoU curve, the --quick preset, and the running cost lines.
The figures are checked through their matplotlib objects (titles, legend labels, drawn arrays, axis scales)."""
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tinyrefine import cli  # noqa: E402
from tinyrefine.data import SHAPE_CLASSES, VOC_PALETTE, colorize  # noqa: E402
from tinyrefine.metrics import RunningConfusion  # noqa: E402
from tinyrefine.train import _RunClock  # noqa: E402
from tinyrefine.viz import overlay, plot_curves, plot_predictions, upscale_nearest  # noqa: E402


def _samples():
    """Two 16x16 samples with known overlaps: sample 0 has classes 0, 1 and a wrong 2; sample 1 a 3 and ignored pixels."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    truth0 = np.zeros((16, 16), np.uint8)
    truth0[:, 8:] = 1                                   # right half: circle
    pred0 = truth0.copy()
    pred0[:4, 8:] = 2                                   # 32 circle pixels called rectangle
    truth1 = np.zeros((16, 16), np.uint8)
    truth1[4:12, 4:12] = 3
    truth1[0, :] = 255                                  # one ignored row
    pred1 = np.zeros((16, 16), np.uint8)
    pred1[4:12, 4:10] = 3
    return [{"image": image, "truth": truth0, "prediction": pred0, "name": "val image 0"},
            {"image": image[::-1].copy(), "truth": truth1, "prediction": pred1, "name": "val image 1"}]


def _title_miou(title: str) -> float:
    return float(re.fullmatch(r"prediction: mIoU (\d\.\d{3})", title).group(1))


def test_prediction_figure_has_labelled_panels_legend_and_the_images_miou():
    samples = _samples()
    fig = plot_predictions(samples, list(SHAPE_CLASSES), VOC_PALETTE, min_side=64)
    axes = np.array(fig.axes).reshape(2, 4)
    for row, sample in enumerate(samples):
        titles = [ax.get_title() for ax in axes[row]]
        assert titles[0] == sample["name"] and titles[1] == "ground truth" and titles[3] == "prediction over the image"
        # the title's mIoU is the image's own, as the metrics module computes it
        confusion = RunningConfusion(4)
        confusion.update(sample["prediction"], sample["truth"])
        assert _title_miou(titles[2]) == pytest.approx(confusion.compute()["mean_iou"], abs=5e-4)
        # every panel is the 16x16 picture repeated 4x4 (nearest neighbour), not resampled
        drawn = [ax.get_images()[0].get_array() for ax in axes[row]]
        expected = [sample["image"], colorize(sample["truth"]), colorize(sample["prediction"]),
                    overlay(sample["image"], sample["prediction"])]
        for got, want in zip(drawn, expected):
            assert got.shape == (64, 64, 3)
            np.testing.assert_array_equal(np.asarray(got), upscale_nearest(want, 4))
    # by hand: sample 0 -> background 1, circle 96/128, rectangle 0/32 -> mean 0.583; sample 1 -> background
    # (176 / 192), triangle 48/64 (ignored row left out) -> 0.833
    assert _title_miou(axes[0, 2].get_title()) == pytest.approx((1 + 0.75 + 0) / 3, abs=5e-4)
    assert _title_miou(axes[1, 2].get_title()) == pytest.approx((176 / 192 + 0.75) / 2, abs=5e-4)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["background", "circle", "rectangle", "triangle",
                                                          "ignored (255)"]
    colours = [np.round(np.array(h.get_facecolor()[:3]) * 255) for h in legend.legend_handles]
    np.testing.assert_array_equal(colours[:4], VOC_PALETTE[:4])
    np.testing.assert_array_equal(colours[4], colorize(np.array([[255]]))[0, 0])   # VOC's cream border colour
    plt.close(fig)


def test_one_image_figure_lists_only_its_own_classes():
    sample = _samples()[1]
    fig = plot_predictions([sample], list(SHAPE_CLASSES))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "triangle", "ignored (255)"]
    assert fig.axes[0].get_images()[0].get_array().shape == (256, 256, 3)      # 16 px -> x16 (min_side 256)
    plt.close(fig)
    with pytest.raises(ValueError, match="same size"):
        plot_predictions([{**sample, "prediction": sample["prediction"][:8]}], list(SHAPE_CLASSES))


def test_curves_log_loss_with_the_spike_named_and_an_miou_curve():
    iters = np.arange(1, 301)
    loss = 1.5 * np.exp(-iters / 100) + 0.05
    loss[4] = 17.5                                       # the early spike
    history = {"iteration": iters.tolist(), "loss": loss.tolist(), "val_iteration": [100, 200, 300],
               "val_miou": [0.4, 0.7, 0.8], "train_miou": [0.45, 0.75, 0.85]}
    fig = plot_curves(history)
    left, right = fig.axes
    assert left.get_yscale() == "log"
    raw, mean = left.get_lines()
    assert raw.get_label() == "loss (max 17.5 at iteration 5)"
    np.testing.assert_allclose(raw.get_ydata(), loss)
    k = 6                                                # max(5, 300 // 50)
    assert mean.get_label() == f"running mean of {k}"
    np.testing.assert_allclose(mean.get_ydata(), np.convolve(loss, np.ones(k) / k, mode="valid"))
    val, train = right.get_lines()
    assert (val.get_label(), train.get_label()) == ("val", "train")
    np.testing.assert_array_equal(val.get_xdata(), [100, 200, 300])
    np.testing.assert_allclose(val.get_ydata(), [0.4, 0.7, 0.8])
    np.testing.assert_allclose(train.get_ydata(), [0.45, 0.75, 0.85])
    assert right.get_xlim() == (0.0, 300.0) and right.get_ylim() == (0.0, 1.0)
    plt.close(fig)
    # a single end-of-run evaluation is a point on the run's own axis, not on an axis from 2850 to 3150
    fig = plot_curves({**history, "val_iteration": [300], "val_miou": [0.9], "train_miou": [0.9]})
    assert fig.axes[1].get_xlim() == (0.0, 300.0)
    plt.close(fig)


def test_demo_quick_preset_keeps_what_the_user_set():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--quick"])
    cli._make_quick(args)
    config = cli._config(args)
    assert (config.iters, config.eval_every, config.out) == (cli.DEMO_QUICK["iters"], cli.DEMO_QUICK["eval_every"],
                                                             cli.DEMO_QUICK["out"])
    assert config.eval_limit == cli.DEMO["eval_limit"] and config.lr == cli.DEMO["lr"]
    args = parser.parse_args(["demo", "--quick", "--iters", "50", "--out", "mine"])
    cli._make_quick(args)
    assert (args.iters, args.out, args.eval_every) == (50, "mine", cli.DEMO_QUICK["eval_every"])
    full = cli._config(parser.parse_args(["demo"]))
    assert full.iters == cli.DEMO["iters"] and full.eval_every and full.eval_limit   # the full demo draws a curve


def test_run_clock_says_the_expected_time_after_20_iterations_and_the_eta():
    lines = []
    clock = _RunClock(start=10, total=100, say=lines.append, every_s=0.0)
    for done in range(11, 101):
        clock.tick(done, loss=0.5)
    expected = [line for line in lines if line.startswith("expected:")]
    assert len(expected) == 1
    assert re.fullmatch(r"expected: \d+ s for 90 iterations \(\d\.\d{3} s/iteration over iterations 2-20\), "
                        r"evaluations extra", expected[0])
    eta = [line for line in lines if line.startswith("iteration ")]
    assert len(eta) == 90 and eta[0].startswith("iteration 11/100  loss 0.5000")
    assert eta[-1].endswith("ETA 0 s")
    silent = _RunClock(start=0, total=100, say=None, every_s=0.0)
    for done in range(1, 101):
        silent.tick(done, loss=0.5)                      # no say: nothing to call
