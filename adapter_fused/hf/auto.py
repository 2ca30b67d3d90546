"""``AutoAdapterModel``: a transformers base model with AdapterHub's adapter methods and named
prediction heads on top (see ``methods``), and ``restore_adapters``, which brings back what a checkpoint
recorded of its adapters.

    model = AutoAdapterModel.from_pretrained(path)          # transformers AutoModel + the methods
    model.add_adapter("sst2")
    model.add_classification_head("sst2", num_labels=2)     # becomes the active head
    model.train_adapter("sst2")                             # adapter + its head train
    out = model(input_ids=ids, attention_mask=mask, labels=y)   # SequenceClassifierOutput with loss

``AutoAdapterModel.from_pretrained`` of a checkpoint saved from a task model with a head it knows
(e.g. ``BertForSequenceClassification``, see ``heads.STATIC_HEADS``) turns that head into a flexible
head named ``"default"`` with the same weights and logits.

Checkpoints: ``save_pretrained`` of a model given the methods writes the adapters' and heads' weights
with the model's, and their configs and the active setup in ``adapter_fused_setup.json`` (see
``formats``). ``AutoAdapterModel.from_pretrained(directory)`` restores all of it; for any other model
loaded from the directory (``AutoModelForSequenceClassification.from_pretrained(directory)``, which
logs that the ``fused_adapters`` weights were not used), ``restore_adapters(model, directory)`` does.
Once this module is imported (by ``adapter_fused.hf``), that transformers warning ends with a line
saying so. ``Trainer(...).train(resume_from_checkpoint=...)`` needs nothing from here: the model it
resumes already has its adapters, and the checkpoint's weights load into them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .config import AdapterConfig
from .formats import SETUP_FILE, checkpoint_tensors, decode_setup, fill_adapter_modules, read_setup, restore_fusions
from .heads import STATIC_HEADS, build_head, load_head_weights, static_head
from .layouts import find_architecture
from .methods import (
    HEADS_MODULE,
    AdapterMethodsMixin,
    FlexibleHeadsMixin,
    flexible_class,
    init,
    subclass_for,
    with_flexible_heads,
)
from .model import attach_adapter, build_adapter_modules, check_name, delete_adapter, list_adapters, set_active_adapters

logger = logging.getLogger(__name__)

DROPPED_HINT = ("adapter_fused: the fused_adapters weights named above are adapters; load the directory with "
                "adapter_fused.AutoAdapterModel.from_pretrained(path), or call adapter_fused.restore_adapters(model, "
                "path) on this model to bring them back with their configs and active setup")


class _DroppedAdaptersHint(logging.Filter):
    """Adds ``DROPPED_HINT`` to transformers' warning about unused checkpoint weights when those
    include fused adapters (a plain ``from_pretrained`` of a checkpoint with adapters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a record this filter cannot render is left alone
            return True
        if "fused_adapters." in message and DROPPED_HINT not in message:
            record.msg, record.args = f"{message}\n{DROPPED_HINT}", ()
        return True


def install_dropped_adapters_hint() -> None:
    """Attach the hint to the loggers transformers reports unused weights on (4.57 and 5.x); once."""
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DroppedAdaptersHint) for f in target.filters):
            target.addFilter(_DroppedAdaptersHint())


install_dropped_adapters_hint()


