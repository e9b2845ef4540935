"""The package imports without torch or cupy and runs one op end to end."""
import subprocess
import sys

import numpy as np

import tinyrefine as tr
import tinyrefine.functional as F


def test_import_without_torch_and_cupy():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['cupy'] = None; "
            "import tinyrefine, tinyrefine.functional, tinyrefine.nn, tinyrefine.models, tinyrefine.optim; "
            "print(tinyrefine.cuda_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_conv_gradcheck_end_to_end():
    rng = np.random.default_rng(0)
    x = tr.Tensor(rng.standard_normal((2, 3, 7, 6)), requires_grad=True)
    w = tr.Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    assert tr.gradcheck(lambda x, w: F.conv2d(x, w, stride=2, padding=1), [x, w])
