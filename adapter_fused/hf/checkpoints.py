"""Checkpoints that keep their adapters.

The adapters' and heads' weights are parameters of the model, so transformers' ``save_pretrained``
(and ``Trainer.save_model`` and Trainer's periodic checkpoints, which call it) already write them
into ``model.safetensors`` under keys such as ``bert.fused_adapters.<name>.<layer>.<site>.*`` and
``heads.<name>.*``. What the weights do not say (the adapters' configs, the heads' types, which
setup is active) ``save_pretrained`` of a model given the methods by ``adapter_fused.init`` or
``AutoAdapterModel`` writes beside them in ``adapter_fused_setup.json``:

    {"format": "adapter_fused_setup", "format_version": 1, "model_class",
     "adapters_module": "bert.fused_adapters", "adapters": {name: AdapterConfig.to_dict()},
     "active": name | null | {"list": [...]} | {"block": "module:Class", "children": [...], ...},
     "heads_module": "heads", "heads": {name: head config}, "active_head": name | null}

``AutoAdapterModel.from_pretrained(directory)`` restores all of it; for any other model loaded from
the directory (``AutoModelForSequenceClassification.from_pretrained(directory)``, which logs that the
``fused_adapters`` weights were not used), ``restore_adapters(model, directory)`` does. Once this
module is imported (by ``adapter_fused.hf``), that transformers warning ends with a line saying so.
``Trainer(...).train(resume_from_checkpoint=...)`` needs nothing from here: the model it resumes
already has its adapters, and the checkpoint's weights load into them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import model as _model
from .config import AdapterConfig
from .io import _fill, _read_json, _read_weights, _write_atomic

SETUP_FILE = "adapter_fused_setup.json"
DROPPED_HINT = ("adapter_fused: the fused_adapters weights named above are adapters; load the directory with "
                "adapter_fused.AutoAdapterModel.from_pretrained(path), or call adapter_fused.restore_adapters(model, "
                "path) on this model to bring them back with their configs and active setup")
SETUP_FORMAT = "adapter_fused_setup"
SETUP_FORMAT_VERSION = 1
_BLOCK_OPTIONS = ("batch_sizes", "weights", "normalize_weights")


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
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DroppedAdaptersHint) for f in logger.filters):
            logger.addFilter(_DroppedAdaptersHint())


install_dropped_adapters_hint()


def _encode(setup: Any) -> Any:
    """A JSON form of an active adapter setup (a name, a list, a composition block, or None)."""
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, (list, tuple)):
        return {"list": [_encode(s) for s in setup]}
    children = getattr(setup, "children", None)
    if isinstance(children, list):
        cls = type(setup)
        out: dict[str, Any] = {"block": f"{cls.__module__}:{cls.__qualname__}", "children": [_encode(c) for c in children]}
        for key in _BLOCK_OPTIONS:
            value = vars(setup).get(key)
            if value is not None:
                out[key] = list(value) if isinstance(value, (list, tuple)) else value
        json.dumps(out)
        return out
    raise ValueError(f"adapter_fused: cannot record the active adapter setup {setup!r} in a checkpoint")


def _decode(data: Any, source: Path) -> Any:
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("list"), list):
        return [_decode(d, source) for d in data["list"]]
    if isinstance(data, dict) and isinstance(data.get("block"), str) and isinstance(data.get("children"), list):
        module_name, _, qualname = data["block"].partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{source}: the active setup uses {data['block']}, which cannot be imported ({exc})") from exc
        options = {k: data[k] for k in _BLOCK_OPTIONS if k in data}
        return cls(*[_decode(c, source) for c in data["children"]], **options)
    raise ValueError(f"{source}: unreadable active adapter setup {data!r}")


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def write_setup(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write ``adapter_fused_setup.json`` for ``model`` into ``directory`` (replaced atomically);
    a model with neither adapters nor heads writes none and removes a stale one."""
    target = Path(directory)
    names = _model.list_adapters(model)
    heads = model._modules.get("heads") if hasattr(model, "active_head") else None
    if not names and not heads:
        (target / SETUP_FILE).unlink(missing_ok=True)
        return
    state = _model.model_state(model)
    meta: dict[str, Any] = {
        "format": SETUP_FORMAT,
        "format_version": SETUP_FORMAT_VERSION,
        "model_class": type(model).__name__,
        "adapters_module": _module_path(model, state.modules) if state is not None else None,
        "adapters": {name: _model.adapter_config(model, name).to_dict() for name in names},
        "active": _encode(_model.active_adapter(model)),
        "heads_module": _module_path(model, heads) if heads is not None else None,
        "heads": {name: head.config for name, head in heads.items()} if heads is not None else {},
        "active_head": getattr(model, "active_head", None),
    }
    target.mkdir(parents=True, exist_ok=True)
    temp = _write_atomic(target / SETUP_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    os.replace(temp, target / SETUP_FILE)


def _checkpoint_tensors(root: Path, prefixes: list[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of the checkpoint in ``root`` whose names start with one of ``prefixes``."""
    from safetensors import safe_open

    def wanted(key: str) -> bool:
        return any(key.startswith(p) for p in prefixes)

    out: dict[str, torch.Tensor] = {}
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (root / single).is_file():
            files = [root / single]
        elif (root / index).is_file():
            weight_map = _read_json(root / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{root / index}: expected a \"weight_map\"")
            files = [root / f for f in sorted({f for k, f in weight_map.items() if wanted(k)})]
        else:
            continue
        for path in files:
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        out.update({k: handle.get_tensor(k) for k in handle.keys() if wanted(k)})  # noqa: SIM118
                except Exception as exc:  # a damaged or foreign file
                    raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
            else:
                out.update({k: v for k, v in _read_weights(path).items() if wanted(k)})
        return out, files[0] if files else root / single
    raise FileNotFoundError(f"{root}: no model weights (model.safetensors, pytorch_model.bin or their index)")


def read_setup(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_fused_setup.json`` of a checkpoint directory."""
    path = Path(directory) / SETUP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter setup in this checkpoint (it is written by save_pretrained of a "
                                f"model given the methods by adapter_fused.init or AutoAdapterModel)")
    meta = _read_json(path)
    if meta.get("format") != SETUP_FORMAT or meta.get("format_version") != SETUP_FORMAT_VERSION:
        raise ValueError(f"{path}: not an adapter_fused setup (format {meta.get('format')!r}, format_version "
                         f"{meta.get('format_version')!r})")
    if not isinstance(meta.get("adapters"), dict) or not isinstance(meta.get("heads", {}), dict):
        raise ValueError(f"{path}: expected \"adapters\" and \"heads\" to be objects")  # noqa: TRY004
    return meta


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
    from .heads import FlexibleHeadsMixin, build_head, load_head_weights, with_flexible_heads
    from .methods import init

    root = Path(directory)
    source = root / SETUP_FILE
    meta = read_setup(root)
    adapters: dict[str, Any] = meta["adapters"]
    heads: dict[str, Any] = meta.get("heads") or {}
    flexible = isinstance(model, FlexibleHeadsMixin)
    if heads and not flexible and getattr(model, "base_model", model) is not model:
        raise ValueError(f"{source}: the checkpoint has prediction heads ({', '.join(heads)}), which a task model "
                         f"({type(model).__name__}) cannot hold; load it with adapter_fused.AutoAdapterModel")
    clash = sorted(set(adapters) & set(_model.list_adapters(model)))
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
    tensors, weights_path = _checkpoint_tensors(root, prefixes) if prefixes else ({}, root)

    built: list[tuple[str, AdapterConfig, nn.ModuleDict]] = []
    for name, data in adapters.items():
        name = _model.check_name(name)
        try:
            config = AdapterConfig.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid config of adapter {name!r} ({exc})") from exc
        modules = _model.build_adapter_modules(model, config)
        prefix = f"{meta['adapters_module']}.{name}."
        _fill(modules, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, weights_path)
        built.append((name, config, modules))
    built_heads = []
    for name, config in heads.items():
        _model.check_name(name)
        try:
            head = build_head(model, name, config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid config of head {name!r} ({exc})") from exc
        prefix = f"{meta['heads_module']}.{name}."
        load_head_weights(head, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                          str(weights_path))
        built_heads.append(head)
    active = _decode(meta.get("active"), source)
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
            _model.attach_adapter(model, name, config, modules)
            attached.append(name)
        _model.set_active_adapters(model, active)
    except BaseException:
        for name in attached:
            _model.delete_adapter(model, name)
        raise
    for head in built_heads:
        model.add_prediction_head(head, set_active=False)  # type: ignore[attr-defined]
    if heads:
        model.active_head = active_head  # type: ignore[attr-defined]
    return attached
