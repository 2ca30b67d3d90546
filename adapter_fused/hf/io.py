"""Saving and loading adapters.

``save_adapter`` writes a directory with two files, each written to a temporary file in the same
directory and then renamed over the target, so a reader never sees a half-written file:

- ``adapter_config.json``: ``{"format": "adapter_fused", "format_version": 1, "name", "config"
  (AdapterConfig.to_dict()), "hidden_size", "num_layers", "model_type"}``;
- ``adapter_model.safetensors``: tensors ``<layer>.<site>.{down,up}.{weight,bias}``, where site is
  ``attention`` or ``ffn``; ``down.weight`` is (r, d), ``up.weight`` (d, r).

``load_adapter`` reads that layout and also directories saved by AdapterHub (``adapter_config.json``
with ``adapter.safetensors`` or ``pytorch_adapter.bin``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapterhub import ADAPTERHUB_WEIGHTS, config_from_adapterhub, is_adapterhub_config, weights_from_adapterhub
from .architectures import find_architecture, hidden_size
from .config import AdapterConfig
from .model import _check_name, adapter_config, adapter_modules, attach_adapter, build_adapter_modules, list_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "adapter_fused"
FORMAT_VERSION = 1


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path`` (flushed to disk); returns its path."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return Path(temp)


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike[str]) -> None:
    """Save adapter ``name`` of ``model`` to ``directory`` (created if missing) as
    ``adapter_config.json`` + ``adapter_model.safetensors``, each replaced atomically."""
    from safetensors.torch import save

    config = adapter_config(model, name)
    modules = adapter_modules(model, name)
    arch, layers = find_architecture(model)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in modules.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": config.to_dict(),
        "hidden_size": hidden_size(model),
        "num_layers": len(layers),
        "model_type": getattr(model.config, "model_type", arch.name),  # type: ignore[union-attr]
    }
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    pending = [
        (_write_atomic(target / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"})), target / WEIGHTS_FILE),
        (_write_atomic(target / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()),
         target / CONFIG_FILE),
    ]
    for temp, final in pending:
        os.replace(temp, final)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a damaged or foreign file
        raise ValueError(f"{path}: cannot read adapter weights, the file is truncated or not a weights file "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(state)


def _fill(modules: nn.ModuleDict, weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copy ``weights`` into ``modules`` after checking names and shapes; errors name ``source``."""
    expected = modules.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise ValueError(f"{source}: tensors do not match this model's adapter layout: {'; '.join(parts)}")
    for key, target in expected.items():
        if tuple(weights[key].shape) != tuple(target.shape):
            raise ValueError(f"{source}: tensor {key} has shape {tuple(weights[key].shape)}, this model expects "
                             f"{tuple(target.shape)}")
        if not weights[key].is_floating_point():
            raise ValueError(f"{source}: tensor {key} has dtype {weights[key].dtype}, expected a floating point type")
    with torch.no_grad():
        for key, parameter in modules.state_dict(keep_vars=True).items():
            parameter.copy_(weights[key].to(device=parameter.device, dtype=parameter.dtype))


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None) -> str:
    """Load an adapter saved by ``save_adapter`` or by AdapterHub from ``directory`` into ``model``
    under ``name`` (default: the saved name) and return that name; the adapter is not activated.

    Raises FileNotFoundError for missing files and ValueError naming the file for a damaged file,
    tensors that do not fit the model, or a config the fused adapter cannot express.
    """
    root = Path(directory)
    config_path = root / CONFIG_FILE
    meta = _read_json(config_path)
    d = hidden_size(model)
    _, layers = find_architecture(model)
    if is_adapterhub_config(meta):
        config = config_from_adapterhub(meta["config"], str(config_path))
        weights_path = next((root / f for f in ADAPTERHUB_WEIGHTS if (root / f).is_file()), None)
        if weights_path is None:
            raise FileNotFoundError(f"{root}: no AdapterHub weights ({' or '.join(ADAPTERHUB_WEIGHTS)})")
        saved_name, weights = weights_from_adapterhub(_read_weights(weights_path), str(weights_path))
        saved_name = meta.get("name") or saved_name
    elif meta.get("format") == FORMAT:
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported format_version {meta.get('format_version')!r}")
        try:
            config = AdapterConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{config_path}: invalid adapter config ({exc})") from exc
        if meta.get("num_layers") not in (None, len(layers)):
            raise ValueError(f"{config_path}: adapter has {meta['num_layers']} layers, the model has {len(layers)}")
        weights_path = root / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: adapter weights not found")
        weights = _read_weights(weights_path)
        saved_name = meta.get("name")
    else:
        raise ValueError(f"{config_path}: neither an adapter_fused nor an AdapterHub adapter config")
    saved_d = meta.get("hidden_size")
    if saved_d is not None and saved_d != d:
        raise ValueError(f"{config_path}: adapter was saved for hidden size {saved_d}, the model has {d}")
    name = _check_name(name if name is not None else (saved_name or root.name))
    if name in list_adapters(model):
        raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it or pass another name")
    modules = build_adapter_modules(model, config)
    _fill(modules, weights, weights_path)
    attach_adapter(model, name, config, modules)
    return name
