"""Saving and loading adapters.

``save_adapter`` writes a directory with two files, each written to a temporary file in the same
directory and then renamed over the target, so a reader never sees a half-written file:

- ``adapter_config.json``: ``{"format": "adapter_fused", "format_version": 1, "name", "config"
  (AdapterConfig.to_dict()), "hidden_size", "num_layers", "model_type"}``;
- ``adapter_model.safetensors``: tensors ``<layer>.<site>.{down,up}.{weight,bias}``, where site is
  ``attention``, ``cross`` (after cross-attention, decoder layers) or ``ffn``; ``down.weight`` is
  (r, d), ``up.weight`` (d, r); with the options of ``BottleneckAdapter`` also
  ``<layer>.<site>.scaling``, ``.norm_before.*``, ``.norm_after.*``, ``.gate.*``, and
  ``invertible.{F,G}.{0,2}.{weight,bias}`` for an invertible adapter. Layers in ``leave_out`` have no
  tensors.

With ``with_head=True`` (the default) and a model that has a task head (parameters outside
``model.base_model``, see ``model.head_parameters``), two more files hold the head:

- ``adapter_head.safetensors``: the head's parameters under their names in the model, e.g.
  ``classifier.weight`` (num_labels, d) and ``classifier.bias`` (num_labels,);
- ``adapter_head.json``: ``{"format": "adapter_fused_head", "format_version": 1, "model_class",
  "parameters": {name: shape}}``.

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

from .adapterhub.convert import (
    ADAPTERHUB_WEIGHTS,
    adapterhub_weights_by_layer,
    config_from_adapterhub,
    is_adapterhub_config,
    weights_from_adapterhub,
)
from .config import AdapterConfig
from .layouts import find_architecture, hidden_size
from .model import (
    adapter_config,
    adapter_modules,
    attach_adapter,
    build_adapter_modules,
    check_name,
    head_parameters,
    list_adapters,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "adapter_fused"
FORMAT_VERSION = 1
HEAD_WEIGHTS_FILE = "adapter_head.safetensors"
HEAD_CONFIG_FILE = "adapter_head.json"
HEAD_FORMAT = "adapter_fused_head"


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


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike[str], with_head: bool = True) -> None:
    """Save adapter ``name`` of ``model`` to ``directory`` (created if missing) as
    ``adapter_config.json`` + ``adapter_model.safetensors``, each replaced atomically.

    with_head: also write the model's task head (the parameters outside ``model.base_model``, e.g.
    ``classifier.weight`` (num_labels, d), trained with ``train_adapter(..., train_head=True)``) as
    ``adapter_head.safetensors`` + ``adapter_head.json`` (parameter names and shapes). A model without
    a head (a bare base model, or one whose only output layer is tied to the embeddings) writes no
    head files. Head files that an earlier save left in ``directory`` are removed when no head is
    written, so the directory never pairs an adapter with another model's head.
    """
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
    files = [(WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))]
    head = {n: p.detach().to("cpu").contiguous() for n, p in head_parameters(model)} if with_head else {}
    if head:
        head_meta = {
            "format": HEAD_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "parameters": {n: list(t.shape) for n, t in head.items()},
        }
        files.append((HEAD_WEIGHTS_FILE, save(head, metadata={"format": "pt"})))
        files.append((HEAD_CONFIG_FILE, (json.dumps(head_meta, indent=2, sort_keys=True) + "\n").encode()))
    files.append((CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))  # replaced last
    pending: list[tuple[Path, Path]] = []
    try:
        for file_name, data in files:
            pending.append((_write_atomic(target / file_name, data), target / file_name))
    except BaseException:
        for temp, _ in pending:
            temp.unlink(missing_ok=True)
        raise
    for temp, final in pending:
        os.replace(temp, final)
    if not head:
        for stale in (HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE):
            (target / stale).unlink(missing_ok=True)


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


def _read_head(model: nn.Module, root: Path) -> dict[str, tuple[nn.Parameter, torch.Tensor]] | None:
    """The saved head in ``root`` matched to ``model``'s head parameters, ``{name: (parameter,
    saved tensor)}``, after checking names and shapes; None when ``root`` holds no head or the model
    has none to restore into."""
    config_path, weights_path = root / HEAD_CONFIG_FILE, root / HEAD_WEIGHTS_FILE
    if not config_path.exists() and not weights_path.exists():
        return None
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: head weights not found (the directory has {HEAD_CONFIG_FILE})")
    meta = _read_json(config_path)
    if meta.get("format") != HEAD_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: not an adapter_fused head config (format {meta.get('format')!r}, "
                         f"format_version {meta.get('format_version')!r})")
    shapes = meta.get("parameters")
    if not isinstance(shapes, dict):
        raise ValueError(f"{config_path}: expected \"parameters\" to map parameter names to shapes")
    saved = _read_weights(weights_path)
    for key in sorted(set(shapes) | set(saved)):
        if key not in saved or key not in shapes or list(saved[key].shape) != list(shapes[key]):
            raise ValueError(f"{weights_path}: tensor {key} does not match {config_path.name}")
    head = dict(head_parameters(model))
    if not head:
        return None
    missing, unexpected = sorted(set(head) - set(saved)), sorted(set(saved) - set(head))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model's head has {', '.join(missing)}, which the file lacks")
        if unexpected:
            parts.append(f"the file has {', '.join(unexpected)}, which is not a head parameter of this model")
        raise ValueError(f"{weights_path}: saved head does not match this model ({'; '.join(parts)}); "
                         f"pass with_head=False to load the adapter alone")
    for key, parameter in head.items():
        if tuple(saved[key].shape) != tuple(parameter.shape):
            raise ValueError(f"{weights_path}: head parameter {key} has shape {tuple(saved[key].shape)}, this model "
                             f"expects {tuple(parameter.shape)}; pass with_head=False to load the adapter alone")
        if not saved[key].is_floating_point():
            raise ValueError(f"{weights_path}: head parameter {key} has dtype {saved[key].dtype}, expected a floating "
                             f"point type")
    return {key: (parameter, saved[key]) for key, parameter in head.items()}


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None,
                 with_head: bool = True) -> str:
    """Load an adapter saved by ``save_adapter`` or by AdapterHub from ``directory`` into ``model``
    under ``name`` (default: the saved name) and return that name; the adapter is not activated.

    with_head: when ``directory`` holds a head saved by ``save_adapter(..., with_head=True)``, copy
    it into the model's task head (the parameters outside ``model.base_model``, e.g. ``classifier``),
    so the model computes the logits it was saved with. Names and shapes must match the model's head
    (ValueError naming the parameter otherwise); a bare base model has no head and skips it.
    ``with_head=False`` leaves the model's head untouched. AdapterHub's own prediction heads are not
    read.

    Raises FileNotFoundError for missing files and ValueError naming the file for a damaged file,
    tensors that do not fit the model, or a config the fused adapter cannot express. Every check
    runs before anything is changed: on an error the model is left as it was.
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
        by_layer = adapterhub_weights_by_layer(model, _read_weights(weights_path), str(weights_path))
        saved_name, weights = weights_from_adapterhub(by_layer, str(weights_path))
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
    name = check_name(name if name is not None else (saved_name or root.name))
    if name in list_adapters(model):
        raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it or pass another name")
    head = _read_head(model, root) if with_head and not is_adapterhub_config(meta) else None
    modules = build_adapter_modules(model, config)
    _fill(modules, weights, weights_path)
    attach_adapter(model, name, config, modules)
    if head is not None:
        with torch.no_grad():
            for parameter, value in head.values():
                parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
    return name
