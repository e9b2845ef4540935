"""Pictures: training curves, mask overlays, feature maps and gradient flow."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

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
    """Training loss (and its running mean) against iteration, and validation mIoU if recorded."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    it, loss = np.asarray(history["iteration"]), np.asarray(history["loss"], dtype=float)
    axes[0].plot(it, loss, alpha=0.35, label="loss")
    if len(loss) >= 10:
        k = max(5, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        axes[0].plot(it[k - 1:], smooth, label=f"mean of {k}")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    if history.get("val_miou"):
        axes[1].plot(history["val_iteration"], history["val_miou"], "o-")
        axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("validation mIoU")
    fig.tight_layout()
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
