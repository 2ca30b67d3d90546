"""Finding a model's layout: a layout registered for its class or type (``register_model_layout``), the
entry of its model type in ``ARCHITECTURES``, else recognition by structure (``structure``); then its
layers (``model_layers``, ``find_architecture``) and their widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from .known import ARCHITECTURES, EMBEDDING_MODULES, SUPPORTED_MODEL_TYPES
from .spec import (
    Architecture,
    ModelLayer,
    ModelLayout,
    SiteSpec,
    base_model,
    config_width,
    find_layers,
    get_submodule,
    missing_modules,
)
from .structure import find_by_structure

_REGISTERED: dict[str | type, Architecture] = {}


def register_model_layout(model: str | type, layout: ModelLayout | Sequence[ModelLayout]) -> None:
    """Tell the adapters where the sites are in models of a class or model type they do not know.

    model: a model class (its subclasses match too) or a ``config.model_type`` string.
    layout: a ``ModelLayout``, or one per layer stack (encoder then decoder: layers are numbered
        across the stacks in this order).

    A registered layout takes precedence over the built-in ones and over recognition by structure;
    registering again for the same key replaces it. Every path is checked against the model's first
    layer of each stack when an adapter is added (ValueError naming what is missing).
    """
    if not (isinstance(model, str) and model) and not isinstance(model, type):
        raise TypeError(f"register_model_layout: model must be a model class or a model type string, got {model!r}")
    layouts = (layout,) if isinstance(layout, ModelLayout) else tuple(layout)
    if not layouts or not all(isinstance(item, ModelLayout) for item in layouts):
        raise TypeError("register_model_layout: layout must be a ModelLayout or a non-empty sequence of them")
    name = model if isinstance(model, str) else model.__name__
    _REGISTERED[model] = Architecture.from_layouts(f"registered layout for {name}", (), layouts)


def unregister_model_layout(model: str | type) -> None:
    """Forget the layout registered for ``model`` (KeyError if there is none)."""
    if model not in _REGISTERED:
        raise KeyError(f"unregister_model_layout: no layout registered for {model!r}")
    del _REGISTERED[model]


def resolve_layers(arch: Architecture, base: nn.Module, config: object = None) -> list[ModelLayer]:
    """Every layer of ``base`` (a base model) that ``arch`` describes, numbered across its stacks in
    order, with its own sites (``SiteSpec.in_layer``: a hybrid model's layers differ in their token mixer);
    stacks absent from ``base`` (the encoder of a decoder-only variant) are skipped."""
    config = config if config is not None else getattr(base, "config", None)
    out: list[ModelLayer] = []
    if arch.submodels:
        for name in arch.submodels:
            sub = get_submodule(base, name)
            if sub is None:
                continue
            sub_base = base_model(sub)
            inner = next((n for n, m in sub.named_modules() if m is sub_base), "")
            prefix = f"{name}.{inner}" if inner else name
            for layer in resolve_layers(_lookup(sub, sub_base), sub_base, getattr(sub, "config", None)):
                out.append(replace(layer, index=len(out), path=f"{prefix}.{layer.path}"))
        return out
    for stack in arch.stacks:
        width = config_width(config, stack.hidden_size)
        for list_path, layers in find_layers(base, stack.layers):  # type: ignore[arg-type]
            for position, module in enumerate(layers):
                cross = stack.cross.in_layer(module) if stack.cross is not None else None
                cross = cross if cross is not None and get_submodule(module, cross.output) is not None else None
                out.append(ModelLayer(len(out), f"{list_path}.{position}", module, stack.attention.in_layer(module),
                                      stack.ffn.in_layer(module), width, cross,
                                      stack.cross_with_attention and cross is not None))
    return out


def _recognized() -> str:
    return f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}, and models whose layers match a layout " \
           f"recognized by structure (adapter_fused.hf.layouts.structure.STRUCTURAL_LAYOUTS)"


_REGISTER_HINT = "describe its layers with adapter_fused.register_model_layout (see docs/models.md, 'Other models')"


def _registered(model: nn.Module, base: nn.Module, model_type: object) -> Architecture | None:
    for cls in (*type(model).__mro__, *type(base).__mro__):
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return _REGISTERED.get(model_type) if isinstance(model_type, str) else None


def _lookup(model: nn.Module, base: nn.Module) -> Architecture:
    """The Architecture of ``model`` (registered, by model type, or by structure); ValueError if none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = _registered(model, base, model_type)
    if arch is not None:
        return arch
    candidates = [a for a in ARCHITECTURES if model_type in a.model_types]
    if candidates:  # the first entry this model's layers fit (transformers version, config), else the first
        config = getattr(model, "config", None)
        resolved = [(a, resolve_layers(a, base, config)) for a in candidates]
        fitting = [a for a, layers in resolved if layers and not missing_modules(layers[0].module,
                                                                                 *layers[0].sites.values())]
        return next(iter(fitting), next((a for a, layers in resolved if layers), candidates[0]))
    return _find_by_structure(model, base, model_type)


def model_layers(model: nn.Module) -> tuple[Architecture, list[ModelLayer]]:
    """The architecture of ``model`` and all its layers (see ``resolve_layers``), after checking that
    every site module exists in the first layer of each stack. ValueError naming the layer class and
    the missing modules otherwise."""
    base = base_model(model)
    arch = _lookup(model, base)
    layers = resolve_layers(arch, base, getattr(model, "config", None))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if not layers:
        paths = " or ".join(p for s in arch.stacks for p in s.layers) if not arch.submodels else \
            " or ".join(arch.submodels)
        raise ValueError(f"adapter_fused: {type(model).__name__} has model type {model_type!r} but no layer list at "
                         f"{paths}; supported model types: {supported}; or {_REGISTER_HINT}")
    seen: set[tuple[SiteSpec, ...]] = set()
    for layer in layers:
        specs = tuple(layer.sites.values())
        if specs in seen:
            continue
        seen.add(specs)
        missing = missing_modules(layer.module, *specs)
        calls = [(spec.output, spec.output_call) for spec in specs]
        shared = next((c for c in calls if calls.count(c) > 1), None)
        if shared is not None:
            raise ValueError(f"adapter_fused: two sites of {type(layer.module).__name__} (at {layer.path}) take call "
                             f"{shared[1]} of {shared[0]}; give each its own SiteSpec.output_call")
        if missing:
            raise ValueError(f"adapter_fused: {type(layer.module).__name__} (at {layer.path}) lacks the modules "
                             f"{', '.join(missing)} expected for {arch.name}; supported model types: {supported}; "
                             f"or {_REGISTER_HINT}")
    return arch, layers


def find_architecture(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    """The architecture of a transformers model and its layers.

    A layout registered with ``register_model_layout`` for the model's class or type comes first; a
    model type in ``ARCHITECTURES`` uses its entry; any other model is matched by the structure of
    its layers against ``adapter_fused.hf.layouts.structure.STRUCTURAL_LAYOUTS`` (checked on a dummy forward pass)
    and gets an Architecture named after the layout whose ``model_types`` is the model's type.
    The layers are the model's own ``nn.ModuleList`` when it has one stack, else a new ModuleList
    holding the layers of every stack in numbering order (see ``model_layers`` for their paths).
    Raises ValueError naming the layer class, the model type and the recognized model types and
    layouts when nothing matches.
    """
    arch, layers = model_layers(model)
    base = base_model(model)
    parents = {layer.path.rsplit(".", 1)[0] for layer in layers}
    if len(parents) == 1:
        parent = base.get_submodule(parents.pop())
        if isinstance(parent, nn.ModuleList) and len(parent) == len(layers):
            return arch, parent
    return arch, nn.ModuleList([layer.module for layer in layers])


def _find_by_structure(model: nn.Module, base: nn.Module, model_type: object) -> Architecture:
    """``_lookup`` for a model type not in ``ARCHITECTURES``: see ``adapter_fused.hf.layouts.structure``."""
    what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (not a transformers model)"
    return find_by_structure(model, base, model_type, f"adapter_fused: {what} is not supported; {_recognized()}",
                             _REGISTER_HINT)


def hidden_size(model: nn.Module) -> int:
    """The model width d (``config.hidden_size``, ``n_embd``, ``dim`` or ``d_model``; for a model
    whose config has none of these, such as CLIP or an encoder-decoder, the width of its first layer).
    ValueError where neither says it (a model without ``config``)."""
    config = getattr(model, "config", None)
    width = config_width(config, None)
    if width is not None:
        return width
    try:
        _, layers = model_layers(model)
    except ValueError:
        layers = []
    if layers and layers[0].hidden_size is not None:
        return layers[0].hidden_size
    where = f"in {type(config).__name__}" if config is not None else \
        f"of {type(model).__name__}, which has no config: give it a config with hidden_size"
    raise ValueError(f"adapter_fused: cannot find the hidden size {where}")


def layer_widths(model: nn.Module) -> list[int]:
    """The width d of every layer of ``model``, in layer order (stacks may differ: CLIP's towers)."""
    _, layers = model_layers(model)
    default = None
    widths = []
    for layer in layers:
        if layer.hidden_size is None:
            default = default if default is not None else hidden_size(model)
        widths.append(layer.hidden_size if layer.hidden_size is not None else default)
    return widths  # type: ignore[return-value]


def embedding_module(base: nn.Module, arch_name: str) -> nn.Module:
    """The module of ``base`` whose output the invertible adapter transforms; ValueError if missing."""
    path = EMBEDDING_MODULES.get(arch_name, "embed_tokens")
    module = get_submodule(base, path)
    if module is None:
        raise ValueError(f"adapter_fused: invertible adapters need the embedding module {path!r}, which "
                         f"{type(base).__name__} lacks")
    return module
