"""Fused adapters for Hugging Face transformers models, and a bridge to AdapterHub.

    add_adapter(model, "task", "houlsby")   # or "pfeiffer", or an AdapterConfig
    train_adapter(model, "task")            # freeze everything else, activate "task"
    ... train ...
    save_adapter(model, "task", "out/task")
    name = load_adapter(other_model, "out/task"); set_active_adapters(other_model, name)

Nothing here imports ``transformers`` or ``adapters`` at import time.
"""

from .adapterhub.accelerate import AccelerateReport, accelerate
from .checkpoints import restore_adapters
from .composition import Average, BatchSplit, Composition, Parallel, Stack
from .config import AdapterConfig, Placement
from .heads import AutoAdapterModel
from .io import load_adapter, save_adapter
from .layouts import SUPPORTED_MODEL_TYPES, ModelLayout, SiteSpec, register_model_layout, unregister_model_layout
from .methods import init
from .model import (
    AdapterInfo,
    AdapterSummary,
    active_adapter,
    adapter_summary,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_active_adapters,
    train_adapter,
)
from .modules import BottleneckAdapter
from .multitask import per_sample_adapters

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AccelerateReport",
    "AdapterConfig",
    "AdapterInfo",
    "AdapterSummary",
    "AutoAdapterModel",
    "Average",
    "BatchSplit",
    "BottleneckAdapter",
    "Composition",
    "ModelLayout",
    "Parallel",
    "Placement",
    "SiteSpec",
    "Stack",
    "accelerate",
    "active_adapter",
    "adapter_summary",
    "add_adapter",
    "delete_adapter",
    "init",
    "list_adapters",
    "load_adapter",
    "per_sample_adapters",
    "register_model_layout",
    "restore_adapters",
    "save_adapter",
    "set_active_adapters",
    "train_adapter",
    "unregister_model_layout",
]
