"""AdapterHub's names and formats translated into this package's: its bottleneck configs
(``config_from_adapterhub``), its saved weights (``weights_from_adapterhub``, after
``adapterhub_weights_by_layer``), its prediction head configs (``head_config_from_adapterhub``) and its
composition blocks (``block_from_adapterhub``). Nothing here imports ``adapters``: the files and objects
are read as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...activations import ACTIVATIONS, canonical_activation
from ..config import PLACEMENTS, AdapterConfig, Placement
from ..layouts import hidden_size, model_layers

ADAPTERHUB_CONFIG = "adapter_config.json"
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
ADAPTERHUB_HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
"""The weight files of a head saved by AdapterHub beside its ``head_config.json``."""

_INITS = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "mam"}
_ACTIVATION_NAMES = {"leakyrelu": "leaky_relu"}

# (key, value that the fused path can express, description of anything else)
_REQUIRED: tuple[tuple[str, Any, str], ...] = (
    ("phm_layer", False, "PHM (parameterized hypercomplex) layers"),
)
_FLAGS = ("ln_before", "ln_after", "adapter_residual_before_ln", "use_gating", "cross_adapter")


def is_adapterhub_config(data: Mapping[str, Any]) -> bool:
    """Whether a parsed ``adapter_config.json`` was written by AdapterHub."""
    return isinstance(data.get("config"), Mapping) and str(data.get("version", "")).startswith("adapters")


def config_from_adapterhub(data: Mapping[str, Any], source: str) -> AdapterConfig:
    """The AdapterConfig equal to an AdapterHub bottleneck config (the ``"config"`` entry of its
    ``adapter_config.json``). Raises ValueError naming ``source`` and every option the fused
    adapters cannot express."""
    problems = []
    architecture = data.get("architecture", "bottleneck")
    if architecture not in ("bottleneck", None):
        raise ValueError(f"{source}: adapter architecture {architecture!r} is not a bottleneck adapter")
    for key, wanted, what in _REQUIRED:
        if key in data and data[key] != wanted and not (wanted is False and not data[key]):
            problems.append(what)
    scaling = data.get("scaling", 1.0)
    if isinstance(scaling, bool) or not (isinstance(scaling, (int, float)) or scaling in ("learned", "channel")):
        problems.append(f"scaling={scaling!r}")
    if data.get("stochastic_depth") or 0.0:
        problems.append(f"stochastic_depth={data['stochastic_depth']}")
    reduction = data.get("reduction_factor", 16)
    if isinstance(reduction, Mapping):
        reduction = dict(reduction)
        if set(reduction) == {"default"}:
            reduction = reduction["default"]
    activation = str(data.get("non_linearity") or "linear").lower()
    try:
        activation = canonical_activation(_ACTIVATION_NAMES.get(activation, activation))
    except ValueError:
        problems.append(f"activation {activation!r} (supported: {', '.join(sorted(ACTIVATIONS))})")
    init = _INITS.get(str(data.get("init_weights", "bert")), "bert")
    if not (data.get("mh_adapter") or data.get("output_adapter")):
        problems.append("no adapter site (mh_adapter and output_adapter both false)")
    if problems:
        raise ValueError(f"{source}: the fused adapter cannot express this AdapterHub config: {'; '.join(problems)}")
    parallel = bool(data.get("is_parallel", False))
    original_ln_after = data.get("original_ln_after", True)
    original_ln_after = True if original_ln_after is None else bool(original_ln_after)
    placement = Placement(
        attention=bool(data.get("mh_adapter")),
        ffn=bool(data.get("output_adapter")),
        original_ln_before=bool(data.get("original_ln_before", False)),
        residual_before_ln=data.get("residual_before_ln", True),
        parallel=parallel,
        original_ln_after=original_ln_after,
    )
    if placement.parallel:  # a parallel adapter ignores original_ln_before and residual_before_ln
        placement = Placement(placement.attention, placement.ffn, parallel=True, original_ln_after=original_ln_after)
    named = next((name for name, preset in PLACEMENTS.items() if preset == placement), None)
    flags: dict[str, Any] = {flag: bool(data.get(flag) or False) for flag in _FLAGS}
    if data.get("inv_adapter"):
        flags["inv_adapter"] = data["inv_adapter"]
        flags["inv_adapter_reduction_factor"] = data.get("inv_adapter_reduction_factor")
    if parallel or not flags["ln_after"]:
        flags["adapter_residual_before_ln"] = False  # no effect there in AdapterHub
    try:
        return AdapterConfig(placement=named or placement, reduction_factor=reduction, activation=activation,
                             scale=scaling if isinstance(scaling, str) else float(scaling), init=init,
                             leave_out=tuple(data.get("leave_out") or ()), dropout=float(data.get("dropout") or 0.0),
                             **flags)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: the fused adapter cannot express this AdapterHub config: {exc}") from exc


_KEY = re.compile(r"^(?:.*\.)?(\d+)\.(.+)\.adapters\.([^.]+)\.(.+)$")
_INVERTIBLE = re.compile(r"^(?:.*\.)?invertible_adapters\.([^.]+)\.([FG]\.[02]\.(?:weight|bias))$")
_PARTS = {  # AdapterHub's parameter name in an adapter -> ours (adapter_down.N: see weights_from_adapterhub)
    "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias", "scaling": "scaling",
    "adapter_norm_before.weight": "norm_before.weight", "adapter_norm_before.bias": "norm_before.bias",
    "adapter_norm_after.weight": "norm_after.weight", "adapter_norm_after.bias": "norm_after.bias",
    "gate.weight": "gate.weight", "gate.bias": "gate.bias",
}


def _site_of(location: str) -> str | None:
    """Our site for an AdapterHub location: ``cross`` (a location ``adapterhub_weights_by_layer``
    gave), a location naming attention, else the feed-forward site; None for a cross-attention location
    no site was found for."""
    if location == "cross":
        return "cross"
    if "cross" in location:
        return None
    return "attention" if "attention" in location else "ffn"


def weights_from_adapterhub(state: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """AdapterHub weight keys (``...<layer>.<location>.adapters.<name>.adapter_down.0.weight``) ->
    the saved adapter name and ``{"<layer>.<site>.down.weight": tensor, ...}``: the projections
    (``down``, ``up``) and the extras of ``BottleneckAdapter`` (``scaling``, ``norm_before``,
    ``norm_after``, ``gate``). With ``ln_before`` AdapterHub's ``adapter_down`` is (LayerNorm, Linear,
    activation) and its LayerNorm is saved twice (as ``adapter_down.0`` and ``adapter_norm_before``);
    the down-projection is then ``adapter_down.1``. An invertible adapter's
    ``invertible_adapters.<name>.F.0.weight`` (and G, biases, index 2) becomes ``invertible.F.0.weight``. Raises ValueError naming ``source`` for keys that
    are not bottleneck adapter weights or that mix adapter names."""
    out: dict[str, torch.Tensor] = {}
    names = set()
    unexpected = []
    prefixes_with_norm = {key[: -len("adapter_norm_before.weight")] for key in state
                          if key.endswith(".adapter_norm_before.weight")}
    for key, tensor in state.items():
        inverse = _INVERTIBLE.match(key)
        if inverse is not None:
            names.add(inverse.group(1))
            out[f"invertible.{inverse.group(2)}"] = tensor
            continue
        match = _KEY.match(key)
        site = _site_of(match.group(2)) if match is not None else None
        if match is None or site is None:
            unexpected.append(key)
            continue
        layer, _, name, part = match.groups()
        if part.startswith("adapter_down."):
            index, _, kind = part[len("adapter_down."):].partition(".")
            normed = key[: -len(part)] in prefixes_with_norm
            if kind not in ("weight", "bias") or index != ("1" if normed else "0"):
                if normed and index == "0":
                    continue  # the copy of adapter_norm_before
                unexpected.append(key)
                continue
            ours = f"down.{kind}"
        elif part in _PARTS:
            ours = _PARTS[part]
        else:
            unexpected.append(key)
            continue
        names.add(name)
        out[f"{layer}.{site}.{ours}"] = tensor
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else "")
        raise ValueError(f"{source}: weights that are not bottleneck adapter projections: {shown}")
    if len(names) != 1:
        raise ValueError(f"{source}: expected the weights of one adapter, found names {sorted(names) or 'none'}")
    return names.pop(), out


def _hub_sites(model: nn.Module) -> tuple[dict[str, tuple[int, str]], dict[tuple[int, str], str]] | None:
    """Where AdapterHub keeps each site's modules in ``model``: ``{name: (layer number, site)}`` for every
    name it may use (relative to the base model, e.g. ``encoder.layer.0.output``), and ``{(layer
    number, site): the name it writes}``; None for models whose sites do not say (structural or
    registered layouts)."""
    arch, layers = model_layers(model)
    table: dict[str, tuple[int, str]] = {}
    written: dict[tuple[int, str], str] = {}
    for layer in layers:
        for name, spec in layer.sites.items():
            location = spec.hub_location
            if location is None:
                return None
            table[f"{layer.path}.{location}"] = (layer.index, name)
            written[(layer.index, name)] = f"{layer.path}.{location}"
            if arch.hub_layers is not None:
                position = layer.path.rsplit(".", 1)[-1]
                table[f"{arch.hub_layers}.{position}.{location}"] = (layer.index, name)
                written[(layer.index, name)] = f"{arch.hub_layers}.{position}.{location}"
    return table, written


def _hub_site(table: dict[str, tuple[int, str]], head: str) -> tuple[int, str] | None:
    """The (layer number, site) of an AdapterHub module name (a key of ``table`` or ending in one)."""
    matches = [k for k in table if head == k or head.endswith("." + k)]
    return table[max(matches, key=len)] if matches else None


def adapterhub_weights_by_layer(model: nn.Module, weights: dict[str, Any], source: str) -> dict[str, Any]:
    """AdapterHub weight names (``<layer path>.<location>.adapters.<name>.<projection>``) renamed to
    ``<layer number>.attention.adapters...`` or ``<layer number>.output.adapters...`` by matching each
    name's layer path and location against this model's layers and sites, so that the weights of an
    encoder-decoder model reach the right stack (``<layer number>.cross.adapters...`` for the sites
    after cross-attention). Models whose sites do not say where AdapterHub keeps them (structural or
    registered layouts) get ``weights`` unchanged. ValueError naming ``source`` for adapter weights at a
    location no site of this model has."""
    sites = _hub_sites(model)
    if sites is None:
        return weights
    locations = {"attention": "attention", "cross": "cross", "ffn": "output"}
    out: dict[str, Any] = {}
    for key, value in weights.items():
        head, sep, tail = key.partition(".adapters.")
        if not sep:
            out[key] = value  # not an adapter weight: weights_from_adapterhub names it
            continue
        where = _hub_site(sites[0], head)
        if where is None:
            raise ValueError(f"{source}: {key} is not at an adapter site of this model (its sites hold adapters "
                             f"after self-attention, after cross-attention in decoder layers and after the "
                             f"feed-forward block)")
        out[f"{where[0]}.{locations[where[1]]}.adapters.{tail}"] = value
    return out


FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
"""AdapterHub's files of a saved fusion: its config, and its weights (safetensors or a torch pickle)."""
_FUSION_PARAMETER = re.compile(r"^(query|key|value|dense)\.(weight|bias)$")


