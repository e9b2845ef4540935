"""viz.draw_graph finds every node and edge of a small autograd graph (drawn with matplotlib, no graphviz)."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tinyrefine as tr  # noqa: E402
from tinyrefine.engine import Add, Mul, Sum  # noqa: E402
from tinyrefine.viz import draw_graph  # noqa: E402


def _leaf(name, requires_grad=True):
    t = tr.Tensor(np.ones(3), requires_grad=requires_grad)
    t.name = name
    return t


def test_nodes_edges_and_depths():
    a, b = _leaf("a"), _leaf("b")
    y = (a * b + a).sum()                  # Sum <- Add <- (Mul <- (a, b), a)
    g = draw_graph(y)
    kinds = [type(n) for n in g["nodes"]]
    assert len(g["nodes"]) == 5 and len(g["edges"]) == 5
    assert kinds.count(Sum) == kinds.count(Add) == kinds.count(Mul) == 1
    depth = {(n.name if isinstance(n, tr.Tensor) else type(n).__name__): d for n, d in zip(g["nodes"], g["depth"])}
    assert depth == {"Sum": 0, "Add": 1, "Mul": 2, "a": 3, "b": 3}   # a: longest path, through Mul
    assert [b.get_text() for b in g["boxes"]] == [n.name if isinstance(n, tr.Tensor) else type(n).__name__ for n in g["nodes"]]
    plt.close("all")


def test_input_used_twice_gives_two_edges_and_constants_are_skipped():
    x = _leaf("x")
    g = draw_graph(x * x)
    assert len(g["nodes"]) == 2 and g["edges"] == [(1, 0), (1, 0)]
    c = _leaf("c", requires_grad=False)  # no gradient: not part of the graph
    g = draw_graph((x * c).sum())
    assert len(g["nodes"]) == 3 and len(g["edges"]) == 2
    plt.close("all")


def test_labels_override_captions():
    x = _leaf("x")
    y = x.exp()
    g = draw_graph(y, labels={id(y.creator): "exp!"})
    assert sorted(t.get_text() for t in g["boxes"]) == ["exp!", "x"]
    plt.close("all")
