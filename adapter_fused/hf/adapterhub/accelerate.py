"""``accelerate``: the bottleneck adapters of a model built with AdapterHub's ``adapters`` package run
the fused kernel, in place.

AdapterHub's sequential bottleneck adapter maps an input ``z`` and a residual ``r`` (both (..., d)) to
``r + s * up(act(down(z)))``: the fused kernel takes ``r`` as its residual, in the same pass. Its parallel
adapter reads the block input ``x`` and its output ``s * up(act(down(x)))`` is added to the sub-block
output ``h``: when that adapter is the layer's whole active setup the kernel computes
``h + s * up(act(down(x)))`` in one pass; under other compositions (which combine the adapters'
outputs before adding ``h``) it computes ``s * up(act(down(x)))`` itself, never as a difference.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...activations import ACTIVATIONS, canonical_activation
from ...ops import CheckedParameters, Params, fused_adapter, module_forward


@dataclass(frozen=True)
class AccelerateReport:
    """What ``accelerate`` did: the module paths of the adapters this call converted, and of every
    adapter left on its own forward, with the reason."""

    converted: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _activation_name(module: nn.Module) -> str | None:
    """The canonical name of the function an AdapterHub activation module computes (found by
    evaluating it), or None when no kernel activation matches."""
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    try:
        with torch.no_grad():
            values = module(probe.clone())
    except Exception:  # noqa: BLE001 - any failure means: not expressible
        return None
    seen = set()
    for name, fn in ACTIVATIONS.items():
        canonical = canonical_activation(name)
        if canonical in seen:
            continue
        seen.add(canonical)
        if torch.allclose(values, fn(probe), rtol=0, atol=1e-9):
            return canonical
    return None


def _uncovered(adapter: nn.Module) -> tuple[list[str], str | None]:
    """Reasons an AdapterHub adapter module cannot run the fused kernel exactly, and its activation."""
    from adapters.methods.modeling import Adapter, ParallelAdapter

    reasons = []
    down = getattr(adapter, "adapter_down", None)
    up = getattr(adapter, "adapter_up", None)
    if type(adapter).forward not in (Adapter.forward, ParallelAdapter.forward):
        reasons.append(f"a forward of its own ({type(adapter).__name__})")
    ln_before = bool(getattr(adapter, "add_layer_norm_before", False))
    if getattr(adapter, "add_layer_norm_after", False) and type(getattr(adapter, "adapter_norm_after", None)) \
            is not nn.LayerNorm:
        reasons.append("a layer norm after the bottleneck that is not an nn.LayerNorm")
    if getattr(adapter, "use_gating", False) and type(getattr(adapter, "gate", None)) is not nn.Linear:
        reasons.append("a gate that is not an nn.Linear")
    dropout = getattr(adapter, "dropout", None)
    if not isinstance(dropout, nn.Dropout) or dropout.p > 0:
        reasons.append(f"dropout {getattr(dropout, 'p', dropout)}")
    if hasattr(adapter, "DropPath"):
        reasons.append("stochastic depth")
    activation = None
    core = list(down) if isinstance(down, nn.Sequential) else []
    if ln_before and core and type(core[0]) is nn.LayerNorm:
        core = core[1:]
    if not (len(core) == 2 and type(core[0]) is nn.Linear and type(up) is nn.Linear):
        reasons.append("PHM or other non-linear projections")
    else:
        activation = _activation_name(core[1])
        if activation is None:
            reasons.append(f"activation {type(getattr(core[1], 'f', core[1])).__name__}")
        scaling = getattr(adapter, "scaling", 1.0)
        if isinstance(scaling, torch.Tensor):
            if not (scaling.is_floating_point() and scaling.shape in ((1,), (up.out_features,))):
                reasons.append(f"scaling of shape {tuple(scaling.shape)}")
        elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            reasons.append(f"scaling {scaling!r}")
    return reasons, activation


_ACTIVATION = "_adapter_fused_activation"  # canonical activation name: set on converted adapters only
_PARALLEL = "_adapter_fused_parallel"  # whether a converted adapter is a ParallelAdapter
_LAYER = "_adapter_fused_layer"  # the BottleneckLayer holding a converted adapter (not a submodule)
_WARNED = "_adapter_fused_warned"  # the reasons last given in a warning for an adapter left unconverted


def _parameters(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                             float]:
    """(down weight (r, d), down bias (r,), up weight (d, r), up bias (d,), scale) of an AdapterHub adapter,
    read now. A learned scaling (a tensor of shape (1,) or (d,)) is folded into the up-projection,
    ``s[:, None] * W_up`` and ``s * b_up``, with scale 1, so gradients reach it through that product."""
    modules = adapter._modules  # read directly: this runs on every call
    linear = "1" if adapter.add_layer_norm_before else "0"  # after the adapter's own layer norm, if any
    down = modules["adapter_down"]._modules[linear]._parameters  # type: ignore[union-attr]
    up = modules["adapter_up"]._parameters  # type: ignore[union-attr]
    scaling = adapter.scaling
    if isinstance(scaling, torch.Tensor):
        up_bias = None if up["bias"] is None else scaling * up["bias"]
        return down["weight"], down["bias"], scaling[:, None] * up["weight"], up_bias, 1.0  # type: ignore[index]
    return down["weight"], down["bias"], up["weight"], up["bias"], float(scaling)  # type: ignore[return-value]


def _adapter_term(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``s * up(act(down(x)))`` for x (..., d) (the adapter's input, after its own layer norm if any), in
    one pass and without forming ``x + ...`` first: the kernel adds a residual of zeros that is never
    materialised (one element broadcast with stride 0)."""
    *parameters, scale = _parameters(adapter)
    zero = x.new_zeros(()).expand_as(x)
    return fused_adapter(x, *parameters, adapter.__dict__[_ACTIVATION], scale, residual=zero)