def fusion_weights_from_adapterhub(model: nn.Module, state: Mapping[str, torch.Tensor], name: str,
                                   source: str) -> dict[str, torch.Tensor]:
    """AdapterHub's weights of fusion ``name`` (``<layer path>.<location>.adapter_fusion_layer.<name>.query.weight``,
    ...) as ``{"<layer number>.<site>.query.weight": tensor, ...}``. For a model whose sites do not
    say where AdapterHub keeps them, names ``...<layer number>.<location>.adapter_fusion_layer...``
    are read (the location naming the site, as this package writes it there). ValueError naming
    ``source`` for other tensors or tensors at no site."""
    sites = _hub_sites(model)
    marker = f".adapter_fusion_layer.{name}."
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        head, sep, parameter = key.partition(marker)
        where = None
        if sep and _FUSION_PARAMETER.match(parameter):
            if sites is not None:
                where = _hub_site(sites[0], head)
            else:
                match = re.match(r"^(?:.*\.)?(\d+)\.([^.]+)$", head)
                site = _site_of(match.group(2)) if match is not None else None
                where = (int(match.group(1)), site) if match is not None and site is not None else None
        if where is None:
            unexpected.append(key)
            continue
        out[f"{where[0]}.{where[1]}.{parameter}"] = tensor
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else "")
        raise ValueError(f"{source}: tensors that are not weights of the fusion {name!r} at a site of this model: "
                         f"{shown}")
    return out