def restore_adapters(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Bring back the adapters, prediction heads and active setup that ``save_pretrained`` (or
    ``Trainer.save_model``, or a Trainer checkpoint) of an init-ed model recorded in ``directory``,
    into ``model`` loaded from that directory, e.g.
    ``restore_adapters(AutoModelForSequenceClassification.from_pretrained(d), d)``. Returns the
    names of the restored adapters.

    The weights are read from the directory's ``model.safetensors`` (or ``pytorch_model.bin``,
    sharded or not), so the model computes what the saved one computed. ``model`` is given the
    methods (``adapter_fused.init``), so its next ``save_pretrained`` keeps the adapters too;
    prediction heads need a base model (as ``AutoModel`` gives), which gets flexible heads (see
    ``AutoAdapterModel``). Raises FileNotFoundError without the setup file, ValueError for an
    adapter or head name already on the model, a task model given heads, or weights that do not
    fit; every check runs before the model is changed.
    """
    root = Path(directory)
    source = root / SETUP_FILE
    meta = read_setup(root)
    adapters: dict[str, Any] = meta["adapters"]
    heads: dict[str, Any] = meta.get("heads") or {}
    flexible = isinstance(model, FlexibleHeadsMixin)
    if heads and not flexible and getattr(model, "base_model", model) is not model:
        raise ValueError(f"{source}: the checkpoint has prediction heads ({', '.join(heads)}), which a task model "
                         f"({type(model).__name__}) cannot hold; load it with adapter_fused.AutoAdapterModel")
    clash = sorted(set(adapters) & set(list_adapters(model)))
    if clash:
        raise ValueError(f"adapter_fused: the model already has adapters named {', '.join(clash)}")
    if flexible:
        clash = sorted(set(heads) & set(model.heads))  # type: ignore[arg-type]
        if clash:
            raise ValueError(f"adapter_fused: the model already has prediction heads named {', '.join(clash)}")
    prefixes = []
    if adapters:
        if not isinstance(meta.get("adapters_module"), str):
            raise ValueError(f"{source}: \"adapters_module\" missing")
        prefixes.append(meta["adapters_module"] + ".")
    if heads:
        if not isinstance(meta.get("heads_module"), str):
            raise ValueError(f"{source}: \"heads_module\" missing")
        prefixes.append(meta["heads_module"] + ".")
    tensors, weights_path = checkpoint_tensors(root, prefixes) if prefixes else ({}, root)

    built: list[tuple[str, AdapterConfig, nn.ModuleDict]] = []
    for name, data in adapters.items():
        name = check_name(name)
        try:
            config = AdapterConfig.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid config of adapter {name!r} ({exc})") from exc
        modules = build_adapter_modules(model, config)
        prefix = f"{meta['adapters_module']}.{name}."
        fill_adapter_modules(modules, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, weights_path)
        built.append((name, config, modules))
    built_heads = []
    for name, config in heads.items():
        check_name(name)
        try:
            head = build_head(model, name, config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid config of head {name!r} ({exc})") from exc
        prefix = f"{meta['heads_module']}.{name}."
        load_head_weights(head, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                          str(weights_path))
        built_heads.append(head)
    active = decode_setup(meta.get("active"), source)
    active_head = meta.get("active_head")
    if active_head is not None and active_head not in heads:
        raise ValueError(f"{source}: active head {active_head!r} is not one of the saved heads")

    if heads:
        with_flexible_heads(model)
    else:
        init(model)
    attached: list[str] = []
    try:
        for name, config, modules in built:
            attach_adapter(model, name, config, modules)
            attached.append(name)
        restore_fusions(model, meta, tensors, weights_path)
        set_active_adapters(model, active)
    except BaseException:
        for name in attached:
            delete_adapter(model, name)
        raise
    for head in built_heads:
        model.add_prediction_head(head, set_active=False)  # type: ignore[attr-defined]
    if heads:
        model.active_head = active_head  # type: ignore[attr-defined]
    return attached


LOCATION_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
                      "trust_remote_code")
"""The keyword arguments of ``from_pretrained`` that say where and how to read the checkpoint's config
(the others are config attributes or model options)."""


class AutoAdapterModel:
    """``AutoAdapterModel.from_pretrained(path)``: transformers' ``AutoModel`` of ``path`` with
    AdapterHub's adapter methods and flexible prediction heads (see the module docstring)."""

    def __init__(self) -> None:
        raise OSError("AutoAdapterModel is created with AutoAdapterModel.from_pretrained(path) or from_config(config)")

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> nn.Module:
        """A freshly initialised base model for ``config`` with the methods and heads."""
        from transformers import AutoModel

        return with_flexible_heads(AutoModel.from_config(config, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
                        **kwargs: Any) -> Any:
        """Load the base model saved at ``pretrained_model_name_or_path`` with the methods and heads.

        Keyword arguments work as in transformers' ``AutoModel.from_pretrained``: without a config
        object (``config=``), those that are attributes of the saved config update it (e.g.
        ``hidden_dropout_prob=0.0``) and the others go to the model's ``from_pretrained`` (``dtype``,
        ``device_map``, ``quantization_config``, ...); with one, all go to the model.
        ``output_loading_info=True`` returns ``(model, loading_info)``; ``return_unused_kwargs`` is
        refused (TypeError), as transformers refuses it for models.

        A checkpoint of a task model listed in ``STATIC_HEADS`` brings its head as the flexible head
        ``"default"`` (active); other task heads are dropped with a warning. A checkpoint saved from
        a model with adapters (``save_pretrained`` or ``Trainer.save_model`` of an init-ed model or
        an AutoAdapterModel) gets its adapters, heads and active setup back (see
        ``restore_adapters``)."""
        import transformers

        if "return_unused_kwargs" in kwargs:
            raise TypeError("adapter_fused: AutoAdapterModel.from_pretrained takes no return_unused_kwargs (nor does "
                            "transformers' AutoModel.from_pretrained); config attributes among the keyword arguments "
                            "update the config, the others go to the model")
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs["output_loading_info"] = True  # transformers' from_pretrained then returns (model, loading info)
        config = kwargs.get("config")
        if not isinstance(config, transformers.PretrainedConfig):
            # Only to choose the class: its from_pretrained reads the config again, with the keyword arguments.
            config = transformers.AutoConfig.from_pretrained(
                pretrained_model_name_or_path if config is None else config,
                **{k: kwargs[k] for k in LOCATION_ARGUMENTS if k in kwargs})
        architecture = (getattr(config, "architectures", None) or [None])[0]
        base_class = transformers.AutoModel._model_mapping[type(config)]
        if architecture in STATIC_HEADS:
            task_class = subclass_for(getattr(transformers, architecture), AdapterMethodsMixin)
            task, info = task_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            model = task.base_model
            with_flexible_heads(model)
            model.add_prediction_head(static_head(model, task, architecture))
        else:
            if architecture is not None and architecture != base_class.__name__:
                logger.warning("adapter_fused: %s was saved from %s; its task head is not turned into a flexible head "
                               "and is dropped (heads converted: %s)", pretrained_model_name_or_path, architecture,
                               ", ".join(STATIC_HEADS))
            model, info = flexible_class(base_class).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                                     **kwargs)
            find_architecture(model)  # ValueError for a model the adapters do not support
            model.add_module(HEADS_MODULE, nn.ModuleDict())
            model.__dict__["_active_head"] = None
        if (Path(pretrained_model_name_or_path) / SETUP_FILE).is_file():
            restore_adapters(model, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model
