"""Fused adapters for Hugging Face transformers models, and a bridge to AdapterHub.

    add_adapter(model, "task", "houlsby")   # or "pfeiffer", or an AdapterConfig
    train_adapter(model, "task")            # freeze everything else, activate "task"
    ... train ...
    save_adapter(model, "task", "out/task")
    name = load_adapter(other_model, "out/task"); set_active_adapters(other_model, name)

Nothing here imports ``transformers`` or ``adapters`` at import time.

Layers, lowest first: a module imports only modules of its own layer or the layers before it, never
inside a function (``tests/test_layering.py`` checks this list against the imports):

1. ``config``: ``AdapterConfig`` and ``Placement``, what an adapter is and where it sits.
2. ``modules``: the modules adapters are made of (``BottleneckAdapter``, ``NiceCoupling``).
3. ``layouts``: where the sites are in a model (``SiteSpec``, ``ModelLayout``, the table of known
   architectures, recognition by structure, ``register_model_layout``, ``find_architecture``).
4. ``adapterhub.convert``: AdapterHub's configs, weight names, head configs and composition blocks in
   this package's terms.
5. ``composition``: the composition blocks (``Stack``, ``Parallel``, ``Average``, ``BatchSplit``, ``Split``,
   ``MultiTask``, ``Fuse``), parsing and checking a setup.
6. ``compose``: what a composition computes at one site (``CompositionSite``), and the task ids of a call.
7. ``sites``: what runs on every forward pass: the hooks, the state of one call, ``site_forward``, and
   replicating the batch for ``Parallel``.
8. ``rows``: one adapter per row of a batch: stacked banks per site, the ``adapter_names=`` keyword.
9. ``model``: adding, activating, training and deleting adapters; summaries.
10. ``multitask``: ``per_sample_adapters``, a different adapter for each sample of a batch.
11. ``fusion``: AdapterFusion: the fusion layers a ``Fuse`` runs, adding, training and removing them.
12. ``heads``: the prediction heads.
13. ``formats``: every file read or written: adapter directories, heads, fusions, the checkpoint setup file.
14. ``methods``: the methods ``init`` gives a model, and flexible heads on a base model.
15. ``auto``: ``AutoAdapterModel`` and ``restore_adapters``.
16. ``adapterhub.accelerate``: ``accelerate()``, the fused kernel in a model built with AdapterHub.
"""

from .adapterhub.accelerate import AccelerateReport, accelerate
from .auto import AutoAdapterModel, restore_adapters
from .composition import Average, BatchSplit, Composition, Fuse, MultiTask, Parallel, Split, Stack
from .config import AdapterConfig, Placement
from .formats import load_adapter, load_adapter_fusion, save_adapter, save_adapter_fusion
from .fusion import FusionConfig, add_adapter_fusion, delete_adapter_fusion, train_adapter_fusion
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
    "Fuse",
    "FusionConfig",
    "ModelLayout",
    "MultiTask",
    "Parallel",
    "Placement",
    "SiteSpec",
    "Split",
    "Stack",
    "accelerate",
    "active_adapter",
    "adapter_summary",
    "add_adapter",
    "add_adapter_fusion",
    "delete_adapter",
    "delete_adapter_fusion",
    "init",
    "list_adapters",
    "load_adapter",
    "load_adapter_fusion",
    "per_sample_adapters",
    "register_model_layout",
    "restore_adapters",
    "save_adapter",
    "save_adapter_fusion",
    "set_active_adapters",
    "train_adapter",
    "train_adapter_fusion",
    "unregister_model_layout",
]
