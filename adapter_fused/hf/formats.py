"""Every file this package reads or writes: adapter directories, the heads saved beside an adapter, and
the setup file of a checkpoint.

Each file is written to a temporary file in the same directory and then renamed over the target, so a
reader never sees a half-written file; a directory's ``adapter_config.json`` is replaced last.

Adapter directory (``save_adapter``, ``load_adapter``):

- ``adapter_config.json``: ``{"format": "adapter_fused", "format_version": 1, "name", "config"
  (AdapterConfig.to_dict()), "hidden_size", "num_layers", "model_type"}``;
- ``adapter_model.safetensors``: tensors ``<layer>.<site>.{down,up}.{weight,bias}``, where site is
  ``attention``, ``cross`` (after cross-attention, decoder layers) or ``ffn``; ``down.weight`` is
  (r, d), ``up.weight`` (d, r); with the options of ``BottleneckAdapter`` also
  ``<layer>.<site>.scaling``, ``.norm_before.*``, ``.norm_after.*``, ``.gate.*``, and
  ``invertible.{F,G}.{0,2}.{weight,bias}`` for an invertible adapter. Layers in ``leave_out`` have no
  tensors.

Head, beside the adapter (one format for both kinds of head):

- ``head_config.json``: ``{"format": "adapter_fused_head", "format_version": 2, "name", "model_class",
  "hidden_size", "config", "parameters"}``. ``config`` is the head config (``head_type`` and options) of
  a prediction head of a model with flexible heads (``AutoAdapterModel``), or null for the task head of
  a transformers task model (its parameters outside ``model.base_model``, see
  ``model.head_parameters``); ``parameters`` maps each tensor name to its shape;
- ``head_model.safetensors``: the tensors: a prediction head's ``state_dict()`` (``1.weight``, ...), or a
  task head's parameters under their names in the model (``classifier.weight`` (num_labels, d), ...).

A directory saved without a head has neither file (a save without head removes them), so it never
pairs an adapter with another model's head. Also read: AdapterHub's adapter directories
(``adapter_config.json`` with ``adapter.safetensors`` or ``pytorch_adapter.bin``) and heads
(``head_config.json`` without ``format``, with ``model_head.safetensors`` or ``pytorch_model_head.bin``),
and the two head layouts this package wrote before: a task head as ``adapter_head.json`` (format
``adapter_fused_head`` 1: ``model_class``, ``parameters``) with ``adapter_head.safetensors``, and a
prediction head as ``head_config.json`` (format ``adapter_fused_prediction_head`` 1: ``name``,
``hidden_size``, ``config``) with ``head_model.safetensors``.

Fusion (``save_adapter_fusion``, ``load_adapter_fusion``), in AdapterHub's files: ``adapter_fusion_config.json``
(``name``, ``adapter_names``, ``config`` (``fusion.FusionConfig.to_dict()``), ``hidden_size``, ``model_class``,
``model_type``) and the weights under AdapterHub's names (``<layer path>.<location>.adapter_fusion_layer.<name>.
{query,key,value}.*``) in ``pytorch_model_adapter_fusion.bin`` or ``model_adapter_fusion.safetensors``.

Checkpoint setup (``write_setup``, ``read_setup``): the adapters' and heads' weights are parameters of
the model, so transformers' ``save_pretrained`` (and ``Trainer.save_model`` and Trainer's periodic
checkpoints, which call it) already write them into ``model.safetensors`` under keys such as
``bert.fused_adapters.<name>.<layer>.<site>.*`` and ``heads.<name>.*``. What the weights do not say
(the adapters' configs, the heads' types, which setup is active) ``save_pretrained`` of a model given
the methods (``methods``) writes beside them in ``adapter_fused_setup.json``:

    {"format": "adapter_fused_setup", "format_version": 1, "model_class",
     "adapters_module": "bert.fused_adapters", "adapters": {name: AdapterConfig.to_dict()},
     "active": name | null | {"list": [...]} | {"block": "module:Class", "children": [...], ...},
     "heads_module": "heads", "heads": {name: head config}, "active_head": name | null,
     "fusions": {name: {"adapter_names": [...], "config": FusionConfig.to_dict()}}  (only with fusions)}

``auto.restore_adapters`` reads it back with the weights (``checkpoint_tensors``, ``restore_fusions``).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapterhub.convert import (
    ADAPTERHUB_HEAD_WEIGHTS,
    ADAPTERHUB_WEIGHTS,
    FUSION_CONFIG,
    FUSION_WEIGHTS,
    adapterhub_weights_by_layer,
    config_from_adapterhub,
    fusion_weights_from_adapterhub,
    fusion_weights_to_adapterhub,
    head_config_from_adapterhub,
    is_adapterhub_config,
    weights_from_adapterhub,
)
from .composition import FUSION_KEY, Average, BatchSplit, Composition, Fuse, Split
from .config import AdapterConfig
from .fusion import FusionConfig, attach_fusion, build_fusion, get_fusion, list_fusions
from .layouts import find_architecture, hidden_size
from .model import (
    active_adapter,
    adapter_config,
    adapter_modules,
    attach_adapter,
    build_adapter_modules,
    check_name,
    head_parameters,
    list_adapters,
    model_state,
    saved_head_parameters,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "adapter_fused"
FORMAT_VERSION = 1
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head_model.safetensors"
HEAD_FORMAT = "adapter_fused_head"
HEAD_FORMAT_VERSION = 2
LEGACY_HEAD_CONFIG_FILE = "adapter_head.json"
"""A task head as this package wrote it before (format ``adapter_fused_head`` 1); read, never written."""
LEGACY_HEAD_WEIGHTS_FILE = "adapter_head.safetensors"
LEGACY_PREDICTION_HEAD_FORMAT = "adapter_fused_prediction_head"
"""The format (version 1) of ``head_config.json`` for a prediction head as written before; read, never written."""
HEAD_FILES = (HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, LEGACY_HEAD_CONFIG_FILE, LEGACY_HEAD_WEIGHTS_FILE)
"""Every head file a save replaces or removes."""

SETUP_FILE = "adapter_fused_setup.json"
SETUP_FORMAT = "adapter_fused_setup"
SETUP_FORMAT_VERSION = 1
_BLOCK_OPTIONS = ("batch_sizes", "weights", "normalize_weights", "splits", "name")

logger = logging.getLogger(__name__)


# -- reading and writing files -----------------------------------------------------------------------

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


def _write_files(target: Path, files: list[tuple[str, bytes]]) -> None:
    """Write every file of ``files`` (name, bytes) into the directory ``target``: all to temporary files
    first, then each renamed over its target in order; nothing is replaced when a write fails."""
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


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 - a bad file
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a damaged or foreign file
        raise ValueError(f"{path}: cannot read adapter weights, the file is truncated or not a weights file "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    return dict(state)


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def fill_adapter_modules(modules: nn.Module, weights: Mapping[str, torch.Tensor], source: Path) -> None:
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


# -- heads -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadToSave:
    """A head to write beside an adapter: a prediction head's ``config`` (None for a task model's own
    head) and its tensors by name."""

    name: str
    config: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SavedHead:
    """A head found beside an adapter, read by ``read_head``; its tensors are read by ``tensors()``.

    config: a prediction head's config in this package's terms (converted from AdapterHub's where it
        saved the head), or None for a task model's own head (tensors named as the model's parameters).
    parameters: the tensor names and shapes the head's JSON lists (checked against the weights), or
        None where it lists none (AdapterHub's heads, prediction heads of format 1).
    prefix: stripped from the saved tensor names (AdapterHub saves ``heads.<name>.``).
    """

    name: str
    config: dict[str, Any] | None
    config_path: Path
    weights_path: Path
    parameters: dict[str, Any] | None = None
    prefix: str = ""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors, under the names of the head (``config``) or of the model (task head)."""
        saved = _read_weights(self.weights_path)
        if self.prefix:
            saved = {k.removeprefix(self.prefix): v for k, v in saved.items()}
        shapes = self.parameters
        if shapes is not None:
            for key in sorted(set(shapes) | set(saved)):
                if key not in saved or key not in shapes or list(saved[key].shape) != list(shapes[key]):
                    raise ValueError(f"{self.weights_path}: tensor {key} does not match {self.config_path.name}")
        return saved


def task_head(model: nn.Module, name: str) -> HeadToSave | None:
    """The task head of a transformers task model (see ``model.saved_head_parameters``) to save beside
    adapter ``name``; None for a model without one."""
    head: dict[str, torch.Tensor] = {n: p for n, p in saved_head_parameters(model)}
    return HeadToSave(name, None, head) if head else None


def _head_meta(model: nn.Module, head: HeadToSave) -> dict[str, Any]:
    return {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "name": head.name,
        "model_class": type(model).__name__,
        "hidden_size": hidden_size(model),
        "config": head.config,
        "parameters": {n: list(t.shape) for n, t in head.tensors.items()},
    }


def _head_files(model: nn.Module, head: HeadToSave) -> list[tuple[str, bytes]]:
    return [(HEAD_WEIGHTS_FILE, _safetensors(head.tensors)), (HEAD_CONFIG_FILE, _json_bytes(_head_meta(model, head)))]


def write_head(model: nn.Module, head: HeadToSave, directory: str | os.PathLike[str]) -> None:
    """Write ``head`` into ``directory`` (created if missing) as ``head_config.json`` and
    ``head_model.safetensors``, each replaced atomically (beside a fusion, say)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    _write_files(target, _head_files(model, head))


def read_head(model: nn.Module, directory: str | os.PathLike[str], prediction: bool) -> SavedHead | None:
    """The head saved in adapter ``directory`` for ``model``: with ``prediction``, a prediction head
    (this package's or AdapterHub's), else a task model's own head; None where the directory holds no
    head of that kind. Checks the JSON and the hidden size, not the weights (read by ``tensors()``).
    FileNotFoundError for head weights without their config, or a config without its weights."""
    root = Path(directory)
    config_path = root / HEAD_CONFIG_FILE
    hub_weights = [root / f for f in ADAPTERHUB_HEAD_WEIGHTS if (root / f).is_file()]
    if not config_path.exists():
        if (root / HEAD_WEIGHTS_FILE).exists() or (prediction and hub_weights):
            raise FileNotFoundError(f"{config_path}: head config not found (the directory has head weights)")
        return None if prediction else _read_legacy_task_head(root)
    meta = _read_json(config_path)
    form, version = meta.get("format"), meta.get("format_version")
    if form == HEAD_FORMAT and version == HEAD_FORMAT_VERSION:
        found = meta.get("config") is not None  # a prediction head; null: a task model's head
    elif form == LEGACY_PREDICTION_HEAD_FORMAT and version == 1:
        found = True
    elif "format" not in meta and isinstance(meta.get("config"), dict) and "head_type" in meta["config"]:
        found = True  # AdapterHub's
    else:
        raise ValueError(f"{config_path}: neither an adapter_fused nor an AdapterHub head config "
                         f"(format {form!r}, format_version {version!r})")
    if found != prediction:
        return None if prediction else _read_legacy_task_head(root)
    if meta.get("hidden_size") not in (None, hidden_size(model)):
        raise ValueError(f"{config_path}: head was saved for hidden size {meta['hidden_size']}, the model has "
                         f"{hidden_size(model)}")
    name = str(meta.get("name") or "head")
    weights_path = root / HEAD_WEIGHTS_FILE
    if form == HEAD_FORMAT:
        shapes = meta.get("parameters")
        if not isinstance(shapes, dict):
            raise ValueError(f"{config_path}: expected \"parameters\" to map parameter names to shapes")
        head = SavedHead(name, meta.get("config"), config_path, weights_path, shapes)
    elif form == LEGACY_PREDICTION_HEAD_FORMAT:
        head = SavedHead(name, meta.get("config"), config_path, weights_path)
    else:
        if not hub_weights:
            raise FileNotFoundError(f"{root}: no AdapterHub head weights ({' or '.join(ADAPTERHUB_HEAD_WEIGHTS)})")
        config = head_config_from_adapterhub(meta["config"], model, str(config_path))
        head = SavedHead(name, config, config_path, hub_weights[0], prefix=f"heads.{name}.")
    if not head.weights_path.is_file():
        raise FileNotFoundError(f"{head.weights_path}: head weights not found (the directory has {HEAD_CONFIG_FILE})")
    return head


def _read_legacy_task_head(root: Path) -> SavedHead | None:
    """A task head saved as ``adapter_head.json`` + ``adapter_head.safetensors``, or None."""
    config_path, weights_path = root / LEGACY_HEAD_CONFIG_FILE, root / LEGACY_HEAD_WEIGHTS_FILE
    if not config_path.exists() and not weights_path.exists():
        return None
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: head weights not found (the directory has {config_path.name})")
    meta = _read_json(config_path)
    if meta.get("format") != HEAD_FORMAT or meta.get("format_version") != 1:
        raise ValueError(f"{config_path}: not an adapter_fused head config (format {meta.get('format')!r}, "
                         f"format_version {meta.get('format_version')!r})")
    shapes = meta.get("parameters")
    if not isinstance(shapes, dict):
        raise ValueError(f"{config_path}: expected \"parameters\" to map parameter names to shapes")  # noqa: TRY004
    return SavedHead(str(meta.get("name") or root.name), None, config_path, weights_path, shapes)


def _task_head_values(model: nn.Module, root: Path) -> dict[str, tuple[nn.Parameter, torch.Tensor]] | None:
    """The task head saved in ``root`` matched to ``model``'s head parameters, ``{name: (parameter,
    saved tensor)}``, after checking names and shapes; None when ``root`` holds no task head or the
    model has none to restore into."""
    found = read_head(model, root, prediction=False)
    if found is None:
        return None
    saved = found.tensors()
    weights_path = found.weights_path
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


# -- adapter directories -----------------------------------------------------------------------------

def write_adapter(model: nn.Module, name: str, directory: str | os.PathLike[str], head: HeadToSave | None) -> None:
    """Write adapter ``name`` of ``model`` to ``directory`` (created if missing), with ``head`` beside it
    (see the module docstring); without a head, head files an earlier save left there are removed."""
    config = adapter_config(model, name)
    modules = adapter_modules(model, name)
    arch, layers = find_architecture(model)
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
    files = [(WEIGHTS_FILE, _safetensors(modules.state_dict()))]
    if head is not None:
        files.extend(_head_files(model, head))
    files.append((CONFIG_FILE, _json_bytes(meta)))  # replaced last
    _write_files(target, files)
    written = {file_name for file_name, _ in files}
    for stale in HEAD_FILES:
        if stale not in written:
            (target / stale).unlink(missing_ok=True)


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike[str], with_head: bool = True) -> None:
    """Save adapter ``name`` of ``model`` to ``directory`` (created if missing) as
    ``adapter_config.json`` + ``adapter_model.safetensors``, each replaced atomically.

    with_head: also write the model's task head (the parameters outside ``model.base_model`` but for
    the output embeddings, e.g. ``classifier.weight`` (num_labels, d), trained with
    ``train_adapter(..., train_head=True)``) as ``head_config.json`` (parameter names and shapes) +
    ``head_model.safetensors``. A model without a head (a bare base model, or one whose only output
    layer is its output embeddings, such as an ``lm_head``), or whose head ``train_adapter(...,
    train_head=False)`` froze, writes no head files. Head files that an earlier save left in ``directory`` are removed when no head is
    written, so the directory never pairs an adapter with another model's head.
    """
    write_adapter(model, name, directory, task_head(model, name) if with_head else None)


def saved_adapter_name(directory: str | os.PathLike[str]) -> str | None:
    """The name an adapter directory was saved under (None if it records none or cannot be read)."""
    try:
        meta = _read_json(Path(directory) / CONFIG_FILE)
    except (FileNotFoundError, ValueError):
        return None
    name = meta.get("name")
    return name if isinstance(name, str) else None


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None,
                 with_head: bool = True) -> str:
    """Load an adapter saved by ``save_adapter`` or by AdapterHub from ``directory`` into ``model``
    under ``name`` (default: the saved name) and return that name; the adapter is not activated.

    with_head: when ``directory`` holds a task head saved by ``save_adapter(..., with_head=True)``,
    copy it into the model's task head (the parameters outside ``model.base_model``, e.g.
    ``classifier``), so the model computes the logits it was saved with. Names and shapes must match
    the model's head (ValueError naming the parameter otherwise); a bare base model has no head and
    skips it. ``with_head=False`` leaves the model's head untouched. Prediction heads (AdapterHub's,
    or an ``AutoAdapterModel``'s) are read by ``AutoAdapterModel.load_adapter``, not here.

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
    head = _task_head_values(model, root) if with_head and not is_adapterhub_config(meta) else None
    modules = build_adapter_modules(model, config)
    fill_adapter_modules(modules, weights, weights_path)
    attach_adapter(model, name, config, modules)
    if head is not None:
        with torch.no_grad():
            for parameter, value in head.values():
                parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
    return name


