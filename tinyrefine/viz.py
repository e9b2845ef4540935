"""Pictures: training curves, mask overlays, feature maps and gradient flow."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg",) and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _interactive() -> bool:
    try:
        from IPython import get_ipython
        return get_ipython() is not None
    except ImportError:
        return False


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, palette: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend a class mask, coloured with the VOC palette, onto an RGB uint8 image (ignored pixels stay as they are)."""
    from .data import colorize
    if image.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and mask {mask.shape} differ in size")
    colours = colorize(mask) if palette is None else colorize(mask, palette)
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    out = np.where((mask == 255)[..., None], image.astype(np.float32), blend)
    return out.round().clip(0, 255).astype(np.uint8)


def plot_curves(history: Dict[str, List], path: Optional[Union[str, Path]] = None):
    """Training loss on a log scale with its running mean (left), and the mIoU measured during the run (right).

    A log axis keeps an early spike (a loss of 17 in the first steps) from flattening the rest of the curve
    into the bottom line; the spike is named in the legend. The right panel shares the iteration axis and
    draws val mIoU, and train mIoU when it was measured, one point per evaluation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    it, loss = np.asarray(history["iteration"]), np.asarray(history["loss"], dtype=float)
    ax = axes[0]
    if len(loss):
        peak = int(np.argmax(loss))
        # a log axis has no 0: a (vanishingly rare) exact zero is drawn at the smallest positive loss
        shown = np.where(loss > 0, loss, loss[loss > 0].min() if (loss > 0).any() else 1e-12)
        ax.plot(it, shown, alpha=0.3, lw=0.8, label=f"loss (max {loss[peak]:.3g} at iteration {it[peak]})")
        if len(loss) >= 10:
            k = max(5, len(loss) // 50)
            ax.plot(it[k - 1:], np.convolve(shown, np.ones(k) / k, mode="valid"), lw=1.8, label=f"running mean of {k}")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_title("training loss (log scale)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy")
    ax.grid(True, which="both", alpha=0.2)
    ax = axes[1]
    val_it = list(history.get("val_iteration") or [])
    if val_it:
        ax.plot(val_it, history["val_miou"], "o-", label="val")
        train_miou = history.get("train_miou") or []
        if len(train_miou) == len(val_it):
            ax.plot(val_it, train_miou, "s--", alpha=0.8, label="train")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max([int(it[-1]) if len(it) else 0] + val_it + [1]))   # the same iterations as the loss
    ax.set_title("mIoU during training")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU")
    ax.grid(True, alpha=0.2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def upscale_nearest(array: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every pixel ``factor`` times along both axes (H, W[, 3]) -> (factor*H, factor*W[, 3])."""
    if int(factor) < 1:
        raise ValueError(f"upscale_nearest: factor must be a positive whole number, got {factor}")
    return np.repeat(np.repeat(np.asarray(array), int(factor), axis=0), int(factor), axis=1)


