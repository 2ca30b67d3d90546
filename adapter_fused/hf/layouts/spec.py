"""The site spec (``SiteSpec``), a stack of layers and its sites (``ModelLayout``), a family of models
sharing one layout (``Architecture``), one layer of a model (``ModelLayer``), and the helpers that read
module paths and call arguments. See ``adapter_fused.hf.layouts`` for what a site is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn


def _check_path(value: object, what: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise ValueError(f"{what} must be a dotted module path such as 'self_attn' or 'attention.output'"
                         f"{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class SiteSpec:
    """Module paths (relative to a layer) that locate one adapter site; see the module docstring.

    output: the module whose output (a (..., d) tensor, or a tuple whose first item is one) is the
        sub-block output ``h``; the adapter rewrites it.
    residual: the module that receives the block residual ``x`` ((..., d)) before ``output`` runs,
        or None where the layer adds no residual at this site.
    residual_position, residual_keywords: where ``x`` is among that module's arguments: its
        position, or the keyword names it may be passed under.
    norm: the layer norm of ``LN(h + x)``, or None (pre-LN layers).
    residual_plus: a module whose output (after the hooks of earlier sites) is added to ``x``: the
        block residual of GPT-J's feed-forward site is the block input plus the attention output.
    hub_location: where AdapterHub keeps this site's adapters, relative to the layer (for example
        ``"attention.output"`` or ``"output_adapters"``); used to map AdapterHub weight names to sites.
    output_call: which call of ``output`` within one call of the layer gives this site's ``h`` (0: the
        first), for a module the layer runs once per sub-block: BEiT passes both sub-block outputs
        through one ``drop_path``.
    swapped: the adapter takes the block residual ``x`` where other sites take ``h``, and ``h`` where
        they take ``x``: the site computes its placement on ``(x, h)`` and the layer's norm then gets
        the result plus ``h``. AdapterHub's ALBERT attention adapter is called this way (houlsby:
        ``LN(h + x + f(x))``), and so is this library's, to reproduce it.
    output_alternatives: modules that take ``output``'s place in layers that lack it: the token mixers of
        a hybrid model's other layers (``linear_attn`` beside ``self_attn``). Each layer's site has the
        first of ``output`` and these that the layer has (``in_layer``).
    """

    output: str
    residual: str | None
    residual_position: int = 0
    residual_keywords: tuple[str, ...] = ("hidden_states",)
    norm: str | None = None
    residual_plus: str | None = None
    hub_location: str | None = None
    output_call: int = 0
    swapped: bool = False
    output_alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_path(self.output, "SiteSpec.output")
        alternatives = self.output_alternatives
        alternatives = (alternatives,) if isinstance(alternatives, str) else alternatives
        if not isinstance(alternatives, (tuple, list)):
            raise TypeError(f"SiteSpec.output_alternatives must be a module path or a tuple of them, got {alternatives!r}")
        for path in alternatives:
            _check_path(path, "SiteSpec.output_alternatives")
        if len({self.output, *alternatives}) != 1 + len(alternatives):
            raise ValueError(f"SiteSpec.output_alternatives must name other modules than output, each once, got "
                             f"{self.output!r} and {tuple(alternatives)!r}")
        object.__setattr__(self, "output_alternatives", tuple(alternatives))
        _check_path(self.residual, "SiteSpec.residual", optional=True)
        _check_path(self.norm, "SiteSpec.norm", optional=True)
        _check_path(self.residual_plus, "SiteSpec.residual_plus", optional=True)
        _check_path(self.hub_location, "SiteSpec.hub_location", optional=True)
        for field in ("residual_position", "output_call"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SiteSpec.{field} must be a non-negative int, got {value!r}")
        keywords = self.residual_keywords
        if isinstance(keywords, str):
            object.__setattr__(self, "residual_keywords", (keywords,))
        elif not isinstance(keywords, (tuple, list)) or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"SiteSpec.residual_keywords must be a keyword name or a tuple of them, got {keywords!r}")
        else:
            object.__setattr__(self, "residual_keywords", tuple(keywords))
        if self.residual is None and (self.norm is not None or self.residual_plus is not None):
            raise ValueError("SiteSpec: a site without a residual module can have neither norm nor residual_plus")
        if not isinstance(self.swapped, bool):
            raise TypeError(f"SiteSpec.swapped must be True or False, got {self.swapped!r}")
        if self.swapped and self.residual is None:
            raise ValueError("SiteSpec: a swapped site needs a residual module, whose input the adapter reads")

    @property
    def paths(self) -> tuple[str, ...]:
        """Every module path the site hooks or reads (``output``, not its alternatives: see ``in_layer``)."""
        return tuple(p for p in (self.output, self.residual, self.norm, self.residual_plus) if p)

    def in_layer(self, layer: nn.Module) -> SiteSpec:
        """The site in ``layer``: ``output`` is the first of ``output`` and ``output_alternatives`` that
        ``layer`` has (``output`` where it has none), and no alternatives are left."""
        if not self.output_alternatives:
            return self
        found = (p for p in (self.output, *self.output_alternatives) if isinstance(get_submodule(layer, p), nn.Module))
        return replace(self, output=next(found, self.output), output_alternatives=())


def _in_order(attention: SiteSpec, cross: SiteSpec | None, ffn: SiteSpec) -> dict[str, SiteSpec]:
    """Sites by name in the order they run, without an absent cross-attention site."""
    return {"attention": attention, **({"cross": cross} if cross is not None else {}), "ffn": ffn}


@dataclass(frozen=True)
class ModelLayout:
    """One stack of transformer layers and its adapter sites.

    layers: the path, from the base model (``model.base_model``), of the ``nn.ModuleList`` of layers,
        or a tuple of candidate paths (the first present one is used). A ``*`` part stands for every
        child of a list: ``"encoder.albert_layer_groups.*.albert_layers"``.
    attention, ffn: the sites after the attention block and after the feed-forward block.
    hidden_size: the config attribute holding this stack's width d (``"vision_config.hidden_size"``);
        None: the model's ``hidden_size`` (or ``n_embd``, ``dim``, ``d_model``).
    cross: the site after the cross-attention block of decoder layers, or None; a layer lacking the
        site's ``output`` module has no cross site (the other modules of a layer that has it are checked).
    cross_with_attention: the cross site holds an adapter wherever the attention site does (AdapterHub's
        placement in BERT-style decoders) instead of when ``AdapterConfig.cross_adapter`` asks for one.
    """

    layers: str | tuple[str, ...]
    attention: SiteSpec
    ffn: SiteSpec
    hidden_size: str | None = None
    cross: SiteSpec | None = None
    cross_with_attention: bool = False

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, str) else self.layers
        if not isinstance(layers, (tuple, list)) or not layers:
            raise ValueError(f"ModelLayout.layers must be a module path or a tuple of them, got {self.layers!r}")
        for path in layers:
            _check_path(path, "ModelLayout.layers")
        object.__setattr__(self, "layers", tuple(layers))
        for name in ("attention", "ffn"):
            if not isinstance(getattr(self, name), SiteSpec):
                raise TypeError(f"ModelLayout.{name} must be a SiteSpec, got {type(getattr(self, name)).__name__}")
        if self.cross is not None and not isinstance(self.cross, SiteSpec):
            raise TypeError(f"ModelLayout.cross must be a SiteSpec or None, got {type(self.cross).__name__}")
        if not isinstance(self.cross_with_attention, bool):
            raise TypeError(f"ModelLayout.cross_with_attention must be True or False, got {self.cross_with_attention!r}")
        if self.cross_with_attention and self.cross is None:
            raise ValueError("ModelLayout: cross_with_attention needs a cross site")
        _check_path(self.hidden_size, "ModelLayout.hidden_size", optional=True)

    @property
    def sites(self) -> dict[str, SiteSpec]:
        """The stack's sites by name (``config.SITES``), in the order they run (``cross`` where given)."""
        return _in_order(self.attention, self.cross, self.ffn)