# -- fusions, in AdapterHub's files ------------------------------------------------------------------

def save_adapter_fusion(model: nn.Module, name: str, directory: str | os.PathLike[str],
                        use_safetensors: bool = False) -> None:
    """Write the fusion ``name`` of ``model`` to ``directory`` (created if missing) as AdapterHub writes
    one: ``adapter_fusion_config.json`` (``name``, ``adapter_names``, ``config``, ``hidden_size``,
    ``model_class``, ``model_type``) and its weights under AdapterHub's names
    (``encoder.layer.0.output.adapter_fusion_layer.<name>.query.weight``, ...), in
    ``pytorch_model_adapter_fusion.bin`` (a torch state dict, as AdapterHub writes by default and reads
    unless told otherwise), or with ``use_safetensors`` in ``model_adapter_fusion.safetensors``."""
    block = get_fusion(model, name)
    tensors = fusion_weights_to_adapterhub(model, {k: v.detach().to("cpu").contiguous()
                                                   for k, v in block.state_dict().items()}, name)
    arch, _ = find_architecture(model)
    meta = {
        "name": name,
        "adapter_names": list(block.adapter_names),
        "config": block.config.to_dict(),
        "hidden_size": hidden_size(model),
        "model_class": type(model).__name__,
        "model_name": "",
        "model_type": getattr(model.config, "model_type", arch.name),  # type: ignore[union-attr]
    }
    if use_safetensors:
        weights_file, data = FUSION_WEIGHTS[0], _safetensors(tensors)
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        weights_file, data = FUSION_WEIGHTS[1], buffer.getvalue()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    _write_files(target, [(weights_file, data), (FUSION_CONFIG, _json_bytes(meta))])
    for stale in FUSION_WEIGHTS:
        if stale != weights_file:
            (target / stale).unlink(missing_ok=True)