def image_miou(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> float:
    """mIoU of one image: the mean IoU over the classes in its truth or its prediction (``metrics.mean_iou``)."""
    from .metrics import confusion_matrix, mean_iou
    return mean_iou(confusion_matrix(prediction, truth, num_classes))


def plot_predictions(samples: List[Dict], class_names: List[str], palette: Optional[np.ndarray] = None,
                     path: Optional[Union[str, Path]] = None, min_side: int = 256):
    """One row per sample: the image, its ground truth, the prediction (titled with the image's mIoU)
    and the prediction laid over the image; a legend names the colour of every class that appears.

    ``samples`` holds dicts with ``image`` (H, W, 3) uint8, ``truth`` and ``prediction`` (H, W) class
    indices (255: ignored), and an optional ``name``. Images smaller than ``min_side`` are enlarged by
    repeating pixels (nearest neighbour: no made-up colours at the class borders). Returns the figure."""
    from matplotlib.patches import Patch
    from .data import VOC_PALETTE, colorize
    palette = VOC_PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    if not samples:
        raise ValueError("plot_predictions: no samples to draw")
    plt = _pyplot()
    height, width = np.asarray(samples[0]["truth"]).shape
    factor = max(1, -(-min_side // max(height, width)))         # ceil: 64 px -> x4
    panel_w, title_h, legend_h = 2.6, 0.35, 0.55                 # inches
    panel_h = panel_w * height / width
    fig_h = len(samples) * (panel_h + title_h) + legend_h
    fig, axes = plt.subplots(len(samples), 4, squeeze=False, figsize=(4.15 * panel_w + 0.2, fig_h))
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - title_h / fig_h, bottom=legend_h / fig_h, wspace=0.05,
                        hspace=title_h / panel_h)
    present = set()
    for row, sample in enumerate(samples):
        image, truth, pred = (np.asarray(sample[k]) for k in ("image", "truth", "prediction"))
        if truth.shape != pred.shape or image.shape[:2] != truth.shape:
            raise ValueError(f"plot_predictions: sample {row} has image {image.shape[:2]}, truth {truth.shape} "
                             f"and prediction {pred.shape}: they must be the same size")
        present |= set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())
        miou = image_miou(truth, pred, len(class_names))
        name = sample.get("name", f"sample {row}")
        pictures = (image, colorize(truth, palette), colorize(pred, palette), overlay(image, pred, palette=palette))
        titles = (name, "ground truth", f"prediction: mIoU {miou:.3f}", "prediction over the image")
        for ax, picture, title in zip(axes[row], pictures, titles):
            ax.imshow(upscale_nearest(picture, factor), interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="0.3", label=class_names[c])
               for c in sorted(present) if c < len(class_names)]
    if 255 in present:
        handles.append(Patch(facecolor=np.array(colorize(np.array([[255]]), palette)[0, 0]) / 255.0,
                             edgecolor="0.3", label="ignored (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=10, frameon=False)
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# --------------------------------------------------------------------------- the autograd graph
def draw_graph(tensor, ax=None, labels: Optional[Dict[int, str]] = None):
    """Draw the graph that produced ``tensor``: boxes laid out by depth, arrows along the data flow.

    Nodes are the ``Function`` objects recorded by the engine and the leaf tensors that require
    grad (a leaf shows its ``.name`` if set). Depth is the longest path from the node to the
    output, so the output sits at the right and the leaves at the left. ``labels`` may map
    ``id(node)`` to a caption. Returns a dict with ``nodes`` (the node objects), ``edges``
    ((parent index, child index) pairs, one per input slot that carries a gradient),
    ``depth`` (one int per node), ``boxes`` (the caption artists, one per node) and ``ax``.
    It draws with matplotlib only: graphviz is not needed.
    """
    from .engine import Function, Tensor
    start = tensor.creator if tensor.creator is not None else tensor
    nodes, index, edges, stack = [start], {id(start): 0}, [], [start]
    while stack:  # breadth of the graph: every node reachable through _parents
        node = stack.pop()
        for parent in (node._parents if isinstance(node, Function) else ()):
            if parent is None:
                continue
            if id(parent) not in index:
                index[id(parent)] = len(nodes)
                nodes.append(parent)
                stack.append(parent)
            edges.append((index[id(parent)], index[id(node)]))
    depth = [0] * len(nodes)
    changed = True
    while changed:  # longest distance to the output (the graph is a DAG: this settles)
        changed = False
        for p, c in edges:
            if depth[p] < depth[c] + 1:
                depth[p], changed = depth[c] + 1, True

    def caption(node) -> str:
        if labels and id(node) in labels:
            return labels[id(node)]
        if isinstance(node, Tensor):
            return node.name or f"leaf {node.shape}"
        return type(node).__name__

    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(2.0 + 1.8 * (max(depth) + 1), 1.0 + 0.9 * max(depth.count(d) for d in set(depth))))
    pos = {}
    for d in set(depth):
        column = [i for i in range(len(nodes)) if depth[i] == d]
        for k, i in enumerate(column):
            pos[i] = (-float(d), (len(column) - 1) / 2.0 - k)
    for p, c in edges:
        ax.annotate("", xy=pos[c], xytext=pos[p],
                    arrowprops=dict(arrowstyle="-|>", color="0.4", shrinkA=22, shrinkB=22))
    boxes = [ax.text(*pos[i], caption(node), ha="center", va="center", fontsize=9,
                     bbox=dict(boxstyle="round,pad=0.35", fc="#cfe3ff" if isinstance(node, Tensor) else "#ffe2b8", ec="0.3"))
             for i, node in enumerate(nodes)]
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.axis("off")
    return {"nodes": nodes, "edges": edges, "depth": depth, "boxes": boxes, "ax": ax}


# --------------------------------------------------------------------------- gradient flow
def _grad_norms_of(model) -> "Dict[str, float]":
    """name -> L2 norm of ``.grad`` for every trainable parameter (0.0 where there is none yet),
    computed as ``analysis.gradient_norms`` computes it (float64 sum of squares)."""
    from . import backend
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        out[name] = 0.0 if g is None else float(np.sqrt((backend.as_numpy(g).astype(np.float64) ** 2).sum()))
    return out


def plot_grad_flow(norms, ax=None, kind: str = "bar", label: Optional[str] = None, weights_only: bool = False,
                   model=None, floor: Optional[float] = None, **style):
    """Per-layer gradient norms on a log scale, in module order (input side left, output side right).

    ``norms`` is the dict from ``analysis.gradient_norms`` (name -> norm) or a model whose parameters
    hold ``.grad`` (their L2 norms are taken here, as ``gradient_norms`` takes them). ``kind`` is 'bar'
    or 'line' (use 'line', a shared ``ax`` and ``label`` to overlay several runs). ``weights_only``
    keeps parameters of rank > 1 (conv weights: biases and BN affine parameters dropped); with a dict
    it needs ``model=`` to know the shapes. A zero norm (no gradient) is drawn at ``floor``, by default
    a tenth of the smallest positive norm (a log scale has no 0).
    Returns ``(names, norms)``: the names and the exact float norms that were plotted.
    """
    if hasattr(norms, "named_parameters"):
        model, norms = norms, _grad_norms_of(norms)
    else:
        norms = dict(norms)
    names = list(norms)
    if weights_only:
        if model is None:
            raise ValueError("plot_grad_flow: weights_only with a dict of norms needs model= (for the shapes)")
        shapes = {n: p.shape for n, p in model.named_parameters()}
        names = [n for n in names if len(shapes[n]) > 1]
    values = np.array([float(norms[n]) for n in names], dtype=np.float64)
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, min(18.0, 0.12 * len(names) + 4)), 3.5))
    if floor is None:
        positive = values[values > 0]
        floor = float(positive.min()) / 10 if positive.size else 1e-12
    shown = np.where(values > 0, values, floor)
    x = np.arange(len(names))
    if kind == "bar":
        ax.bar(x, shown, label=label, **style)
    elif kind == "line":
        ax.plot(x, shown, marker=".", label=label, **style)
    else:
        raise ValueError(f"plot_grad_flow: kind must be 'bar' or 'line', got {kind!r}")
    ax.set_yscale("log")
    ax.set_ylabel("gradient L2 norm")
    ax.set_xlabel("parameter (module order: input -> output)")
    if len(names) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
    if label is not None:
        ax.legend()
    return names, values


