"""Bridge to AdapterHub (the ``adapters`` package): its bottleneck configs, its saved weights, and
``accelerate``, which makes the bottleneck adapters of a model built with ``adapters`` run the fused
kernel.

AdapterHub's sequential bottleneck adapter maps an input ``z`` and a residual ``r`` (both (..., d)) to
``r + s * up(act(down(z)))``: the fused kernel takes ``r`` as its residual, in the same pass. Its parallel
adapter reads the block input ``x`` and its output ``s * up(act(down(x)))`` is added to the sub-block
output ``h``: when that adapter is the layer's whole active setup the kernel computes
``h + s * up(act(down(x)))`` in one pass; under other compositions (which combine the adapters'
outputs before adding ``h``) it computes ``s * up(act(down(x)))`` itself, never as a difference.
"""

from __future__ import annotations

import math
import re
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..activations import ACTIVATIONS, canonical_activation
from ..ops import fused_adapter
from .config import PLACEMENTS, AdapterConfig, Placement

ADAPTERHUB_CONFIG = "adapter_config.json"
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")

_INITS = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "mam"}
_ACTIVATION_NAMES = {"leakyrelu": "leaky_relu"}

# (key, value that the fused path can express, description of anything else)
_REQUIRED: tuple[tuple[str, Any, str], ...] = (
    ("phm_layer", False, "PHM (parameterized hypercomplex) layers"),
    ("cross_adapter", False, "cross-attention adapters"),
)
_FLAGS = ("ln_before", "ln_after", "adapter_residual_before_ln", "use_gating")


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
        if match is None or "cross" in match.group(2):
            unexpected.append(key)
            continue
        layer, location, name, part = match.groups()
        site = "attention" if "attention" in location else "ffn"
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


# ---------------------------------------------------------------------------------------------------
# accelerate


@dataclass(frozen=True)
class AccelerateReport:
    """What ``accelerate`` did: module paths converted, and those left as they were with the reason."""

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
    """Reasons an AdapterHub adapter module cannot run the fused kernel, and its activation."""
    reasons = []
    down = getattr(adapter, "adapter_down", None)
    up = getattr(adapter, "adapter_up", None)
    if getattr(adapter, "add_layer_norm_before", False):
        reasons.append("layer norm before the bottleneck")
    if getattr(adapter, "add_layer_norm_after", False):
        reasons.append("layer norm after the bottleneck")
    if getattr(adapter, "use_gating", False):
        reasons.append("gating")
    scaling = getattr(adapter, "scaling", 1.0)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        reasons.append("learned scaling")
    dropout = getattr(adapter, "dropout", None)
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        reasons.append(f"dropout {dropout.p}")
    if hasattr(adapter, "DropPath"):
        reasons.append("stochastic depth")
    activation = None
    if not (isinstance(down, nn.Sequential) and len(down) == 2 and type(down[0]) is nn.Linear
            and type(up) is nn.Linear):
        if not any(r.startswith("layer norm") for r in reasons):
            reasons.append("PHM or other non-linear projections")
    else:
        activation = _activation_name(down[1])
        if activation is None:
            reasons.append(f"activation {type(getattr(down[1], 'f', down[1])).__name__}")
    return reasons, activation


_ACTIVATION = "_adapter_fused_activation"  # canonical activation name: set on converted adapters only
_PARALLEL = "_adapter_fused_parallel"  # whether a converted adapter is a ParallelAdapter
_FUSION = "_adapter_fused_fusion"  # the adapter_fusion_layer ModuleDict of the adapter's layer (not a submodule)