@functools.cache
def _hub() -> types.SimpleNamespace:
    """AdapterHub's composition blocks and contexts, imported once (read on every adapter call)."""
    from adapters import composition
    from adapters.context import AdapterSetup, ForwardContext

    return types.SimpleNamespace(composition=composition, AdapterSetup=AdapterSetup, ForwardContext=ForwardContext,
                                 concatenating=(composition.Parallel, composition.BatchSplit, composition.MultiTask))


def _reads_up(layer: nn.Module | None) -> bool:
    """Whether AdapterHub's composition of the active setup at ``layer`` reads the adapters' up
    outputs (the third item an adapter returns): a Fuse combines them, and Parallel, BatchSplit and
    MultiTask concatenate them, which needs all or none of the adapters there to return one (so all
    do where one of them always does: an adapter left unconverted, a gated one, or one with a layer
    norm after the bottleneck taken before the residual). A single adapter or a Stack of adapters
    (the usual setups) reads none."""
    if layer is None:
        return False
    hub = _hub()
    blocks = hub.composition
    context = hub.AdapterSetup.get_context()
    setup = context.adapter_setup if context is not None else layer.adapters_config.active_setup
    if type(setup) is blocks.Stack and all(type(child) is str for child in setup.children):
        return False  # the usual setups, decided without walking the tree
    if not isinstance(setup, blocks.AdapterCompositionBlock):
        return False
    found, pending = [], [setup]
    while pending:
        block = pending.pop()
        found.append(block)
        pending.extend(child for child in block.children if isinstance(child, blocks.AdapterCompositionBlock))
    if any(isinstance(block, blocks.Fuse) for block in found):
        return True
    if not any(isinstance(block, hub.concatenating) for block in found):
        return False
    present: Any = layer.adapters
    return any(name in present and not _one_pass(present[name]) for name in setup.flatten())


def _one_pass(adapter: nn.Module) -> bool:
    """Whether ``adapter`` is converted and computes its output in one kernel pass, returning no up
    projection unless asked to; adapters left unconverted, gated ones and those with a layer norm
    after the bottleneck taken before the residual always return it."""
    if _ACTIVATION not in adapter.__dict__:
        return False
    return bool(not adapter.use_gating and (adapter.__dict__[_PARALLEL] or not adapter.add_layer_norm_after
                                            or adapter.adapter_residual_before_ln))


