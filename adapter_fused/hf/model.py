"""Adding, activating, training and removing fused adapters on a transformers model.

The adapters of a model live in one ``nn.ModuleDict`` on its base model, ``base_model.fused_adapters``,
keyed ``<name>.<layer index>.<site>`` (site ``"attention"``, ``"cross"`` or ``"ffn"``; see
``config.SITES``), each a ``FusedAdapter`` (a ``BottleneckAdapter`` when the config has options beyond
the plain bottleneck; layers in ``leave_out`` have no entry). Their configs, the active setup and the
hooks that run it are a ``sites.ModelState`` kept on the base model (``model_state``); the hooks sit on
the layers' existing modules (see ``layouts`` and ``sites``), so base modules and parameter names are
left as they are, and with no active adapter the model computes exactly what it computed before.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .composition import FUSION_KEY, Composition, active_names, check_setup, parse_setup
from .config import SITES, AdapterConfig, resolve_config
from .layouts import (
    ModelLayer,
    base_model,
    embedding_module,
    find_architecture,
    hidden_size,
    layer_widths,
    model_layers,
)
from .modules import NiceCoupling, site_adapter
from .rows import hook_adapter_names
from .sites import MODULE_NAME, ModelState, hook_invertible, install_replication, no_residual_placement

logger = logging.getLogger(__name__)

STATE_NAME = "_fused_adapter_state"
"""The key of the base model's ``__dict__`` holding its ``ModelState``."""
HEAD_FROZEN = "head_frozen"
"""The key of a ``ModelState``'s ``__dict__`` recording that the last ``train_adapter`` froze the task head."""
INPUTS_HOOKED = "inputs_grad_hooked"
"""The key of a ``ModelState``'s ``__dict__`` recording that ``InputsRequireGrad`` is registered."""


def model_state(model: nn.Module, create: bool = False) -> ModelState | None:
    """The adapter bookkeeping of ``model`` (kept on its base model), or None where it has no adapters;
    with ``create``, made (with the ``fused_adapters`` ModuleDict and the site hooks) where missing."""
    base = base_model(model)
    state = base.__dict__.get(STATE_NAME)
    if state is None and create:
        arch, layers = find_architecture(model)
        modules = nn.ModuleDict()
        base.add_module(MODULE_NAME, modules)
        state = ModelState(arch, base, layers, modules)
        base.__dict__[STATE_NAME] = state
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None:
            # torch.compile does not watch hooks being added: code it compiled for this model before it had
            # adapters would go on without them. Later changes are guarded (ModelState.plan_version).
            logger.info("adapter_fused: a model's first adapter clears torch.compile's caches (code compiled "
                        "earlier recompiles)")
            dynamo.reset()
    return state


def require_adapter(model: nn.Module, name: str) -> ModelState:
    """The model's adapter bookkeeping; KeyError naming the known adapters if ``name`` is not one."""
    state = model_state(model)
    if state is None or name not in state.configs:
        known = ", ".join(state.configs) if state is not None and state.configs else "none"
        raise KeyError(f"adapter_fused: no adapter named {name!r} on this model (adapters: {known})")
    return state


def check_name(name: object) -> str:
    """``name`` if it can name an adapter or a head (a non-empty string without dots or surrounding
    spaces); ValueError otherwise."""
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise ValueError(f"adapter_fused: adapter name must be a non-empty string without dots or surrounding "
                         f"spaces, got {name!r}")
    if name == FUSION_KEY:
        raise ValueError(f"adapter_fused: the name {name!r} is reserved for the model's adapter fusions")
    return name


def layer_sites(config: AdapterConfig, layer: ModelLayer) -> tuple[str, ...]:
    """The sites of ``layer`` that hold an adapter of ``config``, in the order they run: the
    placement's (``"attention"``, ``"ffn"``) and, in a layer with a cross-attention site,
    ``"cross"`` when ``config.cross_adapter`` asks for it or, where the layout puts it with the
    attention site (``ModelLayout.cross_with_attention``), when the placement has ``attention``."""
    sites = config.layout.sites
    if layer.cross is not None and (config.layout.attention if layer.cross_with_attention else config.cross_adapter):
        sites = (*sites, "cross")
    return tuple(site for site in SITES if site in sites)


