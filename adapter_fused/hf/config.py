"""Adapter configurations: where adapters sit in a transformer layer and how big they are.

Two presets follow the bottleneck configurations of AdapterHub:

- ``"houlsby"`` (alias ``"double_seq_bn"``): two adapters per layer, one after the attention output and one
  after the feed-forward block, swish activation, reduction factor 16.
- ``"pfeiffer"`` (alias ``"seq_bn"``): one adapter per layer after the feed-forward block, fed with the
  layer-normed sum of the block output and its residual, relu activation, reduction factor 16.

The bottleneck width of every adapter is ``hidden_size // reduction_factor`` unless given explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..activations import canonical_activation

SITES = ("attention", "ffn")
"""Adapter sites of a transformer layer, in the order they run."""

INITS = ("bert", "houlsby", "mam")

ResidualBeforeLN = bool | Literal["post_add"]


@dataclass(frozen=True)
class Placement:
    """Where the adapters of one layer sit and what they read.

    At each site a transformer layer normally combines its sub-block output ``h`` (attention or
    feed-forward, shape (..., d)) with the block residual ``x`` as ``LN(h + x)`` (post-LN models) or
    ``h + x`` (pre-LN models, no ``LN``). With an adapter ``f`` the site computes instead
    ``LN(residual + s * f(z) + x)``, where the adapter input ``z`` and its residual are:

    - ``original_ln_before=False``: ``z = h``; residual ``h``.
    - ``original_ln_before=True``: ``z = LN(h + x)`` (``h + x`` without ``LN``); residual ``h`` when
      ``residual_before_ln`` is True, ``z`` when False, ``h + x`` when ``"post_add"``.
    - ``parallel=True``: ``z = x`` and residual ``h`` (the adapter runs beside the sub-block).

    These are the semantics of AdapterHub's ``original_ln_before``, ``residual_before_ln`` and
    ``is_parallel`` options with ``original_ln_after=True``.
    """

    attention: bool
    ffn: bool
    original_ln_before: bool = False
    residual_before_ln: ResidualBeforeLN = True
    parallel: bool = False

    def __post_init__(self) -> None:
        if not (self.attention or self.ffn):
            raise ValueError("Placement: at least one of attention, ffn must be True")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"Placement: residual_before_ln must be True, False or 'post_add', "
                             f"got {self.residual_before_ln!r}")

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites holding an adapter, in layer order."""
        return tuple(site for site in SITES if getattr(self, site))


HOULSBY = Placement(attention=True, ffn=True, original_ln_before=False, residual_before_ln=True)
PFEIFFER = Placement(attention=False, ffn=True, original_ln_before=True, residual_before_ln=True)
PARALLEL = Placement(attention=False, ffn=True, parallel=True)

PLACEMENTS: dict[str, Placement] = {"houlsby": HOULSBY, "pfeiffer": PFEIFFER, "parallel": PARALLEL}
PLACEMENT_ALIASES: dict[str, str] = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}
DEFAULT_ACTIVATION: dict[str, str] = {"houlsby": "swish", "pfeiffer": "relu", "parallel": "relu"}


@dataclass(frozen=True)
class AdapterConfig:
    """The configuration of one named adapter (one bottleneck adapter per site and layer).

    placement: ``"houlsby"`` / ``"double_seq_bn"``, ``"pfeiffer"`` / ``"seq_bn"``, ``"parallel"`` /
        ``"par_bn"``, or a :class:`Placement`.
    bottleneck: width r of every adapter; ``None`` means ``hidden_size // reduction_factor``.
    reduction_factor: used when ``bottleneck`` is None.
    activation: any name in ``adapter_fused.ACTIVATIONS``; ``None`` means the placement's default
        (swish for Houlsby, relu otherwise).
    scale: s in ``y = x + s * up(act(down(x)))``.
    init: ``"bert"``, ``"houlsby"`` or ``"mam"`` (see ``FusedAdapter``).
    """

    placement: str | Placement
    bottleneck: int | None = None
    reduction_factor: float = 16
    activation: str | None = None
    scale: float = 1.0
    init: str = "bert"

    def __post_init__(self) -> None:
        placement = self.placement
        if isinstance(placement, str):
            key = PLACEMENT_ALIASES.get(placement.lower(), placement.lower())
            if key not in PLACEMENTS:
                names = sorted([*PLACEMENTS, *PLACEMENT_ALIASES])
                raise ValueError(f"AdapterConfig: unknown placement {placement!r}; expected one of "
                                 f"{', '.join(names)} or a Placement")
            object.__setattr__(self, "placement", key)
        elif not isinstance(placement, Placement):
            raise TypeError(f"AdapterConfig: placement must be a name or a Placement, got {type(placement).__name__}")
        if self.bottleneck is not None and (isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int)
                                            or self.bottleneck < 1):
            raise ValueError(f"AdapterConfig: bottleneck must be a positive int or None, got {self.bottleneck!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not math.isfinite(rf) or rf <= 0:
            raise ValueError(f"AdapterConfig: reduction_factor must be a positive number, got {rf!r}")
        if self.activation is not None:
            object.__setattr__(self, "activation", canonical_activation(self.activation, "AdapterConfig.activation"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"AdapterConfig: scale must be a finite number, got {self.scale!r}")
        if self.init not in INITS:
            raise ValueError(f"AdapterConfig: init must be one of {', '.join(INITS)}, got {self.init!r}")

    @property
    def layout(self) -> Placement:
        """The resolved :class:`Placement`."""
        return PLACEMENTS[self.placement] if isinstance(self.placement, str) else self.placement

    @property
    def resolved_activation(self) -> str:
        """The canonical activation name, the placement's default when ``activation`` is None."""
        if self.activation is not None:
            return self.activation
        default = DEFAULT_ACTIVATION.get(self.placement, "relu") if isinstance(self.placement, str) else "relu"
        return canonical_activation(default)

    def bottleneck_for(self, hidden_size: int) -> int:
        """The adapter width r for a model of width ``hidden_size`` (at least 1)."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(hidden_size // self.reduction_factor))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``AdapterConfig.from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        if isinstance(self.placement, Placement):
            out["placement"] = dataclasses.asdict(self.placement)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown keys {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("placement"), dict):
            values["placement"] = Placement(**values["placement"])
        return cls(**values)


def resolve_config(config: str | AdapterConfig) -> AdapterConfig:
    """``"houlsby"``, ``"pfeiffer"`` (or their aliases) or an AdapterConfig -> AdapterConfig."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        return AdapterConfig(placement=config)
    raise TypeError(f"config must be a preset name or an AdapterConfig, got {type(config).__name__}")
