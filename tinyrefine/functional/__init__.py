"""The kernels: differentiable ops on NCHW tensors (imported as ``F``).

One module per kernel family, so a kernel is found by its file name:

    conv.py         conv2d = im2col + GEMM; col2im, its adjoint; conv_transpose2d = col2im(W^T x)
    winograd.py     3x3 stride-1 conv2d by Winograd's F(2x2,3x3) / F(4x4,3x3); conv2d(algorithm='auto') picks
    pool.py         max_pool2d (-inf padding, torch's tie and NaN rules, return_indices) and
                    max_unpool2d; avg_pool2d and adaptive_avg_pool2d as two matrix products
                    (P_h x P_w^T), exact adjoint
    upsample.py     interpolate: bilinear as two matrix products, exact adjoint
    norm.py         batch_norm
    loss.py         softmax, log_softmax, cross_entropy (ignore index)
    elementwise.py  add (the residual add), relu, concat, pad, dropout
    common.py       argument checks, output sizes, the thread pool, scratch buffers

Each op is a ``Function`` subclass whose docstring gives its formula, plus a lowercase
function that checks its arguments and calls it. A Function object is one node of one
graph: the lowercase function makes a fresh one per call. The classes whose names would
clash with the reusable layers in ``tinyrefine.nn`` carry a ``Function`` suffix
(``F.Conv2dFunction`` is one node; ``nn.Conv2d`` is a layer that owns its weights).
Where CuPy needs its own kernel, the CUDA C source sits right under the NumPy code it
mirrors; both follow the same formula and the same tie rules.
"""
from .common import IntPair, over_planes, scratch
from .conv import Conv2dFunction, ConvTranspose2dFunction, col2im, conv2d, conv_transpose2d, im2col
from .elementwise import (
           Concat,
           DropoutFunction,
           Pad,
           ReLUFunction,
           add,
           concat,
           dropout,
           pad,
           relu,
)
from .loss import CrossEntropy, LogSoftmax, Softmax, cross_entropy, log_softmax, softmax
from .norm import BatchNorm, batch_norm
from .pool import (
           AdaptiveAvgPool2dFunction,
           AvgPool2dFunction,
           MaxPool2dFunction,
           MaxUnpool2dFunction,
           adaptive_avg_pool2d,
           adaptive_pool_matrix,
           avg_pool2d,
           avg_pool_matrix,
           max_pool2d,
           max_pool_indices,
           max_unpool2d,
)
from .upsample import (
           Bilinear,
           interpolate,
           interpolation_matrix,
           interpolation_tables,
           interpolation_taps,
)
from .winograd import Conv2dWinogradFunction, winograd_matrices

__all__ = ["AdaptiveAvgPool2dFunction", "AvgPool2dFunction", "Bilinear", "BatchNorm", "Concat", "Conv2dFunction",
           "Conv2dWinogradFunction", "winograd_matrices",
           "ConvTranspose2dFunction", "CrossEntropy", "DropoutFunction", "IntPair", "LogSoftmax", "MaxPool2dFunction",
           "MaxUnpool2dFunction", "Pad", "ReLUFunction", "Softmax", "adaptive_avg_pool2d", "adaptive_pool_matrix",
           "add", "avg_pool2d", "avg_pool_matrix", "batch_norm", "col2im", "concat", "conv2d", "conv_transpose2d",
           "cross_entropy", "dropout", "im2col", "interpolate", "interpolation_matrix", "interpolation_tables",
           "interpolation_taps", "log_softmax", "max_pool2d", "max_pool_indices", "max_unpool2d", "over_planes", "pad",
           "relu", "scratch", "softmax"]