def check_cross_adapter(model: nn.Module, config: AdapterConfig) -> None:
    """ValueError when ``config.cross_adapter`` asks for adapters after cross-attention and no layer of
    ``model`` would get one from it (no cross-attention site, or only sites that follow the attention
    site)."""
    if not config.cross_adapter:
        return
    _, layers = model_layers(model)
    crossed = [layer for layer in layers if layer.cross is not None]
    if not crossed:
        raise ValueError(f"adapter_fused: cross_adapter=True, but {type(model).__name__} has no layer with a "
                         f"cross-attention site (only decoder layers of encoder-decoder models have one)")
    if all(layer.cross_with_attention for layer in crossed):
        raise ValueError(f"adapter_fused: cross_adapter=True has no effect on {type(model).__name__}: its "
                         f"cross-attention sites ({type(crossed[0].module).__name__}) hold an adapter wherever the "
                         f"attention site does, as AdapterHub places them; use a placement with attention=True "
                         f"(houlsby) for adapters there")


def adapter_placement(module: nn.Module, model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype for adapters on ``module`` (a layer, or the embeddings) of ``model``: those
    of its first floating-point parameter, which carries the dtype of the hidden states. Integer
    parameters are passed over: a quantized layer keeps its packed weights in them (bitsandbytes' 4-bit
    weights are uint8), while its norms, biases or compute run in the model's float dtype. A module
    without a floating-point parameter takes the dtype of the model's first one (on the device of its
    own first parameter); (None, None), the defaults, where neither has any."""
    floating = next((p for p in module.parameters() if p.is_floating_point()), None)
    if floating is not None:
        return floating.device, floating.dtype
    first = next(module.parameters(), None)
    fallback = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else fallback.device if fallback is not None else None
    return device, fallback.dtype if fallback is not None else None


def build_adapter_modules(model: nn.Module, config: AdapterConfig) -> nn.ModuleDict:
    """Freshly initialised adapters for every layer (but those in ``config.leave_out``) and site of
    ``config`` (see ``layer_sites``), each on the device and in the dtype of its layer (see
    ``adapter_placement``) and in the model's training mode: ``{layer index: {site: module}}``, the
    module a ``FusedAdapter(d, r)`` for plain configs and a ``BottleneckAdapter`` otherwise, d the
    layer's width and r its bottleneck (see ``AdapterConfig.bottleneck_for``). ValueError when ``leave_out`` names every layer, a per-layer
    ``reduction_factor`` has no value for a layer, or a parallel placement meets a site without a
    block residual."""
    arch, layers = model_layers(model)
    for layer in layers:
        bare = next((site for site in layer_sites(config, layer) if layer.site(site).residual is None), None)
        if bare is not None:
            no_residual_placement(config.layout, f"the {bare} site of {type(layer.module).__name__}")
    widths = layer_widths(model)
    d = hidden_size(model)
    out = nn.ModuleDict()
    for layer, width in zip(layers, widths):
        if layer.index in config.leave_out:
            continue
        r = config.bottleneck_for(width, layer.index)
        device, dtype = adapter_placement(layer.module, model)
        out[str(layer.index)] = nn.ModuleDict({
            site: site_adapter(config, width, r, device=device, dtype=dtype) for site in layer_sites(config, layer)
        })
    if not len(out):
        raise ValueError(f"adapter_fused: leave_out {list(config.leave_out)} leaves out every one of the model's "
                         f"{len(layers)} layers")
    if config.inv_adapter:
        device, dtype = adapter_placement(embedding_module(base_model(model), arch.name), model)
        out["invertible"] = NiceCoupling(d, config.inv_adapter_reduction_factor, config.resolved_activation,  # type: ignore[arg-type]
                                         device=device, dtype=dtype)
    out.train(model.training)  # dropout inside adapters follows the model's mode
    return out


def _remove_state(model: nn.Module, state: ModelState) -> None:
    """Undo ``model_state(model, create=True)``: remove the hooks, ``fused_adapters`` and the bookkeeping."""
    state.remove_hooks()
    base = base_model(model)
    if MODULE_NAME in base._modules:
        delattr(base, MODULE_NAME)
    base.__dict__.pop(STATE_NAME, None)


def attach_adapter(model: nn.Module, name: str, config: AdapterConfig, modules: nn.ModuleDict) -> None:
    """Register already built adapter ``modules`` (see ``build_adapter_modules``) under ``name``.

    While the model is prepared for training another adapter (``train_adapter``), the new adapter's
    parameters get ``requires_grad=False`` so that adding it does not change what trains. On an error
    the model is left as it was (a first adapter that fails to attach also removes the hooks)."""
    existed = model_state(model) is not None
    state = model_state(model, create=True)
    assert state is not None
    try:
        if name in state.configs:
            raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it first")
        if state.training is not None:
            for parameter in modules.parameters():
                parameter.requires_grad_(False)
        state.modules[name] = modules
        state.configs[name] = config
        if config.inv_adapter:
            hook_invertible(model, state)
        hook_adapter_names(model, state)
        state.adapters_changed()
    except BaseException:
        if name in state.modules and name not in state.configs:
            del state.modules[name]
        if not existed:
            _remove_state(model, state)
        raise


def add_adapter(model: nn.Module, name: str, config: str | AdapterConfig = "pfeiffer") -> None:
    """Add a new, inactive adapter ``name`` to every layer of a supported transformers ``model``.

    config: ``"houlsby"`` / ``"double_seq_bn"``, ``"pfeiffer"`` / ``"seq_bn"`` or an ``AdapterConfig``
    (``cross_adapter=True``: also after the cross-attention of decoder layers, ValueError on a model
    where that adds no adapter). Each adapter maps (..., d) -> (..., d) with width
    r = ``hidden_size // reduction_factor`` and has 2*d*r + r + d parameters. Base parameters are not
    touched; activate with ``set_active_adapters`` or ``train_adapter``. After ``train_adapter`` the
    new adapter starts frozen (``requires_grad=False``): only the adapter being trained (and its
    head) train until ``train_adapter`` picks another.
    Raises ValueError for unsupported models, a bad config or a name already in use; the model is
    then left exactly as it was (no new modules, parameters or hooks).
    """
    name = check_name(name)
    config = resolve_config(config)
    find_architecture(model)  # clear error before anything is attached
    check_cross_adapter(model, config)
    state = model_state(model)
    if state is not None and name in state.configs:
        raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it first")
    attach_adapter(model, name, config, build_adapter_modules(model, config))


def _resolve_setup(model: nn.Module, setup: object) -> tuple[ModelState | None, str | Composition | None]:
    """The model's state and ``setup`` parsed (see ``composition.parse_setup``), every adapter it
    names checked to exist (KeyError) and a composition checked to run at every site (ValueError)."""
    parsed = parse_setup(setup)
    if parsed is None:
        return model_state(model), None
    state = None
    for name in active_names(parsed):
        state = require_adapter(model, name)
    assert state is not None
    if isinstance(parsed, Composition):
        check_setup(parsed, state.modules, state.configs, len(state.layers), SITES)
    return state, parsed


def _activate(state: ModelState, setup: str | Composition) -> None:
    if isinstance(setup, Composition) and setup.parallel_channels > 1:
        install_replication(state)
    state.active = setup


def set_active_adapters(model: nn.Module, name: str | Composition | list[Any] | tuple[Any, ...] | None) -> None:
    """Make ``name`` what runs in the forward pass, or run none (``None``: the base model).

    ``name`` is an adapter name or a composition of adapters: ``Stack``, ``Parallel``, ``Average``,
    ``BatchSplit`` (see ``composition``; AdapterHub's own blocks are accepted too), or a list or
    tuple of names, which is their Stack (as in AdapterHub; a list of one name is that adapter).
    An unknown name raises KeyError; a composition that cannot run raises ValueError naming it.
    On an error the previous setup stays active.
    """
    state, setup = _resolve_setup(model, name)
    if setup is None:
        if state is not None:
            state.active = None
        return
    assert state is not None
    _activate(state, setup)


def output_embedding_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters of ``model.get_output_embeddings()`` (an ``lm_head``, the decoder of
    BERT's masked-LM head and its bias), or of each module it returns in a list; empty for a model
    without output embeddings."""
    getter = getattr(model, "get_output_embeddings", None)
    found = getter() if callable(getter) else None
    modules = found if isinstance(found, (list, tuple)) else [found]
    return {id(p) for m in modules if isinstance(m, nn.Module) for p in m.parameters()}


def head_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of ``model``'s task head, by their names in ``model``: those outside
    ``model.base_model`` (e.g. ``classifier.*``, ``score.*``, ``qa_outputs.*``, the transform of
    BERT's masked-LM head) but for the output embeddings (``model.get_output_embeddings()``: an
    ``lm_head``, tied to the input embeddings or not, and the masked-LM decoder with its bias), which
    are pretrained weights of the language model that AdapterHub's ``train_adapter`` keeps frozen.
    Parameters shared with the base model are not part of the head either; a bare base model has
    none."""
    base = base_model(model)
    if base is model:
        return
    excluded = {id(p) for p in base.parameters()} | output_embedding_parameters(model)
    storages = {p.untyped_storage().data_ptr() for p in base.parameters() if p.device.type != "meta"}
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in excluded or id(parameter) in seen:
            continue
        if parameter.device.type != "meta" and parameter.untyped_storage().data_ptr() in storages:
            continue
        seen.add(id(parameter))
        yield name, parameter


def saved_head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What ``save_adapter(..., with_head=True)`` writes of the task head: ``head_parameters``, or
    nothing where ``train_adapter(..., train_head=False)`` froze the head and it is still frozen (then
    the head is not part of what trained, only a copy of the model's own weights)."""
    head = list(head_parameters(model))
    state = model_state(model)
    if (state is not None and state.training is not None and state.__dict__.get(HEAD_FROZEN)
            and not any(p.requires_grad for _, p in head)):
        return []
    return head


class InputsRequireGrad:
    """Forward hook on the input embeddings of a model whose adapters train: while ``train_adapter``'s
    setup stands and activation checkpointing is on in training mode (a module's
    ``gradient_checkpointing`` flag, which transformers' ``gradient_checkpointing_enable`` sets), the
    embeddings' output is made to require grad when autograd records and it does not already, as
    transformers' ``enable_input_require_grads`` (PEFT's way) does. Torch's reentrant checkpoint, the
    default of ``gradient_checkpointing_enable`` in transformers 4.57, gives a layer's outputs a
    gradient only when one of its tensor inputs requires one, which frozen embeddings' output does
    not: the adapters inside the layers would get no gradient. Without checkpointing the hook does
    nothing, so no backward pass runs below the first adapter."""

    def __init__(self, state: ModelState, flagged: list[nn.Module]) -> None:
        self.state = state
        self.flagged = flagged  # the modules with a gradient_checkpointing flag

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if (self.state.training is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor)
                or output.requires_grad or not output.is_floating_point()):
            return
        if any(m.training and getattr(m, "gradient_checkpointing", False) is True for m in self.flagged):
            output.requires_grad_(True)