@dataclass(frozen=True)
class Architecture:
    """A family of transformers models sharing one layer layout.

    ``layers``, ``attention``, ``ffn`` and ``hidden_size`` describe the first layer stack,
    ``more_stacks`` the others (a decoder, a second tower). ``submodels`` instead names child models
    (``"encoder"``, ``"decoder"`` of an ``EncoderDecoderModel``) whose own architectures give the stacks.
    ``hub_layers`` is the path under which AdapterHub (on transformers 4) names the layers of a model
    type whose layer list transformers has since moved (ViT's ``encoder.layer``, now ``layers``). A model
    type may have several entries, one per transformers layout or config variant: the first whose layers
    exist and have every site module is used.
    ``cross`` and ``cross_with_attention`` are the first stack's (see ``ModelLayout``).
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths, from the base model, of the ModuleList of layers
    attention: SiteSpec
    ffn: SiteSpec
    more_stacks: tuple[ModelLayout, ...] = ()
    hidden_size: str | None = None
    submodels: tuple[str, ...] = ()
    hub_layers: str | None = None  # AdapterHub's path of the layer list, where it differs from ``layers``
    cross: SiteSpec | None = None
    cross_with_attention: bool = False

    @property
    def stacks(self) -> tuple[ModelLayout, ...]:
        """Every layer stack, in layer-numbering order."""
        return (ModelLayout(self.layers, self.attention, self.ffn, self.hidden_size, self.cross,
                            self.cross_with_attention), *self.more_stacks)

    @classmethod
    def from_layouts(cls, name: str, model_types: tuple[str, ...], layouts: Sequence[ModelLayout]) -> Architecture:
        """An Architecture whose stacks are ``layouts``, in order."""
        first, *rest = layouts
        return cls(name, model_types, first.layers, first.attention, first.ffn,  # type: ignore[arg-type]
                   tuple(rest), first.hidden_size, cross=first.cross, cross_with_attention=first.cross_with_attention)


@dataclass(frozen=True)
class ModelLayer:
    """One layer of a model: its number (across stacks), its path from the base model, the module and
    its sites (``cross`` None where the layer has no cross-attention site), and its width d (None where
    the config does not say)."""

    index: int
    path: str
    module: nn.Module
    attention: SiteSpec
    ffn: SiteSpec
    hidden_size: int | None
    cross: SiteSpec | None = None
    cross_with_attention: bool = False

    @property
    def sites(self) -> dict[str, SiteSpec]:
        """The layer's sites by name (``config.SITES``), in the order they run."""
        return _in_order(self.attention, self.cross, self.ffn)

    def site(self, name: str) -> SiteSpec:
        """The SiteSpec of ``"attention"``, ``"cross"`` or ``"ffn"``; KeyError for a site the layer lacks."""
        sites = self.sites
        if name not in sites:
            raise KeyError(f"adapter_fused: the layer at {self.path} has no {name!r} site")
        return sites[name]



