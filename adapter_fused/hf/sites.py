"""What runs on every forward pass: the hooks on a model's modules, what one call carries from hook to
hook, and what a site computes (``site_forward``), for one adapter or for a composition (made by
``compose.composition_site``).

``ModelState`` (one per model, kept by ``model``) registers forward hooks on the existing modules of
every layer (see ``layouts``): at each site (``Site``) a pre-hook on the residual module captures the
block residual ``x`` and a hook on the output module rewrites the sub-block output ``h``. With no
active adapter the hooks return nothing, so the model computes exactly what it computed before. Hooks
registered when a model first needs them: on a site's layer norm, to return an output computed at the
site in its place (``hook_norms``); on the base model, to replicate the batch for ``Parallel``
(``install_replication``, which also continues a filled key/value cache and leaves alone the inputs of a
``generate()`` that replicated them, see ``replicated_for_generation``); on the embeddings, for the
invertible adapter (``hook_invertible``).

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
from collections.abc import Callable
from typing import Any

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


class Site:
    """One adapter site of one layer: captures the block residual, then rewrites the sub-block output.

    ``norm`` is the layer norm of ``LN(h + x)`` in the model the hooks were registered on, and
    ``norm_path`` its path from the base model, to find the norm of a replica being run instead."""

    def __init__(self, state: ModelState, layer: int, name: str, spec: SiteSpec, norm: nn.Module | None,
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
        if isinstance(active, Composition):  # called as site(x, residual=h): see RAW
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


class _NormReplacement:
    """Forward hook on a site's layer norm: returns the output an ``original_ln_after=False`` adapter
    or a swapped site left for it in this thread (these replace the layer's own residual add and norm)."""

    def __init__(self, state: ModelState, key: tuple[str, str]) -> None:
        self.state = state
        self.key = key

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        pending = self.state.call.norm_outputs
        return pending.pop(self.key, None) if pending else None


def hook_norms(state: ModelState) -> None:
    """Register ``_NormReplacement`` on every site's layer norm (once per model)."""
    if state.__dict__.get("norms_hooked"):
        return
    for layer in resolve_layers(state.arch, state.base):
        for site_name, spec in layer.sites.items():
            norm = get_submodule(layer.module, spec.norm) if spec.norm else None
            if norm is not None:
                state.handles.append(norm.register_forward_hook(_NormReplacement(state, (str(layer.index), site_name))))
    state.__dict__["norms_hooked"] = True


class ModelState:
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
            shared: dict[str, dict[int, Site]] = {}  # output path -> {output_call: site}, where not plain
            for site_name, spec in layer.sites.items():
                norm = get_submodule(layer.module, spec.norm) if spec.norm else None
                norm_path = f"{layer.path}.{spec.norm}" if spec.norm else None
                site = Site(self, layer.index, site_name, spec, norm, norm_path)
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
        if swapped_norms:  # a swapped site hands its norm the output (see Site.apply)
            hook_norms(self)

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