def load_adapter_fusion(model: nn.Module, directory: str | os.PathLike[str], load_as: str | None = None) -> str:
    """Load the fusion saved in ``directory`` (by this package's or AdapterHub's ``save_adapter_fusion``)
    into ``model``, whose adapters it fuses must be there, under ``load_as`` (default: its saved
    name); returns that name. A fusion of that name is replaced (with a warning), as in AdapterHub.
    FileNotFoundError or ValueError naming the file for what does not fit; the model is then
    left as it was."""
    root = Path(directory)
    meta = _read_json(root / FUSION_CONFIG)
    weights_path = next((root / f for f in FUSION_WEIGHTS if (root / f).is_file()), None)
    if weights_path is None:
        raise FileNotFoundError(f"{root}: no fusion weights ({' or '.join(FUSION_WEIGHTS)})")
    saved = meta.get("name")
    if not isinstance(saved, str) or not saved:
        raise ValueError(f"{root / FUSION_CONFIG}: the fusion has no name")
    if meta.get("hidden_size") not in (None, hidden_size(model)):
        raise ValueError(f"{root / FUSION_CONFIG}: fusion was saved for hidden size {meta['hidden_size']}, the model "
                         f"has {hidden_size(model)}")
    adapter_names = meta.get("adapter_names") or saved.split(",")
    try:
        config = FusionConfig.load(meta.get("config"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{root / FUSION_CONFIG}: invalid fusion config ({exc})") from exc
    tensors = fusion_weights_from_adapterhub(model, _read_weights(weights_path), saved, str(weights_path))
    block = build_fusion(model, list(adapter_names), config)
    fill_adapter_modules(block, tensors, weights_path)
    name = load_as or saved
    if name in list_fusions(model):
        logger.warning("adapter_fused: overwriting the existing adapter fusion %r with %s", name, root)
    attach_fusion(model, name, block)
    return name


# -- the setup file of a checkpoint ------------------------------------------------------------------

def _block_options(setup: Any) -> dict[str, Any]:
    """The options of a composition block (this package's or AdapterHub's) that rebuild it."""
    if isinstance(setup, Average):
        return {"weights": list(setup.weights), "normalize_weights": False}
    if isinstance(setup, (BatchSplit, Split)):
        key = "batch_sizes" if isinstance(setup, BatchSplit) else "splits"
        return {key: list(getattr(setup, key))}
    if isinstance(setup, Fuse):
        return {} if setup.fusion_name is None else {"name": setup.fusion_name}
    if isinstance(setup, Composition):
        return {}
    found = {k: vars(setup).get(k) for k in _BLOCK_OPTIONS if vars(setup).get(k) is not None}
    if vars(setup).get("_name") is not None:  # AdapterHub's Fuse keeps its name there
        found["name"] = vars(setup)["_name"]
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in found.items()}


def _encode(setup: Any) -> Any:
    """A JSON form of an active adapter setup (a name, a list, a composition block, or None)."""
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, (list, tuple)):
        return {"list": [_encode(s) for s in setup]}
    children = getattr(setup, "children", None)
    if isinstance(children, (list, tuple)):
        cls = type(setup)
        out: dict[str, Any] = {"block": f"{cls.__module__}:{cls.__qualname__}", "children": [_encode(c) for c in children],
                               **_block_options(setup)}
        json.dumps(out)
        return out
    raise ValueError(f"adapter_fused: cannot record the active adapter setup {setup!r} in a checkpoint")