def _parameters(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(down weight (r, d), down bias (r,), up weight (d, r), up bias (d,)) of an AdapterHub adapter, read now."""
    down: nn.Linear = adapter.adapter_down[0]  # type: ignore[index]
    up: nn.Linear = adapter.adapter_up  # type: ignore[assignment]
    return down.weight, down.bias, up.weight, up.bias


def _adapter_term(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``s * up(act(down(x)))`` for x (..., d), in one pass and without forming ``x + ...`` first: the
    kernel adds a residual of zeros that is never materialised (one element broadcast with stride 0)."""
    zero = x.new_zeros(()).expand_as(x)
    return fused_adapter(x, *_parameters(adapter), adapter.__dict__[_ACTIVATION], float(adapter.scaling),
                         residual=zero)


AdapterOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""What an AdapterHub adapter's forward returns: (output, down-projection, up-projection)."""


def _fused_adapter_forward(self: nn.Module, x: torch.Tensor, residual_input: torch.Tensor | None,
                           output_gating: bool = False) -> AdapterOutput:
    """The forward of a converted AdapterHub adapter, bound to it as an instance attribute.

    x, residual_input (..., d) -> (output (..., d), None, None): ``residual_input + s * f(x)`` for a
    sequential adapter, ``s * f(x)`` for a parallel one. Everything (weights, scaling, activation,
    the fusion layers of its layer) is read from ``self`` at call time, so a deep copy computes with
    its own weights and dtype. While the layer has AdapterFusion layers, the class's own forward
    runs (fusion needs the up-projection, which the fused pass does not return).
    """
    fusion = self.__dict__.get(_FUSION)
    if fusion is not None and len(fusion) > 0:
        return type(self).forward(self, x, residual_input, output_gating)
    if self.__dict__[_PARALLEL]:
        return _adapter_term(self, x), None, None
    residual = None if residual_input is None or residual_input is x else residual_input
    return fused_adapter(x, *_parameters(self), self.__dict__[_ACTIVATION], float(self.scaling),
                         residual=residual), None, None


def _sole_parallel_adapter(layer: nn.Module) -> nn.Module | None:
    """The converted parallel adapter that is the whole active setup of ``layer`` (a Stack naming one
    of its adapters, others being absent from this layer), or None for any other setup."""
    from adapters.composition import Stack
    from adapters.context import ForwardContext

    setup = layer.get_active_setup()  # type: ignore[operator]
    if type(setup) is not Stack or not all(isinstance(child, str) for child in setup):
        return None
    present = [child for child in setup if child in layer.adapters]  # type: ignore[operator]
    if len(present) != 1:
        return None
    adapter = layer.adapters[present[0]]  # type: ignore[index]
    if not adapter.__dict__.get(_PARALLEL):
        return None
    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None  # AdapterHub records per-adapter outputs then; leave it its own path
    return adapter


def _fused_layer_forward(self: nn.Module, hidden_states: torch.Tensor, residual_input: torch.Tensor | None,
                         layer_norm: nn.Module | None) -> torch.Tensor:
    """``bottleneck_layer_forward`` of an AdapterHub layer holding a converted parallel adapter, bound
    to the layer as an instance attribute. hidden_states (the sub-block output h) and residual_input
    (the block input x), both (..., d) -> (..., d).

    When the active setup is that one parallel adapter, its output is added to h inside the kernel,
    ``h + s * f(x)`` in one pass, followed by the layer's own residual and norm as AdapterHub's
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
    output = fused_adapter(residual_input, *_parameters(adapter), adapter.__dict__[_ACTIVATION],
                           float(adapter.scaling), residual=hidden_states)
    if adapter.original_ln_after:
        output = layer_norm(output + residual_input) if layer_norm else output + residual_input
    return output


def accelerate(model: nn.Module) -> AccelerateReport:
    """Make every AdapterHub bottleneck adapter of ``model`` whose configuration the fused kernel
    covers run it, in place, with the same parameters (names and tensors unchanged), outputs and
    gradients. Adapters it cannot cover (layer norms inside the adapter, gating, PHM, learned
    scaling, dropout, other activations) keep their own forward and are listed in one warning.
    Calling it again converts adapters added since. Raises ImportError without ``adapters``.

    A converted adapter reads its weights, scaling and activation from itself at every call, so a
    ``copy.deepcopy`` of an accelerated model computes with the copy's weights and follows the copy's
    ``.to()``. A layer whose whole active setup is one parallel adapter adds that adapter's output to
    the sub-block output inside the kernel."""
    try:
        from adapters.methods.bottleneck import BottleneckLayer
        from adapters.methods.modeling import Adapter, ParallelAdapter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("adapter_fused.accelerate needs the AdapterHub package: pip install adapters") from exc

    converted, skipped = [], []
    for layer_path, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or not hasattr(layer, "adapters"):
            continue
        fusion_layers = getattr(layer, "adapter_fusion_layer", nn.ModuleDict())
        for name, adapter in layer.adapters.items():
            path = f"{layer_path}.adapters.{name}" if layer_path else f"adapters.{name}"
            if not isinstance(adapter, Adapter) or _ACTIVATION in adapter.__dict__:
                continue
            reasons, activation = _uncovered(adapter)
            if reasons:
                skipped.append((path, ", ".join(reasons)))
                continue
            assert activation is not None
            parallel = isinstance(adapter, ParallelAdapter)
            adapter.__dict__.update({_ACTIVATION: activation, _PARALLEL: parallel, _FUSION: fusion_layers})
            adapter.forward = types.MethodType(_fused_adapter_forward, adapter)
            if parallel and "bottleneck_layer_forward" not in layer.__dict__:
                layer.bottleneck_layer_forward = types.MethodType(_fused_layer_forward, layer)
            converted.append(path)
    if skipped:
        listing = "; ".join(f"{path} ({why})" for path, why in skipped)
        warnings.warn(f"adapter_fused.accelerate left {len(skipped)} adapter(s) on their own forward: {listing}",
                      stacklevel=2)
    return AccelerateReport(tuple(converted), tuple(skipped))