def _fused_adapter_forward(self: nn.Module, x: torch.Tensor, residual_input: torch.Tensor | None,
                           output_gating: bool = False) -> tuple[torch.Tensor | None, ...]:
    """The forward of a converted AdapterHub adapter, bound to it as an instance attribute, computing
    what the class's forward does with the bottleneck ``s * f(z)`` from the kernel (``z`` is x, or
    the adapter's own layer norm of x with ``ln_before``).

    x, residual_input (..., d) -> (output (..., d), None, up (..., d) or None[, gate (b, 1, 1)]).
    output: a sequential adapter's ``r + g * s * f(z)`` (r = residual_input; g = the gate, 1 without
    gating), with ``ln_after`` the adapter's layer norm taken of that sum, or of ``g * s * f(z)``
    before r is added when ``adapter_residual_before_ln`` is false; a parallel adapter's
    ``g * s * f(z)``, normed with ``ln_after``. Without a gate or a layer norm after, or with the
    latter applied to the kernel's sum, the kernel computes the output in one pass and ``up`` is None
    unless AdapterHub reads it (gating scores requested: it records the last item for adapters without
    a gate; a Fuse; Parallel/BatchSplit/MultiTask beside an adapter that returns one, see
    ``_reads_up``). Otherwise ``up`` is ``s * f(z)`` from the kernel and the output is formed from it.
    The gate comes last when ``output_gating``. The bottleneck activation (second item) is never read
    by AdapterHub's compositions and is None. Everything is read from ``self`` at call time, so a deep copy computes
    with its own weights and dtype.
    """
    parallel, ln_after, gating = self.__dict__[_PARALLEL], self.add_layer_norm_after, self.use_gating
    z = self._modules["adapter_down"]._modules["0"](x) if self.add_layer_norm_before else x  # type: ignore[misc]
    residual = x if residual_input is None else residual_input
    if _one_pass(self) and not output_gating and not _reads_up(self.__dict__.get(_LAYER)):
        *parameters, scale = _parameters(self)
        if parallel:
            kernel_residual: torch.Tensor | None = z.new_zeros(()).expand_as(z)
        else:
            kernel_residual = None if residual is z else residual
        out = _checked_once(self, z, tuple(parameters), scale, kernel_residual)  # type: ignore[arg-type]
        return (self.adapter_norm_after(out) if ln_after else out), None, None
    up = _adapter_term(self, z)
    out, gate = up, None
    if gating:
        gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
        out = out * gate
    if parallel:
        out = self.adapter_norm_after(out) if ln_after else out
    elif ln_after and self.adapter_residual_before_ln:
        out = self.adapter_norm_after(out + residual)
    else:
        out = (self.adapter_norm_after(out) if ln_after else out) + residual
    return (out, None, up, gate) if gate is not None and output_gating else (out, None, up)


_CHECKED: weakref.WeakKeyDictionary[nn.Module, CheckedParameters | None] = weakref.WeakKeyDictionary()
"""A converted adapter's parameters as checked once (see ``ops.CheckedParameters``): kept beside the
adapter, not in it, so copies and pickles of the model check their own."""