def decode_setup(data: Any, source: Path) -> Any:
    """The active adapter setup recorded as ``data`` (see ``write_setup``); errors name ``source``."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("list"), list):
        return [decode_setup(d, source) for d in data["list"]]
    if isinstance(data, dict) and isinstance(data.get("block"), str) and isinstance(data.get("children"), list):
        module_name, _, qualname = data["block"].partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{source}: the active setup uses {data['block']}, which cannot be imported ({exc})") from exc
        options = {k: data[k] for k in _BLOCK_OPTIONS if k in data}
        return cls(*[decode_setup(c, source) for c in data["children"]], **options)
    raise ValueError(f"{source}: unreadable active adapter setup {data!r}")


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def write_setup(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write ``adapter_fused_setup.json`` for ``model`` into ``directory`` (replaced atomically);
    a model with neither adapters nor heads writes none and removes a stale one."""
    target = Path(directory)
    names = list_adapters(model)
    heads = model._modules.get("heads") if hasattr(model, "active_head") else None
    if not names and not heads:
        (target / SETUP_FILE).unlink(missing_ok=True)
        return
    state = model_state(model)
    meta: dict[str, Any] = {
        "format": SETUP_FORMAT,
        "format_version": SETUP_FORMAT_VERSION,
        "model_class": type(model).__name__,
        "adapters_module": _module_path(model, state.modules) if state is not None else None,
        "adapters": {name: adapter_config(model, name).to_dict() for name in names},
        "active": _encode(active_adapter(model)),
        "heads_module": _module_path(model, heads) if heads is not None else None,
        "heads": {name: head.config for name, head in heads.items()} if heads is not None else {},
        "active_head": getattr(model, "active_head", None),
    }
    recorded = {}
    for name in list_fusions(model):
        block = get_fusion(model, name)
        recorded[name] = {"adapter_names": list(block.adapter_names), "config": block.config.to_dict()}
    if recorded:
        meta["fusions"] = recorded
    target.mkdir(parents=True, exist_ok=True)
    _write_files(target, [(SETUP_FILE, _json_bytes(meta))])


def restore_fusions(model: nn.Module, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """Add the fusions a checkpoint's setup ``meta`` records (``"fusions"``) to ``model``, whose adapters
    are restored, with their weights from the checkpoint ``tensors``; errors name ``source``."""
    recorded = meta.get("fusions") or {}
    if not isinstance(recorded, dict):
        raise ValueError(f"{source}: expected \"fusions\" to be an object")  # noqa: TRY004
    for name, data in recorded.items():
        try:
            block = build_fusion(model, list(data["adapter_names"]), FusionConfig.load(data["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid fusion {name!r} ({exc})") from exc
        prefix = f"{meta['adapters_module']}.{FUSION_KEY}.{name}."
        fill_adapter_modules(block, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, source)
        attach_fusion(model, name, block)


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


def checkpoint_tensors(root: Path, prefixes: list[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of the checkpoint in ``root`` (``model.safetensors`` or ``pytorch_model.bin``, sharded
    or not) whose names start with one of ``prefixes``, and the (first) file they were read from."""
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