def fusion_weights_to_adapterhub(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                                 name: str) -> dict[str, torch.Tensor]:
    """``{"<layer number>.<site>.query.weight": tensor, ...}`` of fusion ``name`` under AdapterHub's
    names (the inverse of ``fusion_weights_from_adapterhub``)."""
    sites = _hub_sites(model)
    out = {}
    for key, tensor in tensors.items():
        layer, site, parameter = key.split(".", 2)
        prefix = sites[1][(int(layer), site)] if sites is not None else f"{layer}.{site}"
        out[f"{prefix}.adapter_fusion_layer.{name}.{parameter}"] = tensor
    return out


_ADAPTERHUB_HEAD_OPTIONS: dict[str, set[str]] = {
    "classification": {"num_labels", "layers", "activation_function", "use_pooler", "bias", "dropout_prob"},
    "multilabel_classification": {"num_labels", "layers", "activation_function", "use_pooler", "bias",
                                  "dropout_prob"},
    "tagging": {"num_labels", "layers", "activation_function", "bias", "dropout_prob"},
    "question_answering": {"num_labels", "layers", "activation_function", "bias", "dropout_prob"},
    "multiple_choice": {"num_choices", "layers", "activation_function", "use_pooler", "bias", "dropout_prob"},
    "causal_lm": {"layers", "activation_function", "layer_norm", "bias", "dropout_prob", "shift_labels",
                  "vocab_size", "embedding_size"},
    "masked_lm": {"layers", "activation_function", "layer_norm", "bias", "shift_labels", "vocab_size",
                  "embedding_size"},
    "seq2seq_lm": {"layers", "activation_function", "layer_norm", "bias", "shift_labels", "vocab_size"},
}
_SHIFTED = {"causal_lm": True, "masked_lm": False, "seq2seq_lm": False}
"""The ``shift_labels`` each language-modelling head computes its loss with (AdapterHub's defaults)."""