def hook_input_grads(model: nn.Module, state: ModelState) -> None:
    """Register ``InputsRequireGrad`` on ``model.get_input_embeddings()`` (once per model; its handle
    joins the state's hooks, removed with the last adapter). Nothing for a model without input
    embeddings or without a module that transformers can checkpoint."""
    if state.__dict__.get(INPUTS_HOOKED):
        return
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except NotImplementedError:
        embeddings = None
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if isinstance(embeddings, nn.Module) and flagged:
        state.handles.append(embeddings.register_forward_hook(InputsRequireGrad(state, flagged)))
    state.__dict__[INPUTS_HOOKED] = True


def train_adapter(model: nn.Module, name: str | Composition | list[Any] | tuple[Any, ...],
                  train_head: bool = True) -> None:
    """Prepare ``model`` to train adapter ``name``: the adapter's parameters get ``requires_grad=True``,
    and so does the model's task head when ``train_head`` (see ``head_parameters``: e.g. the
    ``classifier`` of a ``BertForSequenceClassification``, never the output embeddings, such as an
    ``lm_head``, tied or not, as in AdapterHub); every other parameter (base model, output
    embeddings, other adapters, the head when not ``train_head``) gets False. The adapter becomes
    active, the model is put in training mode, and adapters added afterwards start frozen.
    ``save_adapter(..., with_head=True)`` keeps the trained head; after ``train_head=False`` it
    writes no head (see ``saved_head_parameters``).

    ``name`` may be a composition (as for ``set_active_adapters``): every adapter in it trains, and
    the composition becomes active. With activation checkpointing enabled, before or after (also
    transformers 4.57's default, ``use_reentrant=True``), the adapters get their gradients: the input
    embeddings' output then requires grad (see ``InputsRequireGrad``).
    """
    state, setup = _resolve_setup(model, name)
    if setup is None:
        raise ValueError("adapter_fused: train_adapter needs an adapter name or a composition, got None")
    assert state is not None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if train_head:
        for _, parameter in head_parameters(model):
            parameter.requires_grad_(True)
    state.__dict__[HEAD_FROZEN] = not train_head
    for adapter in active_names(setup):
        for parameter in state.modules[adapter].parameters():
            parameter.requires_grad_(True)
    _activate(state, setup)
    state.training = setup
    hook_input_grads(model, state)
    model.train()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters; removing the last one also removes the hooks."""
    state = require_adapter(model, name)
    del state.modules[name]
    del state.configs[name]
    if name in active_names(state.active):
        state.active = None
    state.adapters_changed()
    if state.training is not None and not any(n in state.configs for n in active_names(state.training)):
        state.training = None
    if not state.configs:
        _remove_state(model, state)


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    state = model_state(model)
    return list(state.configs) if state is not None else []


def active_adapter(model: nn.Module) -> str | Composition | None:
    """The name of the active adapter, the active composition (e.g. ``Stack('lang', 'task')``), or None."""
    state = model_state(model)
    return state.active if state is not None else None


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    """The AdapterConfig adapter ``name`` was created with."""
    return require_adapter(model, name).configs[name]


def adapter_modules(model: nn.Module, name: str) -> nn.ModuleDict:
    """The adapters of ``name``: ``{layer index: {site: FusedAdapter}}``."""
    return require_adapter(model, name).modules[name]  # type: ignore[return-value]


@dataclass(frozen=True)
class AdapterInfo:
    """One row of ``adapter_summary``."""

    name: str
    placement: str
    bottleneck: int  # the widest adapter width (widths differ between layers with a per-layer reduction_factor)
    activation: str
    parameters: int
    share: float  # parameters / base model parameters
    active: bool
    trainable: bool
    unfused: tuple[str, ...] = ()  # options its sites compute outside the fused kernel ("dropout": training only)


@dataclass(frozen=True)
class AdapterSummary:
    """Per-adapter parameter counts and their share of the base model; ``str()`` gives a table."""

    adapters: tuple[AdapterInfo, ...]
    base_parameters: int

    def __str__(self) -> str:
        header = (f"{'name':<20} {'placement':<10} {'r':>5} {'activation':<10} {'params':>12} {'share %':>9} active "
                  f"train fused")
        lines = [header, "-" * len(header)]
        for a in self.adapters:
            fused = f"no: {', '.join(a.unfused)}" if a.unfused else "yes"
            lines.append(f"{a.name:<20} {a.placement:<10} {a.bottleneck:>5} {a.activation:<10} {a.parameters:>12,} "
                         f"{100 * a.share:>9.3f} {'yes' if a.active else 'no':<6} {'yes' if a.trainable else 'no':<5} "
                         f"{fused}")
        lines.append(f"base model parameters: {self.base_parameters:,}")
        return "\n".join(lines)


def adapter_summary(model: nn.Module) -> AdapterSummary:
    """Each adapter's parameter count and its share of the base model's parameters (all parameters
    of ``model`` that are not adapters), and the options its sites compute outside the fused kernel
    (``unfused``; empty when every site is one fused launch)."""
    state = model_state(model)
    adapter_ids = {id(p) for p in state.modules.parameters()} if state is not None else set()
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    rows = []
    for name, config in (state.configs.items() if state is not None else ()):
        params = list(state.modules[name].parameters())  # type: ignore[union-attr]
        count = sum(p.numel() for p in params)
        placement = config.placement if isinstance(config.placement, str) else "custom"
        widths = [site.down.out_features for key, layer in state.modules[name].items()  # type: ignore[union-attr]
                  if key != "invertible" for site in layer.values()]
        rows.append(AdapterInfo(name, placement, max(widths), config.resolved_activation,
                                count, count / base if base else 0.0, name in active_names(state.active),  # type: ignore[union-attr]
                                any(p.requires_grad for p in params), config.unfused_options))
    return AdapterSummary(tuple(rows), base)
