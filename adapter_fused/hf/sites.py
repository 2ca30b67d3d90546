"""What runs on every forward pass: the hooks on a model's modules, what one call carries from hook to
hook, and what a site computes (``site_forward``), for one adapter or for a composition (made by
``compose.composition_site``).

``ModelState`` (one per model, kept by ``model``) registers forward hooks on the existing modules of
every layer (see ``layouts``): at each site (``Site``) a pre-hook on the residual module captures the
block residual ``x`` and a hook on the output module rewrites the sub-block output ``h``. With no
active adapter the hooks return nothing, so the model computes exactly what it computed before. Hooks
registered where a plan reads them: on a site's layer norm, to return an output computed at the
site in its place. Hooks registered once a model first needs them: on the base model, to replicate the
batch for ``Parallel`` (``install_replication``, which also continues a filled key/value cache and leaves
alone the inputs of a ``generate()`` that replicated them, see ``replicated_for_generation``); on the
embeddings, for the invertible adapter (``hook_invertible``).

One model may be called from many threads at once: what a call needs between hooks (the captured
block residual, the ``per_sample_adapters`` batch, the adapters of the module being run) is kept
per thread. ``nn.DataParallel`` replicas share the hooks of the original module but run with their
own adapters: a hook on the base model records, for the duration of each call, which module's
``fused_adapters`` the sites read. ``copy.deepcopy`` (and pickling) of a model gives a copy whose
hooks read the copy's adapters and layers.

Everything here is read per call, on the decoding path: hooks reach what they need through their own
attributes and this module's globals, not through other modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from .compose import CallStack, composition_site
from .composition import Composition
from .config import AdapterConfig, Placement
from .layouts import Architecture, SiteSpec, call_argument, embedding_module, get_submodule, resolve_layers

MODULE_NAME = "fused_adapters"
"""The attribute of the base model holding the adapters, an ``nn.ModuleDict``."""

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


DIRECT, PARALLEL, BEFORE, GENERAL = range(4)
"""How ``Site.apply`` computes a plan's new sub-block output ``h'`` from ``h`` and the block residual ``x``:
``adapter(h)`` (Houlsby's placement); ``adapter(x, residual=h)`` (the parallel placement, and compositions
given ``RAW``); ``adapter(LN(h + x), residual=h)`` (Pfeiffer's; ``h + x`` where the layer has no norm
there); anything else by ``site_forward`` and the swapped-site and norm-replacing steps."""


class SitePlan(NamedTuple):
    """What one site runs for a setup, resolved when the setup is activated (not per call).

    ``adapter`` is called as ``adapter(z, residual=None)`` under ``placement`` (see ``site_forward``);
    ``needs_x``: the site reads the captured block residual (so the residual module's hook must run);
    ``kind``: how ``Site.apply`` runs it (``DIRECT``, ``PARALLEL``, ``BEFORE`` or ``GENERAL``);
    ``replaces_norm``: the layer's norm returns what the site computed."""

    adapter: SiteAdapter
    placement: Placement
    needs_x: bool
    kind: int
    replaces_norm: bool


def site_plan(adapter: SiteAdapter, placement: Placement, spec: SiteSpec, has_norm: bool) -> SitePlan:
    """The ``SitePlan`` of ``adapter`` at a site given by ``spec`` (``has_norm``: the site's layer has
    the norm of ``LN(h + x)``). At a site without a block residual the placement is the one that
    computes the same there (``no_residual_placement``; a parallel one is refused when it runs)."""
    if spec.residual is None:
        try:
            placement = no_residual_placement(placement, "this site")
        except ValueError:
            return SitePlan(adapter, placement, False, GENERAL, False)  # Site.apply raises the error
    needs_x = (placement.parallel or placement.original_ln_before or spec.swapped
               or (not placement.original_ln_after and not has_norm))
    replaces_norm = has_norm and (spec.swapped or not placement.original_ln_after)
    kind = GENERAL
    if not spec.swapped and placement.original_ln_after:
        if not needs_x:
            kind = DIRECT
        elif placement.parallel:
            kind = PARALLEL
        elif placement.residual_before_ln is True:
            kind = BEFORE
    return SitePlan(adapter, placement, needs_x, kind, replaces_norm)


class Site:
    """One adapter site of one layer: captures the block residual, then rewrites the sub-block output.

    ``plan`` is what the active setup runs here (None: nothing), set by ``ModelState.refresh``; a call
    inside ``per_sample_adapters`` runs its batch's plan instead, and a call on an ``nn.DataParallel``
    replica (whose modules are not this site's) resolves the replica's adapters. ``norm`` is the layer
    norm of ``LN(h + x)`` in the model the hooks were registered on, and ``norm_path`` its path from the
    base model, to find the norm of a replica being run instead; ``shared`` is the path of the output
    module where it serves several sites (see ``_SharedOutput``)."""

    def __init__(self, state: ModelState, layer: int, name: str, spec: SiteSpec, norm: nn.Module | None,
                 norm_path: str | None, output_module: nn.Module, residual_module: nn.Module | None) -> None:
        self.state = state
        self.layer = str(layer)
        self.name = name
        self.key = (self.layer, name)
        self.spec = spec
        self.norm = norm
        self.norm_path = norm_path
        self.output_module = output_module
        self.residual_module = residual_module
        self.shared: str | None = None
        self.plan: SitePlan | None = None

    def resolve(self, active: str | Composition | None, modules: nn.ModuleDict, configs: dict[str, AdapterConfig],
                norm: nn.Module | None) -> SitePlan | None:
        """The plan of ``active`` here, reading the adapters of ``modules`` (None: no adapter here)."""
        if active is None:
            return None
        if isinstance(active, Composition):  # called as site(x, residual=h): see RAW
            found = composition_site(active, modules, configs, self.layer, self.name, norm)
            return None if found is None else site_plan(found, RAW, self.spec, norm is not None)
        adapters = modules[active] if active in modules else None
        layer = adapters[self.layer] if adapters is not None and self.layer in adapters else None  # type: ignore[operator]
        if layer is None or self.name not in layer:  # type: ignore[operator]
            return None
        return site_plan(layer[self.name], configs[active].layout, self.spec, norm is not None)  # type: ignore[index]

    def replica_plan(self, call: _CallLocal) -> SitePlan | None:
        """The plan for a module that is not this site's own (an ``nn.DataParallel`` replica's)."""
        state = self.state
        return self.resolve(state.active, state.adapters_of_call(call), state.configs, self._norm(call))

    def _norm(self, call: _CallLocal) -> nn.Module | None:
        """The site's layer norm in the base module this thread is running."""
        if self.norm_path is None or not call.bound or call.bound[-1] is self.state.base:
            return self.norm
        return call.bound[-1].get_submodule(self.norm_path)

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of ``spec.residual``: keep the block residual x where the plan reads it."""
        call = self.state.call
        batch = call.batch
        if batch is not None:
            plan = batch.plans.get(self.key)
        elif module is self.residual_module:
            plan = self.plan
        else:
            plan = self.replica_plan(call)
        if plan is None or not plan.needs_x:
            return
        call.residuals[self.key] = call_argument(args, kwargs, self.spec.residual_position,
                                                 self.spec.residual_keywords)

    def capture_plus(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook of ``spec.residual_plus``: add its output to the captured residual."""
        call = self.state.call
        x = call.residuals.get(self.key)
        if x is None:
            return
        call.residuals[self.key] = (output[0] if isinstance(output, tuple) else output) + x

    def apply(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook of ``spec.output``: the adapted sub-block output (None: unchanged)."""
        call = self.state.call
        batch = call.batch
        norm = self.norm
        if batch is not None:
            plan = batch.plans.get(self.key)
        elif module is self.output_module:
            plan = self.plan
        else:
            plan = self.replica_plan(call)
            norm = self._norm(call)
        if plan is None:
            return None
        kind = plan.kind
        h = output[0] if isinstance(output, tuple) else output
        if kind == DIRECT:  # Houlsby's placement: h' = h + s * f(h), nothing captured, nothing replaced
            new = plan.adapter(h)
        elif kind == PARALLEL:
            new = plan.adapter(_captured(call.residuals.pop(self.key, None)), residual=h)
        elif kind == BEFORE:  # Pfeiffer's placement: h' = h + s * f(LN(h + x))
            total = h + _captured(call.residuals.pop(self.key, None))
            new = plan.adapter(norm(total) if norm is not None else total, residual=h)
        else:
            return self._general(plan, call, norm, output)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _general(self, plan: SitePlan, call: _CallLocal, norm: nn.Module | None, output: Any) -> Any:
        """``apply`` for the plans of kind ``GENERAL``."""
        placement = plan.placement
        x = call.residuals.pop(self.key, None)
        if self.spec.residual is None:  # no residual at this site: h + x is h itself
            placement = no_residual_placement(placement, f"the {self.name} site")
        h = output[0] if isinstance(output, tuple) else output
        if not self.spec.swapped:
            new = site_forward(plan.adapter, placement, h, x, norm)
        else:  # the adapter reads x as its input and h as its residual
            x = _captured(x)
            new = site_forward(plan.adapter, placement, x, h, norm)
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

    def __init__(self, state: ModelState, key: tuple[str, str], sites: dict[int, Site]) -> None:
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

    @property
    def module(self) -> nn.Module:
        """The shared output module of the model the hooks were registered on."""
        return next(iter(self.sites.values())).output_module


class _NormReplacement:
    """Forward hook on a site's layer norm: returns the output an ``original_ln_after=False`` adapter
    or a swapped site left for it in this thread (these replace the layer's own residual add and norm)."""

    def __init__(self, state: ModelState, key: tuple[str, str]) -> None:
        self.state = state
        self.key = key

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        pending = self.state.call.norm_outputs
        return pending.pop(self.key, None) if pending else None


class _Hook(NamedTuple):
    """One hook a ``ModelState`` may register: on ``module``, of ``kind`` (``"pre"``, ``"pre_kwargs"``,
    ``"post"``)."""

    module: nn.Module
    kind: str
    fn: Callable[..., Any]


def _register(hook: _Hook) -> torch.utils.hooks.RemovableHandle:
    module, kind, fn = hook
    if kind == "pre":
        return module.register_forward_pre_hook(fn)
    if kind == "pre_kwargs":
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    return module.register_forward_hook(fn)


HookKey = tuple[str, ...]
"""("apply" | "capture" | "plus" | "norm", layer, site) or ("shared" | "reset", layer, output path)."""


class ModelState:
    """Per-model bookkeeping (a plain object, so it adds no parameters or buffers).

    ``configs`` and ``active`` are shared by every thread; ``call`` is per thread. Deep copies and
    pickles get a fresh ``call`` and, through the copy memo, the copy's layers, modules and sites.

    Hooks exist only where a plan reads them: a site's output hook where the active setup (or an open
    ``per_sample_adapters`` block) has an adapter there, its residual hook where the placement reads the
    block residual, its norm's hook where the site replaces the norm's output; the base model's two hooks
    stay while the model has adapters. Setting ``active`` (or calling ``refresh`` after adapters are added, removed
    or replaced) resolves every site's plan and registers and removes hooks to match, so an adapter
    that is added but not active costs nothing per call.
    """

    def __init__(self, arch: Architecture, base: nn.Module, layers: nn.ModuleList, modules: nn.ModuleDict) -> None:
        self.arch = arch
        self.base = base
        self.layers = layers
        self.modules = modules
        self.configs: dict[str, AdapterConfig] = {}
        self._active: str | Composition | None = None
        self.training: str | Composition | None = None  # what train_adapter last prepared, until it is deleted
        self.call = _CallLocal()
        self.per_sample_blocks = 0  # per_sample_adapters blocks open in any thread
        self.batches: dict[int, Any] = {}  # token -> the PerSampleBatch of a block open in any thread
        self.generation = 0  # counts changes of the set of adapters (what per-sample caches are valid for)
        self.lock = threading.Lock()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []  # installed once (replication, invertible)
        self.sites: list[Site] = []
        self.plan_version = 0
        """Counts changes of the plans and hooks. ``bind`` reads it on every call, so torch.compile, which does
        not watch hooks being added or removed, guards on it and recompiles when the setup changes."""
        self.handles += [base.register_forward_pre_hook(self.bind, prepend=True),
                         base.register_forward_hook(self.unbind, always_call=True)]
        self.hooks: dict[HookKey, _Hook] = {}
        """Every hook a plan may read, in the order hooks on one module are registered."""
        self.installed: dict[HookKey, torch.utils.hooks.RemovableHandle] = {}
        norms: dict[HookKey, _Hook] = {}
        for layer in resolve_layers(arch, base):
            shared: dict[str, dict[int, Site]] = {}  # output path -> {output_call: site}, where not plain
            index = str(layer.index)
            for site_name, spec in layer.sites.items():
                norm = get_submodule(layer.module, spec.norm) if spec.norm else None
                norm_path = f"{layer.path}.{spec.norm}" if spec.norm else None
                output_module = get_submodule(layer.module, spec.output)
                residual_module = get_submodule(layer.module, spec.residual) if spec.residual is not None else None
                assert output_module is not None and (residual_module is not None or spec.residual is None)
                site = Site(self, layer.index, site_name, spec, norm, norm_path, output_module, residual_module)
                self.sites.append(site)
                if residual_module is not None:
                    self.hooks[("capture", *site.key)] = _Hook(residual_module, "pre_kwargs", site.capture)
                if spec.residual_plus is not None:  # after the hooks of earlier sites on the same module
                    plus_module = get_submodule(layer.module, spec.residual_plus)
                    assert plus_module is not None
                    self.hooks[("plus", *site.key)] = _Hook(plus_module, "post", site.capture_plus)
                if spec.output_call or sum(other.output == spec.output for other in layer.sites.values()) > 1:
                    shared.setdefault(spec.output, {})[spec.output_call] = site
                    site.shared = spec.output
                else:
                    self.hooks[("apply", *site.key)] = _Hook(output_module, "post", site.apply)
                if norm is not None:
                    norms[("norm", *site.key)] = _Hook(norm, "post", _NormReplacement(self, site.key))
            for path, by_call in shared.items():  # model_layers checked that sites sharing a path differ in call
                hook = _SharedOutput(self, (index, path), by_call)
                self.hooks[("reset", index, path)] = _Hook(layer.module, "pre", hook.reset)
                self.hooks[("shared", index, path)] = _Hook(hook.module, "post", hook)
        self.hooks.update(norms)  # a norm's hook runs after the hooks of the sites on the same module

    @property
    def active(self) -> str | Composition | None:
        """The active setup: an adapter name, a composition, or None (setting it runs ``refresh``)."""
        return self._active

    @active.setter
    def active(self, setup: str | Composition | None) -> None:
        self._active = setup
        self.refresh()

    def adapters_changed(self) -> None:
        """An adapter was added, removed or replaced: drop what was derived from the old set, ``refresh``."""
        self.generation += 1
        self.__dict__.pop("per_sample_cache", None)
        self.__dict__.pop("per_sample_bank", None)
        self.__dict__.pop("rows_hooks_checked", None)  # its batch holds the old adapters
        self.refresh()

    def refresh(self) -> None:
        """Resolve every site's plan for the active setup and register the hooks the plans read (and
        those of open ``per_sample_adapters`` blocks), removing the others."""
        active, modules, configs = self._active, self.modules, self.configs
        for site in self.sites:
            site.plan = site.resolve(active, modules, configs, site.norm)
        self.plan_version += 1
        self.sync_hooks()

    def hook_keys(self, plans: Iterable[tuple[Site, SitePlan | None]]) -> set[HookKey]:
        """The hooks that ``plans`` ((site, plan or None) pairs) read."""
        keys: set[HookKey] = set()
        for site, plan in plans:
            if plan is None:
                continue
            layer, name = site.key
            if site.shared is not None:
                keys.update((("reset", layer, site.shared), ("shared", layer, site.shared)))
            else:
                keys.add(("apply", layer, name))
            if plan.needs_x:
                keys.update((("capture", layer, name), ("plus", layer, name)))
            if plan.replaces_norm:
                keys.add(("norm", layer, name))
        return keys & self.hooks.keys()

    def sync_hooks(self, extra: set[HookKey] = frozenset()) -> None:  # type: ignore[assignment]
        """Register the hooks that the active plans, the open blocks' plans and ``extra`` read, and remove
        the others. A module whose set of these hooks changes gets all of them again, in their order."""
        with self.lock:
            wanted = self.hook_keys((site, site.plan) for site in self.sites) | extra
            for batch in self.batches.values():
                wanted |= batch.hook_keys
            if wanted == self.installed.keys():
                return
            self.plan_version += 1
            changed = {id(self.hooks[key].module) for key in wanted ^ self.installed.keys()}
            for key, hook in self.hooks.items():
                if id(hook.module) in changed and key in self.installed:
                    self.installed.pop(key).remove()
            for key, hook in self.hooks.items():
                if key in wanted and key not in self.installed:
                    self.installed[key] = _register(hook)

    def bind(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the base model: this thread's sites read ``module``'s adapters until
        it returns (an ``nn.DataParallel`` replica shares these hooks but holds its own adapters)."""
        if self.plan_version < 0:  # never: the read makes torch.compile guard on the setup (see plan_version)
            return
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
        state["batches"] = {}
        state.pop("per_sample_cache", None)
        state.pop("per_sample_bank", None)
        state.pop("rows_hooks_checked", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("training", None)
        self.__dict__.setdefault("generation", 0)
        self.call = _CallLocal()
        self.lock = threading.Lock()

    def remove_hooks(self) -> None:
        """Remove every hook of the model's adapters (the last adapter is gone)."""
        for handle in [*self.installed.values(), *self.handles]:
            handle.remove()
        self.installed.clear()
        self.handles.clear()


RAW = Placement(attention=True, ffn=True, parallel=True)
"""The placement ``Site`` hands a composition with: ``site_forward`` then calls it as
``site(x, residual=h)`` with the block residual x and the sub-block output h, untouched."""


# -- Parallel: the batch replicated at the base model's input --

BATCH_FIRST = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids",
               "encoder_hidden_states", "encoder_attention_mask", "decoder_input_ids", "decoder_inputs_embeds",
               "decoder_attention_mask", "decoder_position_ids", "input_features", "pixel_values")
"""Base-model inputs repeated for ``Parallel`` (those whose first dimension is the batch size)."""
_LEADS = ("input_ids", "inputs_embeds", "input_features", "pixel_values", "decoder_input_ids")
"""The inputs whose first dimension gives the batch size, in the order they are looked for."""


_GENERATION = CallStack()
"""The models whose ``generate()`` runs in this thread on inputs already replicated for Parallel."""


def replicated_for_generation(state: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``ReplicateInputs`` of ``state`` leaves the inputs of this thread's calls
    as they are: a ``generate()`` that repeated its inputs once runs on the n*B rows throughout."""
    return _GENERATION.pushed(state)


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    """The first non-empty tensor held by a key/value cache (transformers' cache classes or nested tuples)."""
    if isinstance(value, torch.Tensor):
        return value if value.dim() >= 1 and value.numel() else None
    if depth > 4:
        return None
    items = value if isinstance(value, (tuple, list)) else [
        getattr(value, name, None) for name in ("self_attention_cache", "layers", "keys", "key_cache")]
    for item in items:
        found = _first_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def cache_rows(cache: Any) -> int | None:
    """The batch rows a filled key/value cache holds; None without a cache or for an empty one."""
    if cache is None:
        return None
    if hasattr(cache, "get_seq_length"):
        if cache.get_seq_length() == 0:
            return None
    elif not cache:
        return None
    tensor = _first_tensor(cache)
    return None if tensor is None else int(tensor.shape[0])


class ReplicateInputs:
    """Forward pre-hook (with kwargs) of the base model: while a composition with a Parallel block
    of n children is active, repeat the batch-first inputs n times (copy-major, as AdapterHub
    repeats the hidden states), so every layer sees the n*B rows the Parallel block splits.

    With a filled key/value cache (which then holds the n*B rows of the first call) the inputs
    continue it: inputs of B rows are repeated, inputs of n*B rows (tokens picked from the n*B
    rows of logits) are left as they are. Inside ``generate()`` of a model with the methods (see
    ``replicated_for_generation``) nothing is repeated: its inputs were repeated once."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = self.state
        active = state.active
        if not isinstance(active, Composition) or active.parallel_channels == 1 or state.call.batch is not None:
            return None
        n = active.parallel_channels
        if getattr(module, "_is_replica", False):
            raise RuntimeError(f"adapter_fused: {active!r} replicates the batch inside the model, which "
                               "nn.DataParallel replicas cannot do; call the model itself")
        names = list(inspect.signature(module.forward).parameters)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        lead = next((bound[k] for k in _LEADS if isinstance(bound.get(k), torch.Tensor)), None)
        if lead is None:
            raise ValueError(f"adapter_fused: {active!r} needs one of {', '.join(_LEADS)} to replicate the batch")
        batch = lead.shape[0]
        if any(s is state for s in _GENERATION.items):
            if batch % n:
                raise ValueError(f"adapter_fused: {active!r} needs {n} copies of the batch, got {batch} rows")
            return None
        cache = bound.get("cache")  # transformers 5.2x; "past_key_values" before (and still accepted)
        rows = cache_rows(cache if cache is not None else bound.get("past_key_values"))
        if rows is not None and (rows % n or batch not in (rows, rows // n)):
            raise ValueError(f"adapter_fused: {active!r}: the key/value cache holds {rows} rows, which is neither the "
                             f"{batch} rows of the inputs nor {n} copies of them")
        small = batch if rows is None else rows // n

        def repeat(name: str, value: Any) -> Any:
            if name == "encoder_outputs" and isinstance(value, dict):  # a ModelOutput
                return type(value)(**{str(k): repeat("encoder_hidden_states", v) for k, v in value.items()})
            if name == "encoder_outputs" and isinstance(value, tuple):
                return type(value)(repeat("encoder_hidden_states", v) for v in value)
            if name in BATCH_FIRST and isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == small:
                return value.repeat(n, *([1] * (value.dim() - 1)))
            return value

        new_args = tuple(repeat(name, value) for name, value in zip(names, args))
        new_kwargs = {name: repeat(name, value) for name, value in kwargs.items()}
        return new_args, new_kwargs


def install_replication(state: Any) -> None:
    """Register ``ReplicateInputs`` on the base model once (its handle joins the state's hooks)."""
    if state.__dict__.get("replicates_inputs"):
        return
    state.handles.append(state.base.register_forward_pre_hook(ReplicateInputs(state), with_kwargs=True))
    state.replicates_inputs = True


# -- the invertible adapter: on the embeddings' output and the output embeddings' input --

class InvertibleHook:
    """Forward hook on the embedding module (``rev=False``) or forward pre-hook on the output
    embeddings (``rev=True``): runs the active adapter's ``invertible`` block, if it has one."""

    def __init__(self, state: Any, rev: bool) -> None:
        self.state = state
        self.rev = rev

    def _block(self) -> nn.Module | None:
        state = self.state
        call = state.call
        if call.batch is not None or state.active is None:
            return None
        modules = state.adapters_of_call(call)[state.active]
        return modules._modules.get("invertible")

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        block = self._block()
        if block is None:
            return None
        if self.rev:
            return (block(args[0], rev=True), *args[1:])
        if isinstance(output, tuple):
            return (block(output[0]), *output[1:])
        return block(output)


def hook_invertible(model: nn.Module, state: Any) -> None:
    """Register the two ``InvertibleHook``s of ``model`` (once per model)."""
    if state.__dict__.get("invertible_hooked"):
        return
    embeddings = embedding_module(state.base, state.arch.name)
    handles = [embeddings.register_forward_hook(InvertibleHook(state, rev=False))]
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(output, nn.Module):
        handles.append(output.register_forward_pre_hook(InvertibleHook(state, rev=True)))
    state.handles.extend(handles)
    state.__dict__["invertible_hooked"] = True