def head_config_from_adapterhub(config: dict[str, Any], model: nn.Module, source: str) -> dict[str, Any]:
    """Our head config for a head config saved by AdapterHub (same layout of layers); options this
    package does not implement raise ValueError naming them."""
    head_type = config.get("head_type")
    allowed = _ADAPTERHUB_HEAD_OPTIONS.get(head_type)  # type: ignore[arg-type]
    if allowed is None:
        raise ValueError(f"{source}: AdapterHub head type {head_type!r} is not supported (supported: "
                         f"{', '.join(_ADAPTERHUB_HEAD_OPTIONS)})")
    unknown = sorted(set(config) - allowed - {"head_type", "label2id"})
    if unknown:
        raise ValueError(f"{source}: AdapterHub head options not supported: {', '.join(unknown)}")
    kept = ("embedding_size",) if head_type == "masked_lm" else ()
    out = {k: v for k, v in config.items()
           if k in allowed and k not in ("shift_labels", "vocab_size", "embedding_size") or k in kept}
    if head_type == "multilabel_classification":
        out["head_type"], out["multilabel"] = "classification", True
    else:
        out["head_type"] = head_type
    if head_type in _SHIFTED:
        shifted = _SHIFTED[head_type]
        if config.get("shift_labels", shifted) is not shifted:
            raise ValueError(f"{source}: {head_type} head with shift_labels={config['shift_labels']!r} is not "
                             f"supported")
        sizes = [("vocab_size", getattr(model.config, "vocab_size", None))]
        if head_type == "causal_lm":
            sizes.append(("embedding_size", hidden_size(model)))
        for key, expected in sizes:
            if config.get(key) not in (None, expected):
                raise ValueError(f"{source}: head {key} {config[key]} does not match the model's {expected}")
    label2id = config.get("label2id")
    if isinstance(label2id, dict):
        out["id2label"] = {str(v): str(k) for k, v in label2id.items()}
    return out


def block_from_adapterhub(block: object) -> tuple[str, list[Any], dict[str, Any]] | None:
    """``(kind, children, options)`` of the block of this package equal to an ``adapters.composition``
    block (``kind`` one of ``"Stack"``, ``"Parallel"``, ``"Average"``, ``"BatchSplit"``, ``"Split"``,
    ``"MultiTask"``, ``"Fuse"``, called as ``Kind(*children, **options)``); None for anything else;
    ValueError for other AdapterHub blocks."""
    if not type(block).__module__.startswith("adapters.") or not isinstance(getattr(block, "children", None), list):
        return None
    kind = type(block).__name__
    children = block.children  # type: ignore[attr-defined]
    if kind in ("Stack", "Parallel", "MultiTask"):
        return kind, children, {}
    if kind == "Average":  # AdapterHub normalized the weights when the block was made
        return kind, children, {"weights": list(block.weights), "normalize_weights": False}  # type: ignore[attr-defined]
    if kind == "BatchSplit":
        return kind, children, {"batch_sizes": list(block.batch_sizes)}  # type: ignore[attr-defined]
    if kind == "Split":
        return kind, children, {"splits": list(block.splits)}  # type: ignore[attr-defined]
    if kind == "Fuse":
        return kind, children, {"name": getattr(block, "_name", None)}
    raise ValueError(f"adapter_fused: the composition {block!r} is not supported: {kind} blocks do not run on the "
                     f"fused adapters (supported: Stack, Parallel, Average, BatchSplit, Split, MultiTask, Fuse)")