def show_feature_maps(x, n: int = 8, ax=None, cols: Optional[int] = None, title: Optional[str] = None,
                      cmap: str = "viridis") -> np.ndarray:
    """The first ``n`` channels of a feature map as one grid image.

    ``x`` is a Tensor or array of shape (1, C, H, W) or (C, H, W). Each channel is min-max
    normalised to [0, 1] on its own (a constant channel becomes 0); channels are laid out
    ``cols`` per row (default min(n, 8)) with a 1-pixel NaN gap, drawn blank. Returns the grid,
    shape (rows*(H+1)-1, cols*(W+1)-1), float64.
    """
    from . import backend
    a = backend.as_numpy(getattr(x, "data", x)).astype(np.float64)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"show_feature_maps: expected one image (1, C, H, W), got {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"show_feature_maps: expected (1, C, H, W) or (C, H, W), got {a.shape}")
    a = a[:max(1, n)]
    C, H, W = a.shape
    lo = a.min(axis=(1, 2), keepdims=True)
    span = a.max(axis=(1, 2), keepdims=True) - lo
    a = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)
    cols = min(C, 8) if cols is None else max(1, min(cols, C))
    rows = -(-C // cols)
    grid = np.full((rows * (H + 1) - 1, cols * (W + 1) - 1), np.nan)
    for k in range(C):
        r, c = divmod(k, cols)
        grid[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = a[k]
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * cols + 0.5, 1.3 * rows * H / W + 0.5))
    colormap = plt.get_cmap(cmap).with_extremes(bad="white")   # the NaN gaps
    ax.imshow(np.ma.masked_invalid(grid), cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=10)
    return grid


# --------------------------------------------------------------------------- activation memory
def _is_array(value) -> bool:
    from . import backend
    return isinstance(value, np.ndarray) or backend.is_cupy_array(value)


def _owner(array):
    """The array that owns the memory of ``array`` (itself, or the root of its chain of views)."""
    while getattr(array, "base", None) is not None and _is_array(array.base):
        array = array.base
    return array


def _default_groups(model) -> List[str]:
    """The model's top-level children, with a ResNet encoder replaced by its own children
    (conv1, bn1, relu, maxpool, layer1..layer4) so that its four stages appear separately."""
    from .models.resnet import ResNet
    groups = []
    for name, child in model.named_children():
        if isinstance(child, ResNet):
            groups += [f"{name}.{k}" for k, _ in child.named_children()]
        else:
            groups.append(name)
    return groups


