"""Bridge to AdapterHub (the ``adapters`` package): its bottleneck configs, its saved weights, and
``accelerate``, which makes the bottleneck adapters of a model built with ``adapters`` run the fused
kernel.

AdapterHub's sequential bottleneck adapter maps an input ``z`` and a residual ``r`` (both (..., d)) to
``r + s * up(act(down(z)))``: the fused kernel takes ``r`` as its residual, in the same pass. Its parallel
adapter returns ``s * up(act(down(z)))`` (the kernel's output less ``z``).
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
    ("ln_before", False, "a layer norm inside the adapter before the bottleneck (ln_before)"),
    ("ln_after", False, "a layer norm inside the adapter after the bottleneck (ln_after)"),
    ("use_gating", False, "gating"),
    ("original_ln_after", True, "original_ln_after=False (the layer's own residual and norm skipped)"),
    ("cross_adapter", False, "cross-attention adapters"),
    ("inv_adapter", None, "invertible adapters"),
)


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
    if isinstance(scaling, str) or isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        problems.append(f"scaling={scaling!r} (learned scaling)")
    if data.get("dropout") or 0.0:
        problems.append(f"dropout={data['dropout']} inside the adapter")
    if data.get("stochastic_depth") or 0.0:
        problems.append(f"stochastic_depth={data['stochastic_depth']}")
    if data.get("leave_out"):
        problems.append(f"leave_out={data['leave_out']} (adapters on only some layers)")
    reduction = data.get("reduction_factor", 16)
    if isinstance(reduction, Mapping):
        if set(reduction) == {"default"}:
            reduction = reduction["default"]
        else:
            problems.append(f"reduction_factor per layer {dict(reduction)}")
            reduction = 16
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
    placement = Placement(
        attention=bool(data.get("mh_adapter")),
        ffn=bool(data.get("output_adapter")),
        original_ln_before=bool(data.get("original_ln_before", False)),
        residual_before_ln=data.get("residual_before_ln", True),
        parallel=bool(data.get("is_parallel", False)),
    )
    if placement.parallel:
        placement = Placement(placement.attention, placement.ffn, parallel=True)
    named = next((name for name, preset in PLACEMENTS.items() if preset == placement), None)
    return AdapterConfig(placement=named or placement, reduction_factor=reduction, activation=activation,
                         scale=float(scaling), init=init)


_KEY = re.compile(r"^(?:.*\.)?(\d+)\.(.+)\.adapters\.([^.]+)\.(adapter_down\.0|adapter_up)\.(weight|bias)$")


def weights_from_adapterhub(state: Mapping[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """AdapterHub weight keys (``...<layer>.<location>.adapters.<name>.adapter_down.0.weight``) ->
    the saved adapter name and ``{"<layer>.<site>.down.weight": tensor, ...}``. Raises ValueError
    naming ``source`` for keys that are not plain bottleneck weights or that mix adapter names."""
    out: dict[str, torch.Tensor] = {}
    names = set()
    unexpected = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None or "cross" in match.group(2):
            unexpected.append(key)
            continue
        layer, location, name, part, kind = match.groups()
        site = "attention" if "attention" in location else "ffn"
        names.add(name)
        out[f"{layer}.{site}.{'down' if part.startswith('adapter_down') else 'up'}.{kind}"] = tensor
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


def _fused_forward(adapter: nn.Module, activation: str, parallel: bool, fusion_layers: nn.ModuleDict,
                   original: Any) -> Any:
    linear_down: nn.Linear = adapter.adapter_down[0]  # type: ignore[index]
    linear_up: nn.Linear = adapter.adapter_up  # type: ignore[assignment]
    scale = float(adapter.scaling)  # type: ignore[arg-type]

    def forward(self: nn.Module, x: torch.Tensor, residual_input: torch.Tensor | None, output_gating: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x, residual_input (..., d) -> (output (..., d), None, None); AdapterFusion runs the original."""
        if len(fusion_layers) > 0:
            return original(x, residual_input, output_gating)
        params = (linear_down.weight, linear_down.bias, linear_up.weight, linear_up.bias)
        if parallel:
            return fused_adapter(x, *params, activation, scale) - x, None, None
        residual = None if residual_input is None or residual_input is x else residual_input
        return fused_adapter(x, *params, activation, scale, residual=residual), None, None

    return types.MethodType(forward, adapter)


def accelerate(model: nn.Module) -> AccelerateReport:
    """Make every AdapterHub bottleneck adapter of ``model`` whose configuration the fused kernel
    covers run it, in place, with the same parameters (names and tensors unchanged), outputs and
    gradients. Adapters it cannot cover (layer norms inside the adapter, gating, PHM, learned
    scaling, dropout, other activations) keep their own forward and are listed in one warning.
    Calling it again converts adapters added since. Raises ImportError without ``adapters``."""
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
            if not isinstance(adapter, Adapter) or adapter.__dict__.get("_adapter_fused_original") is not None:
                continue
            reasons, activation = _uncovered(adapter)
            if reasons:
                skipped.append((path, ", ".join(reasons)))
                continue
            assert activation is not None
            original = adapter.forward
            adapter.forward = _fused_forward(adapter, activation, isinstance(adapter, ParallelAdapter),
                                             fusion_layers, original)
            adapter.__dict__["_adapter_fused_original"] = original
            converted.append(path)
    if skipped:
        listing = "; ".join(f"{path} ({why})" for path, why in skipped)
        warnings.warn(f"adapter_fused.accelerate left {len(skipped)} adapter(s) on their own forward: {listing}",
                      stacklevel=2)
    return AccelerateReport(tuple(converted), tuple(skipped))