def get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module.<path>`` or None where any part is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def missing_modules(layer: nn.Module, *sites: SiteSpec) -> list[str]:
    """The paths ``sites`` hook or read in ``layer`` (``SiteSpec.in_layer``) that ``layer`` lacks, sorted."""
    return sorted({p for site in sites for p in site.in_layer(layer).paths
                   if not isinstance(get_submodule(layer, p), nn.Module)})


def call_argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, keywords: tuple[str, ...]) -> Any:
    """The argument of a module call at ``position``, else under the first of ``keywords`` passed; None if neither."""
    if len(args) > position:
        return args[position]
    return next((kwargs[k] for k in keywords if k in kwargs), None)


def _expand(base: nn.Module, path: str) -> list[tuple[str, nn.ModuleList]]:
    """The non-empty ModuleLists at ``path`` (a ``*`` part: every child), with their resolved paths."""
    found: list[tuple[str, nn.Module]] = [("", base)]
    for part in path.split("."):
        step: list[tuple[str, nn.Module]] = []
        for prefix, module in found:
            if part == "*":
                children = list(module.named_children()) if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else []
            else:
                child = getattr(module, part, None)
                children = [(part, child)] if isinstance(child, nn.Module) else []
            step.extend((f"{prefix}.{name}" if prefix else name, child) for name, child in children)
        found = step
    return [(p, m) for p, m in found if isinstance(m, nn.ModuleList) and len(m) > 0]


def find_layers(base: nn.Module, paths: tuple[str, ...]) -> list[tuple[str, nn.ModuleList]]:
    """The layer lists of the first of ``paths`` present in ``base``, with their paths; [] if none is."""
    for path in paths:
        lists = _expand(base, path)
        if lists:
            return lists
    return []


def config_width(config: object, path: str | None) -> int | None:
    """The width at config attribute ``path``, else the config's own hidden size; None if neither is an int."""
    if path is not None:
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for key in ("hidden_size", "n_embd", "dim", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def base_model(model: nn.Module) -> nn.Module:
    """``model.base_model`` where that is a module (a transformers task model's body), else ``model``."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model