def activation_memory(model, images, groups: Optional[List[str]] = None,
                      include_parameters: bool = True) -> List[Tuple[str, int]]:
    """Bytes that one training forward keeps alive for backward, per module: ``[(name, bytes), ...]``.

    One forward runs with graph recording on. While it runs, ``Function.__call__`` is patched to note
    every graph node it creates, and each module in ``groups`` (default: the model's top-level children,
    with the encoder split into conv1 .. layer4) is wrapped to note which nodes it created and what it
    returned. A module's bytes are then the arrays its nodes saved for backward (every array among the
    node's attributes, the engine's underscore fields aside) plus its output arrays. Every array is
    counted once, by the memory that owns it (a view counts as its base), for the first module that
    holds it: a conv that saves the previous module's output adds nothing. Ops in the model's own
    ``forward`` (outside every group: the final upsampling) are reported as '(model)'.
    ``include_parameters=False`` leaves out arrays that are parameter or buffer data (a conv node
    saves its weight; BatchNorm its affine weight and running statistics). Everything is restored:
    the patched ``__call__``, the wrappers, gradients and BatchNorm statistics.
    """
    from . import engine
    from .analysis import _preserved
    from .engine import Function, Tensor
    from .nn import Buffer, Parameter
    names = list(groups) if groups is not None else _default_groups(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"activation_memory: no module named {missing} in the model")
    events: List[Tuple[str, str, object]] = []   # (group, 'node' | 'output', node or output)
    active: List[str] = []
    original_call = Function.__call__

    def call(self, *inputs):
        result = original_call(self, *inputs)
        if result.creator is self:
            events.append((active[-1] if active else "(model)", "node", self))
        return result

    def wrap(name: str, module):
        forward = type(module).forward.__get__(module)

        def wrapped(*args, **kwargs):
            active.append(name)
            try:
                out = forward(*args, **kwargs)
            finally:
                active.pop()
            events.append((name, "output", out))
            return out
        return wrapped

    # parameter and buffer arrays as the forward sees them (_preserved swaps buffers for copies on exit); held
    # here, not just their ids: a freed array's id is reused by later arrays (it hid a conv's output once)
    skipped = [] if include_parameters else [_owner(t.data) for _, t in model._named_tensors((Parameter, Buffer))]
    wrapped_modules = []
    try:
        for name in names:
            modules[name].forward = wrap(name, modules[name])  # an instance attribute shadows the method
            wrapped_modules.append(modules[name])
        Function.__call__ = call
        with engine.set_grad_enabled(True), _preserved(model):
            output = model(images if isinstance(images, Tensor) else Tensor(images))
        events.append(("(model)", "output", output))
    finally:
        Function.__call__ = original_call
        for module in wrapped_modules:
            vars(module).pop("forward", None)

    seen = {id(a) for a in skipped}
    totals = {name: 0 for name in names}
    totals["(model)"] = 0

    def count(group: str, array) -> None:
        owner = _owner(array)
        if id(owner) not in seen:
            seen.add(id(owner))
            totals[group] += int(owner.nbytes)

    def arrays_in(value):
        if isinstance(value, Tensor):
            yield value.data
        elif _is_array(value):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from arrays_in(v)

    for group, kind, item in events:
        if kind == "node":
            for key, value in vars(item).items():
                if not key.startswith("_"):
                    for array in arrays_in(value):
                        count(group, array)
        else:
            for array in arrays_in(item):
                count(group, array)
    rows = [(name, totals[name]) for name in names]
    if totals["(model)"]:
        rows.append(("(model)", totals["(model)"]))
    return rows


def memory_report(model_or_rows, images=None, **kwargs) -> str:
    """A text table of ``activation_memory`` (rows, or a model and images): bytes, MB and share per module."""
    rows = list(model_or_rows) if images is None else activation_memory(model_or_rows, images, **kwargs)
    total = sum(b for _, b in rows)
    width = max([len("module")] + [len(n) for n, _ in rows] + [len("total")])
    lines = [f"{'module'.ljust(width)}  {'bytes':>12}  {'MB':>8}  {'share':>6}", "-" * (width + 34)]
    for name, b in rows:
        lines.append(f"{name.ljust(width)}  {b:>12,d}  {b / 2**20:>8.3f}  {100 * b / max(total, 1):>5.1f}%")
    lines.append("-" * (width + 34))
    lines.append(f"{'total'.ljust(width)}  {total:>12,d}  {total / 2**20:>8.3f}  {100.0 if total else 0.0:>5.1f}%")
    return "\n".join(lines)
