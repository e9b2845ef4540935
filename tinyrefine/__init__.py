"""tinyrefine: RefineNet from scratch on NumPy (and CuPy), for learning.

    import tinyrefine as tr
    import tinyrefine.functional as F
"""
from . import backend, functional
from .backend import cuda_available, get_array_module
from .engine import Function, Tensor, as_tensor, enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .gradcheck import gradcheck
from .memory import empty_cache, retain_freed_memory
from .threads import get_num_threads, num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["Function", "Tensor", "as_tensor", "backend", "cuda_available", "empty_cache", "enable_grad", "functional",
           "get_array_module", "get_num_threads", "gradcheck", "is_grad_enabled", "no_grad", "num_threads",
           "retain_freed_memory", "set_grad_enabled", "set_num_threads", "tensor"]


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Shorthand for ``Tensor(data, requires_grad, dtype)``."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
