"""Triton kernels of adapter-fused (installed as ``adapter_fused.kernels``).

Pure Triton: jit kernels and their host launchers. No autograd, no nn; validation of user input
happens on the torch side before anything here runs.
"""

from .activations import ACTIVATION_CODES
from .launch import (BoundForward, adapter_backward, adapter_backward_packed, adapter_forward, bind_forward,
                     unpack_weight_grads, weight_grad_layout)
from .tuning import INTERPRET, MAX_FUSED_R, padded_rank

__all__ = [
    "ACTIVATION_CODES", "INTERPRET", "MAX_FUSED_R", "BoundForward", "adapter_backward", "adapter_backward_packed",
    "adapter_forward", "bind_forward", "padded_rank", "unpack_weight_grads", "weight_grad_layout",
]
