"""Adding, activating, training and removing fused adapters on a transformers model.

The adapters of a model live in one ``nn.ModuleDict`` on its base model, ``base_model.fused_adapters``,
keyed ``<name>.<layer index>.<site>`` (site ``"attention"``, ``"cross"`` or ``"ffn"``; see
``config.SITES``), each a ``FusedAdapter`` (a
``BottleneckAdapter`` when the config has options beyond the plain bottleneck; layers in ``leave_out``
have no entry). Forward
hooks on the layers' existing modules (see ``layouts``) run the active adapter; base modules and
parameter names are left as they are, and with no active adapter the hooks return nothing, so the
model computes exactly what it computed before.

One model may be called from many threads at once: what a call needs between hooks (the captured
block residual, the ``per_sample_adapters`` batch, the adapters of the module being run) is kept
per thread. ``nn.DataParallel`` replicas share the hooks of the original module but run with their
own adapters: a hook on the base model records, for the duration of each call, which module's
``fused_adapters`` the sites read. ``copy.deepcopy`` (and pickling) of a model gives a copy whose
hooks read the copy's adapters and layers.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bottleneck import site_adapter
from .composition import RAW, Composition, active_names, check_setup, composition_site, install_replication, parse_setup
from .config import SITES, AdapterConfig, Placement, resolve_config
from .invertible import NiceCoupling, hook_invertible
from .layouts import (
    Architecture,
    ModelLayer,
    SiteSpec,
    call_argument,
    embedding_module,
    find_architecture,
    get_submodule,
    hidden_size,
    layer_widths,
    model_layers,
    resolve_layers,
)

MODULE_NAME = "fused_adapters"
STATE_NAME = "_fused_adapter_state"


SiteAdapter = Callable[..., torch.Tensor]
"""What runs at a site, called as ``adapter(z, residual=None)``: a FusedAdapter, or a per-sample bank
(see ``multitask``)."""


def _captured(x: torch.Tensor | None) -> torch.Tensor:
    """The block residual ``x`` a placement needs; RuntimeError where the site's residual module did
    not run before its output module (the hooks cannot compute the right numbers without it)."""
    if x is None:
        raise RuntimeError("adapter_fused: the block residual of this site was not captured")
    return x


def site_forward(adapter: SiteAdapter, placement: Placement, h: torch.Tensor, x: torch.Tensor | None,
                 norm: nn.Module | None) -> torch.Tensor:
    """The new sub-block output ``h'`` of one site, so that the layer's own ``LN(h' + x)`` (or
    ``h' + x``) equals the adapted site; see ``Placement``. h, x: (..., d) -> (..., d).

    The kernel computes ``residual + s * f(z)`` for the adapter input ``z`` in one pass, the
    residual being ``z`` itself unless the placement says otherwise.

    With ``placement.original_ln_after=False`` the site's output must be ``A = residual + s * f(z)``
    itself: without a norm this returns ``A - x`` (the layer adds x back); with a norm it returns A,
    and the caller makes the layer's norm return A in place of ``LN(... + x)``.
    """
    if placement.parallel or placement.original_ln_before:
        x = _captured(x)
        if placement.parallel:
            z, residual = x, h
        else:
            total = h + x
            z = norm(total) if norm is not None else total
            before = placement.residual_before_ln
            residual = h if before is True else (z if before is False else total)
    else:
        z = residual = h
    out = adapter(z) if residual is z else adapter(z, residual=residual)
    if placement.original_ln_after or norm is not None:
        return out
    return out - _captured(x)


def no_residual_placement(placement: Placement, where: str) -> Placement:
    """The placement that computes ``placement`` at a site where the layer adds no block residual
    (``SiteSpec.residual`` None: ``h + x`` is ``h``), as AdapterHub does; ValueError for a parallel
    placement, whose adapter input would be the missing residual."""
    if placement.parallel:
        raise ValueError(f"adapter_fused: a parallel adapter reads the block residual, which {where} does not "
                         f"have; use another placement (houlsby or pfeiffer) or leave that site out")
    return dataclasses.replace(placement, original_ln_before=False)


class _CallLocal(threading.local):
    """What one thread's model call carries from hook to hook (a fresh instance per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch: Any = None  # a multitask.PerSampleBatch while per_sample_adapters is active in this thread
        self.bound: list[nn.Module] = []  # base modules being called in this thread, innermost last
        self.residuals: dict[tuple[str, str], torch.Tensor | None] = {}  # (layer, site) -> captured residual
        self.norm_outputs: dict[tuple[str, str], torch.Tensor] = {}  # (layer, site) -> output replacing the norm's
        self.output_calls: dict[tuple[str, str], int] = {}  # (layer, output path) -> its calls in this layer call


class _Site:
    """One adapter site of one layer: captures the block residual, then rewrites the sub-block output.

    ``norm`` is the layer norm of ``LN(h + x)`` in the model the hooks were registered on, and
    ``norm_path`` its path from the base model, to find the norm of a replica being run instead."""

    def __init__(self, state: _State, layer: int, name: str, spec: SiteSpec, norm: nn.Module | None,
                 norm_path: str | None) -> None:
        self.state = state
        self.layer = str(layer)
        self.name = name
        self.spec = spec
        self.norm = norm
        self.norm_path = norm_path

    @property
    def key(self) -> tuple[str, str]:
        """(layer index, site name)."""
        return self.layer, self.name

    def _adapter(self, call: _CallLocal) -> tuple[SiteAdapter, Placement] | None:
        batch = call.batch
        if batch is not None:
            grouped = batch.sites.get(self.key)
            return None if grouped is None else (grouped, batch.placement)
        state = self.state
        active = state.active
        if active is None:
            return None
        if isinstance(active, Composition):  # called as site(x, residual=h): see composition.RAW
            found = composition_site(active, state.adapters_of_call(call), state.configs, self.layer, self.name,
                                     self._norm(call))
            return None if found is None else (found, RAW)
        adapters = state.adapters_of_call(call)[active]
        layer = adapters[self.layer] if self.layer in adapters else None
        if layer is None or self.name not in layer:
            return None
        return layer[self.name], state.configs[active].layout  # type: ignore[return-value]

    def _norm(self, call: _CallLocal) -> nn.Module | None:
        """The site's layer norm in the base module this thread is running."""
        if self.norm_path is None or not call.bound or call.bound[-1] is self.state.base:
            return self.norm
        return call.bound[-1].get_submodule(self.norm_path)

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = self.state.call
        if self._adapter(call) is None:
            return
        call.residuals[self.key] = call_argument(args, kwargs, self.spec.residual_position,
                                                 self.spec.residual_keywords)

    def capture_plus(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook of ``spec.residual_plus``: add its output to the captured residual."""
        call = self.state.call
        x = call.residuals.get(self.key)
        if x is None or self._adapter(call) is None:
            return
        call.residuals[self.key] = (output[0] if isinstance(output, tuple) else output) + x

    def apply(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self.state.call
        found = self._adapter(call)
        if found is None:
            return None
        adapter, placement = found
        x = call.residuals.pop(self.key, None)
        if self.spec.residual is None:  # no residual at this site: h + x is h itself
            placement = no_residual_placement(placement, f"the {self.name} site")
        norm = self._norm(call)
        h = output[0] if isinstance(output, tuple) else output
        if not self.spec.swapped:
            new = site_forward(adapter, placement, h, x, norm)
        else:  # the adapter reads x as its input and h as its residual
            x = _captured(x)
            new = site_forward(adapter, placement, x, h, norm)
            if placement.original_ln_after and norm is not None:  # LN(new + h), not the layer's LN(new + x)
                call.norm_outputs[self.key] = norm(new + h)
                return None
            if norm is None:  # the layer adds x to what the site returns, where the placement wants h
                new = new + h - x
        if not placement.original_ln_after and norm is not None:
            call.norm_outputs[self.key] = new  # returned by the layer's norm in place of LN(h + x)
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


class _SharedOutput:
    """Forward hook on a module that gives ``h`` to a site at one of its calls within a layer call
    (``SiteSpec.output_call``; BEiT's ``drop_path`` serves both sites): the n-th call goes to the site
    whose ``output_call`` is n, others pass through. ``reset`` is the layer's forward pre-hook."""

    def __init__(self, state: _State, key: tuple[str, str], sites: dict[int, _Site]) -> None:
        self.state = state
        self.key = key
        self.sites = sites

    def reset(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.state.call.output_calls[self.key] = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        calls = self.state.call.output_calls
        n = calls.get(self.key, 0)
        calls[self.key] = n + 1
        site = self.sites.get(n)
        return None if site is None else site.apply(module, args, output)


class _NormReplacement:
    """Forward hook on a site's layer norm: returns the output an ``original_ln_after=False`` adapter
    or a swapped site left for it in this thread (these replace the layer's own residual add and norm)."""

    def __init__(self, state: _State, key: tuple[str, str]) -> None:
        self.state = state
        self.key = key

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        pending = self.state.call.norm_outputs
        return pending.pop(self.key, None) if pending else None


def _hook_norms(state: _State) -> None:
    """Register ``_NormReplacement`` on every site's layer norm (once per model)."""
    if state.__dict__.get("norms_hooked"):
        return
    for layer in resolve_layers(state.arch, state.base):
        for site_name, spec in layer.sites.items():
            norm = get_submodule(layer.module, spec.norm) if spec.norm else None
            if norm is not None:
                state.handles.append(norm.register_forward_hook(_NormReplacement(state, (str(layer.index), site_name))))
    state.__dict__["norms_hooked"] = True


class _State:
    """Per-model bookkeeping (a plain object, so it adds no parameters or buffers).

    ``configs`` and ``active`` are shared by every thread; ``call`` is per thread. Deep copies and
    pickles get a fresh ``call`` and, through the copy memo, the copy's layers and modules.
    """

    def __init__(self, arch: Architecture, base: nn.Module, layers: nn.ModuleList, modules: nn.ModuleDict) -> None:
        self.arch = arch
        self.base = base
        self.layers = layers
        self.modules = modules
        self.configs: dict[str, AdapterConfig] = {}
        self.active: str | Composition | None = None
        self.training: str | Composition | None = None  # what train_adapter last prepared, until it is deleted
        self.call = _CallLocal()
        self.per_sample_blocks = 0  # per_sample_adapters blocks open in any thread
        self.lock = threading.Lock()
        self.handles: list[torch.utils.hooks.RemovableHandle] = [
            base.register_forward_pre_hook(self.bind, prepend=True),
            base.register_forward_hook(self.unbind, always_call=True),
        ]
        swapped_norms = False
        for layer in resolve_layers(arch, base):
            shared: dict[str, dict[int, _Site]] = {}  # output path -> {output_call: site}, where not plain
            for site_name, spec in layer.sites.items():
                norm = get_submodule(layer.module, spec.norm) if spec.norm else None
                norm_path = f"{layer.path}.{spec.norm}" if spec.norm else None
                site = _Site(self, layer.index, site_name, spec, norm, norm_path)
                if spec.residual is not None:
                    residual_module = get_submodule(layer.module, spec.residual)
                    assert residual_module is not None
                    self.handles.append(residual_module.register_forward_pre_hook(site.capture, with_kwargs=True))
                if spec.residual_plus is not None:  # after the hooks of earlier sites on the same module
                    plus_module = get_submodule(layer.module, spec.residual_plus)
                    assert plus_module is not None
                    self.handles.append(plus_module.register_forward_hook(site.capture_plus))
                output_module = get_submodule(layer.module, spec.output)
                assert output_module is not None
                if spec.output_call or sum(other.output == spec.output for other in layer.sites.values()) > 1:
                    shared.setdefault(spec.output, {})[spec.output_call] = site
                else:
                    self.handles.append(output_module.register_forward_hook(site.apply))
            for path, by_call in shared.items():  # model_layers checked that sites sharing a path differ in call
                hook = _SharedOutput(self, (str(layer.index), path), by_call)
                self.handles.append(layer.module.register_forward_pre_hook(hook.reset))
                self.handles.append(get_submodule(layer.module, path).register_forward_hook(hook))  # type: ignore[union-attr]
            if any(spec.swapped and spec.norm for spec in layer.sites.values()):
                swapped_norms = True
        if swapped_norms:  # a swapped site hands its norm the output (see _Site.apply)
            _hook_norms(self)

    def bind(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the base model: this thread's sites read ``module``'s adapters until
        it returns (an ``nn.DataParallel`` replica shares these hooks but holds its own adapters)."""
        if self.per_sample_blocks and self.call.batch is None and getattr(module, "_is_replica", False):
            raise RuntimeError("adapter_fused: per_sample_adapters does not reach nn.DataParallel replicas (they run "
                               "in worker threads on slices of the batch); call the model itself inside the block")
        self.call.bound.append(module)

    def unbind(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook of the base model (also run when the call raises): undo ``bind``; after the
        outermost call, drop any residual a failed call left captured."""
        call = self.call
        if call.bound and call.bound[-1] is module:
            call.bound.pop()
        if not call.bound:
            call.residuals.clear()
            call.norm_outputs.clear()

    def adapters_of_call(self, call: _CallLocal) -> nn.ModuleDict:
        """The ``fused_adapters`` of the base module this thread is running (its own when none is)."""
        if call.bound:
            modules = call.bound[-1]._modules.get(MODULE_NAME)
            if isinstance(modules, nn.ModuleDict):
                return modules
        return self.modules

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["call"], state["lock"]
        state["per_sample_blocks"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("training", None)
        self.call = _CallLocal()
        self.lock = threading.Lock()

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _state(model: nn.Module, create: bool = False) -> _State | None:
    base = _base(model)
    state = base.__dict__.get(STATE_NAME)
    if state is None and create:
        arch, layers = find_architecture(model)
        modules = nn.ModuleDict()
        base.add_module(MODULE_NAME, modules)
        state = _State(arch, base, layers, modules)
        base.__dict__[STATE_NAME] = state
    return state


def require_adapter(model: nn.Module, name: str) -> _State:
    """The model's adapter bookkeeping; KeyError naming the known adapters if ``name`` is not one."""
    state = _state(model)
    if state is None or name not in state.configs:
        known = ", ".join(state.configs) if state is not None and state.configs else "none"
        raise KeyError(f"adapter_fused: no adapter named {name!r} on this model (adapters: {known})")
    return state


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise ValueError(f"adapter_fused: adapter name must be a non-empty string without dots or surrounding "
                         f"spaces, got {name!r}")
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


def build_adapter_modules(model: nn.Module, config: AdapterConfig) -> nn.ModuleDict:
    """Freshly initialised adapters for every layer (but those in ``config.leave_out``) and site of
    ``config`` (see ``layer_sites``), each on the device and in the dtype of its layer and in the
    model's training mode: ``{layer index: {site: module}}``, the module a ``FusedAdapter(d, r)`` for
    plain configs and a ``BottleneckAdapter`` otherwise, d the layer's width and r its bottleneck (see
    ``AdapterConfig.bottleneck_for``). ValueError when ``leave_out`` names every layer, a per-layer
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
        reference = next(layer.module.parameters(), None)
        device = reference.device if reference is not None else None
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
        out[str(layer.index)] = nn.ModuleDict({
            site: site_adapter(config, width, r, device=device, dtype=dtype) for site in layer_sites(config, layer)
        })
    if not len(out):
        raise ValueError(f"adapter_fused: leave_out {list(config.leave_out)} leaves out every one of the model's "
                         f"{len(layers)} layers")
    if config.inv_adapter:
        embeddings = embedding_module(_base(model), arch.name)
        reference = next(embeddings.parameters(), None)
        reference = reference if reference is not None else next(model.parameters())
        out["invertible"] = NiceCoupling(d, config.inv_adapter_reduction_factor, config.resolved_activation,  # type: ignore[arg-type]
                                         device=reference.device, dtype=reference.dtype)
    out.train(model.training)  # dropout inside adapters follows the model's mode
    return out


def _remove_state(model: nn.Module, state: _State) -> None:
    """Undo ``_state(model, create=True)``: remove the hooks, ``fused_adapters`` and the bookkeeping."""
    state.remove_hooks()
    base = _base(model)
    if MODULE_NAME in base._modules:
        delattr(base, MODULE_NAME)
    base.__dict__.pop(STATE_NAME, None)


def attach_adapter(model: nn.Module, name: str, config: AdapterConfig, modules: nn.ModuleDict) -> None:
    """Register already built adapter ``modules`` (see ``build_adapter_modules``) under ``name``.

    While the model is prepared for training another adapter (``train_adapter``), the new adapter's
    parameters get ``requires_grad=False`` so that adding it does not change what trains. On an error
    the model is left as it was (a first adapter that fails to attach also removes the hooks)."""
    existed = _state(model) is not None
    state = _state(model, create=True)
    assert state is not None
    try:
        if name in state.configs:
            raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it first")
        if state.training is not None:
            for parameter in modules.parameters():
                parameter.requires_grad_(False)
        state.modules[name] = modules
        state.configs[name] = config
        if not config.layout.original_ln_after:
            _hook_norms(state)
        if config.inv_adapter:
            hook_invertible(model, state)
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
    name = _check_name(name)
    config = resolve_config(config)
    find_architecture(model)  # clear error before anything is attached
    check_cross_adapter(model, config)
    state = _state(model)
    if state is not None and name in state.configs:
        raise ValueError(f"adapter_fused: an adapter named {name!r} already exists; delete it first")
    attach_adapter(model, name, config, build_adapter_modules(model, config))


def _resolve_setup(model: nn.Module, setup: object) -> tuple[_State | None, str | Composition | None]:
    """The model's state and ``setup`` parsed (see ``composition.parse_setup``), every adapter it
    names checked to exist (KeyError) and a composition checked to run at every site (ValueError)."""
    parsed = parse_setup(setup)
    if parsed is None:
        return _state(model), None
    state = None
    for name in active_names(parsed):
        state = require_adapter(model, name)
    assert state is not None
    if isinstance(parsed, Composition):
        check_setup(parsed, state.modules, state.configs, len(state.layers), SITES)
    return state, parsed


def _activate(state: _State, setup: str | Composition) -> None:
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


def head_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of ``model``'s task head: those outside ``model.base_model`` (e.g.
    ``classifier.*``, ``score.*``, ``qa_outputs.*``, an untied ``lm_head.*``), by their names in
    ``model``. Parameters shared with the base model (an output layer tied to the input embeddings)
    are not part of the head; a bare base model has none."""
    base = _base(model)
    if base is model:
        return
    shared = {id(p) for p in base.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in base.parameters() if p.device.type != "meta"}
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in shared or id(parameter) in seen:
            continue
        if parameter.device.type != "meta" and parameter.untyped_storage().data_ptr() in storages:
            continue
        seen.add(id(parameter))
        yield name, parameter


def train_adapter(model: nn.Module, name: str | Composition | list[Any] | tuple[Any, ...],
                  train_head: bool = True) -> None:
    """Prepare ``model`` to train adapter ``name``: the adapter's parameters get ``requires_grad=True``,
    and so does the model's task head when ``train_head`` (see ``head_parameters``: e.g. the
    ``classifier`` of a ``BertForSequenceClassification``, never embeddings tied to an output
    layer); every other parameter (base model, other adapters, the head when not ``train_head``)
    gets False. The adapter becomes active, the model is put in training mode, and adapters added
    afterwards start frozen. ``save_adapter(..., with_head=True)`` keeps the trained head.

    ``name`` may be a composition (as for ``set_active_adapters``): every adapter in it trains, and
    the composition becomes active.
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
    for adapter in active_names(setup):
        for parameter in state.modules[adapter].parameters():
            parameter.requires_grad_(True)
    _activate(state, setup)
    state.training = setup
    model.train()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its parameters; removing the last one also removes the hooks."""
    state = require_adapter(model, name)
    del state.modules[name]
    del state.configs[name]
    if name in active_names(state.active):
        state.active = None
    if state.training is not None and not any(n in state.configs for n in active_names(state.training)):
        state.training = None
    if not state.configs:
        _remove_state(model, state)


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    state = _state(model)
    return list(state.configs) if state is not None else []


def active_adapter(model: nn.Module) -> str | Composition | None:
    """The name of the active adapter, the active composition (e.g. ``Stack('lang', 'task')``), or None."""
    state = _state(model)
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
    state = _state(model)
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
