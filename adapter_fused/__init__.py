"""adapter-fused: bottleneck adapters as one fused Triton kernel, forward and backward.

    y = x + scale * (act(x @ W_down^T + b_down) @ W_up^T + b_up)
"""

from .activations import ACTIVATIONS
from .grouped import fused_adapter_grouped
from .hf import (AdapterConfig, accelerate, adapter_summary, add_adapter, delete_adapter, list_adapters,
                 load_adapter, per_sample_adapters, save_adapter, set_active_adapters, train_adapter)
from .layer import FusedAdapter
from .ops import fused_adapter
from .reference import reference_adapter

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "FusedAdapter", "fused_adapter", "fused_adapter_grouped", "reference_adapter",
    "AdapterConfig", "accelerate", "adapter_summary", "add_adapter", "delete_adapter", "list_adapters",
    "load_adapter", "per_sample_adapters", "save_adapter", "set_active_adapters", "train_adapter",
]
