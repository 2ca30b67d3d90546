"""Adapter configurations: where adapters sit in a transformer layer and how big they are.

Two presets follow the bottleneck configurations of AdapterHub:

- ``"houlsby"`` (alias ``"double_seq_bn"``): two adapters per layer, one after the attention output and one
  after the feed-forward block, swish activation, reduction factor 16.
- ``"pfeiffer"`` (alias ``"seq_bn"``): one adapter per layer after the feed-forward block, fed with the
  layer-normed sum of the block output and its residual, relu activation, reduction factor 16.

The bottleneck width of every adapter is ``hidden_size // reduction_factor`` unless given explicitly;
``reduction_factor`` may also be given per layer, and ``leave_out`` lists layers without adapters.
The remaining options of AdapterHub's bottleneck configs (layer norms inside the adapter, learned
scaling, gating, dropout, ``original_ln_after``) carry AdapterHub's names and defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..activations import canonical_activation

SITES = ("attention", "cross", "ffn")
"""Adapter sites of a transformer layer, in the order they run; ``"cross"`` (after cross-attention) only
in decoder layers of encoder-decoder models."""

INITS = ("bert", "houlsby", "mam")
LEARNED_SCALINGS = ("learned", "channel")
"""``scale`` values that make the scale a trainable parameter: one scalar, or one value per channel (d,)."""

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

    ``original_ln_after=False`` skips the layer's own ``LN(... + x)`` (or ``... + x``) after the
    adapter: the site's output is ``residual + s * f(z)`` itself.

    A site that its layout marks ``swapped`` (``SiteSpec.swapped``: ALBERT's attention site, as in
    AdapterHub) exchanges ``h`` and ``x`` in all of the above.

    These are the semantics of AdapterHub's ``original_ln_before``, ``original_ln_after``,
    ``residual_before_ln`` and ``is_parallel`` options.
    """

    attention: bool
    ffn: bool
    original_ln_before: bool = False
    residual_before_ln: ResidualBeforeLN = True
    parallel: bool = False
    original_ln_after: bool = True

    def __post_init__(self) -> None:
        if not (self.attention or self.ffn):
            raise ValueError("Placement: at least one of attention, ffn must be True")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"Placement: residual_before_ln must be True, False or 'post_add', "
                             f"got {self.residual_before_ln!r}")

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites holding an adapter in every layer (``"attention"``, ``"ffn"``), in layer order; the
        cross-attention site follows ``AdapterConfig.cross_adapter`` or the model's layout."""
        return tuple(site for site in ("attention", "ffn") if getattr(self, site))


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
    scale: s in ``y = x + s * up(act(down(x)))`` (AdapterHub's ``scaling``): a number, ``"learned"``
        (a trainable scalar, initialised to 1) or ``"channel"`` (a trainable vector (d,), initialised
        to ones).
    init: ``"bert"``, ``"houlsby"`` or ``"mam"`` (see ``FusedAdapter``).
    reduction_factor: also a mapping ``{"default": x, "<layer>": y}`` (per-layer widths; a layer
        not named takes ``"default"``, which is then required unless every layer is named).
    leave_out: layer indices (from 0) that get no adapter.
    ln_before / ln_after: a LayerNorm inside the adapter on its input / on its output.
    adapter_residual_before_ln: with ``ln_after``, add the residual before that LayerNorm
        (``LN(residual + s * f)``) instead of after it (``residual + LN(s * f)``); not for parallel.
    use_gating: a trainable gate ``g = mean over positions of sigmoid(z * w_g + b_g)`` per sample
        (z: (batch, seq, d) the adapter input) multiplying the adapter's term.
    dropout: dropout probability on the adapter's term ``s * f(z)`` in training mode.
    inv_adapter: ``"nice"`` adds a MAD-X invertible adapter (a NICE coupling block) on the embedding
        output and its inverse before the output embeddings (see ``modules.NiceCoupling``), with bottleneck
        MLPs of width ``half of d // inv_adapter_reduction_factor``. AdapterHub's ``"glow"`` is refused
        (AdapterHub's GLOW block fails on (batch, seq, d) inputs).
    cross_adapter: also an adapter after the cross-attention block of every decoder layer of an
        encoder-decoder model (BART, mBART, PLBart, Whisper, T5, mT5), placed like the others. Layers whose
        cross-attention site follows the attention site (BERT-style decoders in an ``encoder-decoder``
        model, as AdapterHub places them) get one there whenever the placement has ``attention``.

    Options beyond placement, width, activation, a constant scale and init run partly outside the
    fused kernel (see ``unfused_options``); a learned scale is folded into the up-projection and
    stays in the one launch.
    """

    placement: str | Placement
    bottleneck: int | None = None
    reduction_factor: float | Mapping[str, float] = 16
    activation: str | None = None
    scale: float | str = 1.0
    init: str = "bert"
    leave_out: tuple[int, ...] = ()
    ln_before: bool = False
    ln_after: bool = False
    adapter_residual_before_ln: bool = False
    use_gating: bool = False
    dropout: float = 0.0
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False

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
        if isinstance(rf, Mapping):
            per_layer = {}
            for key, value in rf.items():
                key = str(key)
                if key != "default" and not key.isdigit():
                    raise ValueError(f"AdapterConfig: reduction_factor keys must be 'default' or layer indices, "
                                     f"got {key!r}")
                per_layer[key] = _positive(value, f"reduction_factor[{key!r}]")
            if not per_layer:
                raise ValueError("AdapterConfig: reduction_factor mapping is empty; give at least 'default'")
            object.__setattr__(self, "reduction_factor", per_layer)
        else:
            _positive(rf, "reduction_factor")
        if self.activation is not None:
            object.__setattr__(self, "activation", canonical_activation(self.activation, "AdapterConfig.activation"))
        scale = self.scale
        if isinstance(scale, str):
            if scale not in LEARNED_SCALINGS:
                raise ValueError(f"AdapterConfig: scale must be a finite number, 'learned' or 'channel', got {scale!r}")
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"AdapterConfig: scale must be a finite number, 'learned' or 'channel', got {scale!r}")
        if self.init not in INITS:
            raise ValueError(f"AdapterConfig: init must be one of {', '.join(INITS)}, got {self.init!r}")
        leave_out = self.leave_out
        if isinstance(leave_out, (str, bytes)) or not isinstance(leave_out, (list, tuple, set, frozenset)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in leave_out):
            raise ValueError(f"AdapterConfig: leave_out must be a list of layer indices (ints >= 0), got {leave_out!r}")
        object.__setattr__(self, "leave_out", tuple(sorted(set(leave_out))))
        for flag in ("ln_before", "ln_after", "adapter_residual_before_ln", "use_gating", "cross_adapter"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"AdapterConfig: {flag} must be True or False, got {getattr(self, flag)!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"AdapterConfig: dropout must be a probability in [0, 1), got {p!r}")
        if self.inv_adapter is not None:
            if self.inv_adapter == "glow":
                raise ValueError("AdapterConfig: inv_adapter 'glow' is not supported (AdapterHub's GLOW coupling block "
                                 "fails on (batch, seq, d) hidden states); use 'nice'")
            if self.inv_adapter != "nice":
                raise ValueError(f"AdapterConfig: inv_adapter must be None or 'nice', got {self.inv_adapter!r}")
            _positive(self.inv_adapter_reduction_factor, "inv_adapter_reduction_factor")
        if self.adapter_residual_before_ln and self.layout.parallel:
            raise ValueError("AdapterConfig: adapter_residual_before_ln does not apply to a parallel adapter (its "
                             "residual is the sub-block output, added after ln_after)")

    def __hash__(self) -> int:  # a per-layer reduction_factor is a dict: hash the serialised form
        return hash(json.dumps(self.to_dict(), sort_keys=True))

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

    def bottleneck_for(self, hidden_size: int, layer: int | None = None) -> int:
        """The adapter width r of ``layer`` (None: the default width) for a model of width
        ``hidden_size``: ``hidden_size // reduction_factor``, at least 1. ValueError when a per-layer
        ``reduction_factor`` names neither the layer nor a default."""
        if self.bottleneck is not None:
            return self.bottleneck
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            key = str(layer) if layer is not None and str(layer) in rf else "default"
            if key not in rf:
                raise ValueError(f"AdapterConfig: reduction_factor {rf} gives no value for layer {layer} and no "
                                 f"'default'")
            rf = rf[key]
        return max(1, int(hidden_size // rf))

    @property
    def learned_scale(self) -> bool:
        """Whether the scale is a trainable parameter (``"learned"`` or ``"channel"``)."""
        return isinstance(self.scale, str)

    @property
    def unfused_options(self) -> tuple[str, ...]:
        """The options computed outside the fused kernel (around it: the bottleneck itself always
        runs fused); ``"dropout"`` applies in training mode only. Empty: the whole adapter is one launch."""
        out = [flag for flag in ("ln_before", "ln_after", "use_gating") if getattr(self, flag)]
        if self.dropout > 0:
            out.append("dropout")
        return tuple(out)

    @property
    def plain(self) -> bool:
        """Whether every site is a plain ``FusedAdapter`` (no option needing extra parameters or steps)."""
        return not (self.unfused_options or self.learned_scale or self.inv_adapter)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``AdapterConfig.from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        if isinstance(self.placement, Placement):
            out["placement"] = dataclasses.asdict(self.placement)
        out["leave_out"] = list(self.leave_out)
        if isinstance(self.reduction_factor, Mapping):
            out["reduction_factor"] = dict(self.reduction_factor)
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


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"AdapterConfig: {what} must be a positive number, got {value!r}")
    return value


def resolve_config(config: str | AdapterConfig) -> AdapterConfig:
    """``"houlsby"``, ``"pfeiffer"`` (or their aliases) or an AdapterConfig -> AdapterConfig."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        return AdapterConfig(placement=config)
    raise TypeError(f"config must be a preset name or an AdapterConfig, got {type(config).__name__}")
