"""Triton kernels of adapter-fused (installed as ``adapter_fused.kernels``).

Pure Triton: jit kernels, their named argument records (``records.py``) and host launchers
(``launch.py``), and the bound launch (``binding.py``, the one module touching Triton's internals).
No autograd, no nn; validation of user input happens on the torch side before anything here runs.
"""

from .activations import ACTIVATION_CODES
from .binding import BoundForward, bind_forward, bindable, rows_class
from .launch import (
    adapter_backward,
    adapter_backward_packed,
    adapter_forward,
    tf32_allowed,
    unpack_weight_grads,
    weight_grad_layout,
)
from .tuning import INTERPRET, MAX_FUSED_R, padded_rank

__all__ = [
    "ACTIVATION_CODES", "INTERPRET", "MAX_FUSED_R", "BoundForward", "adapter_backward", "adapter_backward_packed",
    "adapter_forward", "bind_forward", "bindable", "padded_rank", "rows_class", "tf32_allowed", "unpack_weight_grads",
    "weight_grad_layout",
]