def _checked_once(adapter: nn.Module, z: torch.Tensor, parameters: Params, scale: float,
                  residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + scale * f(z)`` (z itself without a residual) by the fused op, with the adapter's
    parameters checked once and again only when one is replaced, moved or changed other than in value
    (a learned scale, folded into new tensors on every call, is checked on every call)."""
    activation = adapter.__dict__[_ACTIVATION]
    if not torch.compiler.is_compiling():
        out = module_forward(_CHECKED, adapter, parameters, None, z, activation, scale, residual)
        if out is not None:
            return out
    return fused_adapter(z, *parameters, activation, scale, residual=residual)


def _sole_parallel_adapter(layer: nn.Module) -> nn.Module | None:
    """The converted parallel adapter that is the whole active setup of ``layer`` (a Stack naming one
    of its adapters, others being absent from this layer), or None for any other setup."""
    hub = _hub()
    setup = layer.get_active_setup()  # type: ignore[operator]
    if type(setup) is not hub.composition.Stack or not all(isinstance(child, str) for child in setup):
        return None
    present = [child for child in setup if child in layer.adapters]  # type: ignore[operator]
    if len(present) != 1:
        return None
    adapter = layer.adapters[present[0]]  # type: ignore[index]
    if not adapter.__dict__.get(_PARALLEL) or adapter.add_layer_norm_after or adapter.use_gating:
        return None
    context = hub.ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None  # AdapterHub records per-adapter outputs then; leave it its own path
    return adapter


def _fused_layer_forward(self: nn.Module, hidden_states: torch.Tensor, residual_input: torch.Tensor | None,
                         layer_norm: nn.Module | None) -> torch.Tensor:
    """``bottleneck_layer_forward`` of an AdapterHub layer holding a converted parallel adapter, bound
    to the layer as an instance attribute. hidden_states (the sub-block output h) and residual_input
    (the block input x), both (..., d) -> (..., d).

    When the active setup is that one parallel adapter (without a gate or a layer norm after), its
    output is added to h inside the kernel, ``h + s * f(z)`` in one pass (z: x, or the adapter's own
    layer norm of x), followed by the layer's own residual and norm as AdapterHub's
    ``post_forward`` would; any other setup runs the class's own method.
    """
    adapter = _sole_parallel_adapter(self) if residual_input is not None else None
    if adapter is None:
        own = type(self).bottleneck_layer_forward  # type: ignore[attr-defined]
        return own(self, hidden_states, residual_input, layer_norm)
    from adapters.composition import adjust_tensors_for_parallel

    (residual_input,) = adjust_tensors_for_parallel(hidden_states, residual_input)
    (hidden_states,) = adjust_tensors_for_parallel(residual_input, hidden_states)
    assert residual_input is not None
    *parameters, scale = _parameters(adapter)
    z = adapter.adapter_down[0](residual_input) if adapter.add_layer_norm_before else residual_input
    output = _checked_once(adapter, z, tuple(parameters), scale, hidden_states)  # type: ignore[arg-type]
    if adapter.original_ln_after:
        output = layer_norm(output + residual_input) if layer_norm else output + residual_input
    return output


def accelerate(model: nn.Module) -> AccelerateReport:
    """Make every AdapterHub bottleneck adapter of ``model`` whose configuration the fused kernel
    covers run it, in place, with the same parameters (names and tensors unchanged), outputs and
    gradients, under every composition (Stack, Parallel, BatchSplit, MultiTask, Average, Split, Fuse)
    and with gating scores or fusion attentions requested. The adapter's own layer norms
    (``ln_before``, ``ln_after``) and gate run as AdapterHub's forward runs them around the kernel;
    learned scaling (a scalar or one per channel) is folded into the up-projection at each call.
    Adapters it cannot cover (PHM, dropout or stochastic depth inside the adapter, other activations,
    subclasses with their own forward) keep their own forward.

    Calling it again converts adapters added since. The report lists the adapters this call converted
    and every adapter left on its own forward with the reason; the warning names only adapters not
    named (for the same reason) by an earlier call. Raises ImportError without ``adapters``.

    A converted adapter reads its weights, scaling and activation from itself at every call, so a
    ``copy.deepcopy`` of an accelerated model computes with the copy's weights and follows the copy's
    ``.to()``. A layer whose whole active setup is one parallel adapter adds that adapter's output to
    the sub-block output inside the kernel."""
    try:
        from adapters.methods.bottleneck import BottleneckLayer
        from adapters.methods.modeling import Adapter, ParallelAdapter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("adapter_fused.accelerate needs the AdapterHub package: pip install adapters") from exc

    converted, skipped, new = [], [], []
    for layer_path, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or not hasattr(layer, "adapters"):
            continue
        for name, adapter in layer.adapters.items():
            path = f"{layer_path}.adapters.{name}" if layer_path else f"adapters.{name}"
            if not isinstance(adapter, Adapter) or _ACTIVATION in adapter.__dict__:
                continue
            reasons, activation = _uncovered(adapter)
            if reasons:
                why = ", ".join(reasons)
                skipped.append((path, why))
                if adapter.__dict__.get(_WARNED) != why:
                    new.append((path, why))
                    adapter.__dict__[_WARNED] = why
                continue
            assert activation is not None
            parallel = isinstance(adapter, ParallelAdapter)
            adapter.__dict__.pop(_WARNED, None)
            adapter.__dict__.update({_ACTIVATION: activation, _PARALLEL: parallel, _LAYER: layer})
            adapter.forward = types.MethodType(_fused_adapter_forward, adapter)
            if parallel and "bottleneck_layer_forward" not in layer.__dict__:
                layer.bottleneck_layer_forward = types.MethodType(_fused_layer_forward, layer)
            converted.append(path)
    if new:
        listing = "; ".join(f"{path} ({why})" for path, why in new)
        warnings.warn(f"adapter_fused.accelerate left {len(new)} adapter(s) on their own forward: {listing}",
                      stacklevel=2)
    return AccelerateReport(tuple(converted), tuple(skipped))
