"""adapter-fused: bottleneck adapters as one fused Triton kernel, forward and backward.

    y = x + scale * (act(x @ W_down^T + b_down) @ W_up^T + b_up)

The public names load on first use, so ``import adapter_fused`` (and ``python -m adapter_fused
--help``) does not import torch; ``from adapter_fused import fused_adapter`` imports torch and
registers the ``torch.ops.adapter_fused`` operators. Triton, the compiler stack, transformers and
AdapterHub load only when something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule defining it
_EXPORTS: dict[str, str] = {
    "ACTIVATIONS": "activations",
    "FusedAdapter": "layer",
    "fused_adapter": "ops",
    "fused_adapter_grouped": "grouped",
    "reference_adapter": "reference",
    **{name: "hf" for name in (
        "AdapterConfig", "accelerate", "adapter_summary", "add_adapter", "delete_adapter", "list_adapters",
        "load_adapter", "per_sample_adapters", "save_adapter", "set_active_adapters", "train_adapter",
        "ModelLayout", "SiteSpec", "register_model_layout", "unregister_model_layout",
        "Average", "BatchSplit", "Parallel", "Stack", "Split", "MultiTask", "Fuse",
        "FusionConfig", "add_adapter_fusion", "delete_adapter_fusion", "load_adapter_fusion", "save_adapter_fusion",
        "train_adapter_fusion",
        "AutoAdapterModel", "init", "restore_adapters",
    )},
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .activations import ACTIVATIONS
    from .grouped import fused_adapter_grouped
    from .hf import (AdapterConfig, AutoAdapterModel, Average, BatchSplit, Fuse, FusionConfig, ModelLayout, MultiTask,
                     Parallel, SiteSpec, Split, Stack, accelerate, adapter_summary, add_adapter, add_adapter_fusion,
                     delete_adapter, delete_adapter_fusion, init, list_adapters, load_adapter, load_adapter_fusion,
                     per_sample_adapters, register_model_layout, restore_adapters, save_adapter, save_adapter_fusion,
                     set_active_adapters, train_adapter, train_adapter_fusion, unregister_model_layout)
    from .layer import FusedAdapter
    from .ops import fused_adapter
    from .reference import reference_adapter


def __getattr__(name: str) -> Any:
    """Import the submodule defining the public ``name`` on first access and cache the value."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's attributes, the not yet loaded public names included."""
    return sorted({*globals(), *__all__})
