"""Where the adapter sites are in each supported transformers architecture.

Every supported layer has two sites, after the attention block and after the feed-forward block;
decoder layers of encoder-decoder models have a third, after the cross-attention block.
At a site the layer combines the sub-block output ``h`` with the block residual ``x``, either as
``LN(h + x)`` (post-LN: BERT, BART, DeBERTa) or as ``h + x`` (pre-LN: GPT-2, Llama, T5, CLIP, Whisper).
A site is described by module paths relative to the layer (``SiteSpec``):

- ``output``: the module whose output is ``h`` (a tensor, or a tuple whose first item is ``h``);
- ``residual``: a module that receives ``x`` as an argument before ``output`` runs, with the
  argument's position and the keyword names it may be passed under; None where the layer adds no
  residual at that site (Phi's feed-forward block, which runs beside the attention block);
- ``norm``: the layer norm of ``LN(h + x)``, or None for pre-LN layers. For the models AdapterHub
  hooks through its model interface (Gemma 2 and 3, ModernBERT) it is the norm AdapterHub gives that
  site, so the same placements compute the same numbers.
- ``swapped``: the adapter reads ``x`` and takes ``h`` as its residual (ALBERT's attention site, where
  AdapterHub calls its adapter that way round).

The adapters hook these modules; no base module is replaced and no parameter renamed.

A model may have several layer stacks (``ModelLayout``, one per stack): an encoder and a decoder
(BART, T5, Whisper), or CLIP's text and vision towers. Layers are numbered across the stacks in
order, as AdapterHub numbers them (encoder layers first, then decoder layers), and each stack has
its own sites (a T5 decoder block has its feed-forward block at ``layer.2``, after cross-attention).
A stack's ``cross`` site (after cross-attention) exists in the layers that have its output module:
every decoder layer of BART or T5, the BERT layers built with ``add_cross_attention``. It holds an
adapter when the config asks for one (``AdapterConfig.cross_adapter``, AdapterHub's option of that
name) or, where the layout says ``cross_with_attention`` (BERT-style decoders, whose cross-attention
block ends in the same module class as their self-attention block), wherever the attention site does,
as AdapterHub places them.

Models are recognized in three ways, in this order. A layout registered with
``register_model_layout`` for the model's class or type. A model type listed in ``ARCHITECTURES``.
Any other model by the structure of its layers (``adapter_fused.hf.structure``): the first candidate
layout whose modules the first layer has and whose sums a forward pass on a dummy batch confirms
(pre-norm, parallel-block, sandwich-norm and post-norm layers under several naming schemes, and
BART-style encoder-decoder models). At run time, a site whose placement needs the residual ``x`` and
whose residual module did not run before its output module in the same call raises RuntimeError rather
than compute wrong numbers. Dropout applied by the layer to a sub-block output (Phi-3, StableLM, BART)
acts on the adapted output, which changes nothing in evaluation mode.
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

    def __post_init__(self) -> None:
        _check_path(self.output, "SiteSpec.output")
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
        """Every module path the site hooks or reads."""
        return tuple(p for p in (self.output, self.residual, self.norm, self.residual_plus) if p)


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


def _site(output: str, residual: str | None, position: int, keywords: tuple[str, ...], norm: str | None,
          hub: str, plus: str | None = None, call: int = 0) -> SiteSpec:
    return SiteSpec(output, residual, position, keywords, norm, plus, hub, call)


_BERT_LIKE = {
    "layers": ("encoder.layer",),
    "attention": _site("attention.output.dropout", "attention.output", 1, ("input_tensor",),
                    "attention.output.LayerNorm", "attention.output"),
    "ffn": _site("output.dropout", "output", 1, ("input_tensor",), "output.LayerNorm", "output"),
    # decoder layers built with add_cross_attention; AdapterHub's attention adapters sit here too
    "cross": _site("crossattention.output.dropout", "crossattention.output", 1, ("input_tensor",),
                "crossattention.output.LayerNorm", "crossattention.output"),
    "cross_with_attention": True,
}

_LLAMA_LIKE = {
    "layers": ("layers",),
    "attention": _site("self_attn", "input_layernorm", 0, ("hidden_states",), None, "attention_adapters"),
    "ffn": _site("mlp", "post_attention_layernorm", 0, ("hidden_states",), None, "output_adapters"),
}

# BART-style encoder and decoder layers (attention, feed-forward) and the decoder's cross-attention site
_BART_POST_NORM = (
    _site("self_attn", "self_attn", 0, ("hidden_states",), "self_attn_layer_norm", "attention_adapters"),
    _site("fc2", "fc1", 0, ("input",), "final_layer_norm", "output_adapters"),
)
_BART_POST_NORM_CROSS = _site("encoder_attn", "encoder_attn", 0, ("hidden_states",), "encoder_attn_layer_norm",
                              "cross_attention_adapters")
_BART_PRE_NORM = (
    _site("self_attn", "self_attn_layer_norm", 0, ("input",), None, "attention_adapters"),
    _site("fc2", "final_layer_norm", 0, ("input",), None, "output_adapters"),
)
_BART_PRE_NORM_CROSS = _site("encoder_attn", "encoder_attn_layer_norm", 0, ("input",), None,
                             "cross_attention_adapters")
_CLIP_SITES = (
    _site("self_attn", "layer_norm1", 0, ("input",), None, "attention_adapters"),
    _site("mlp", "layer_norm2", 0, ("input",), None, "output_adapters"),
)
_T5_ATTENTION = _site("layer.0.dropout", "layer.0.layer_norm", 0, ("hidden_states",), None, "layer.0")
_GEMMA2_LIKE = {
    "layers": ("layers",),
    "attention": _site("self_attn.o_proj", "input_layernorm", 0, ("x", "hidden_states"), "post_attention_layernorm",
                    "attention_adapters"),
    "ffn": _site("mlp.down_proj", "pre_feedforward_layernorm", 0, ("x", "hidden_states"), "post_feedforward_layernorm",
              "output_adapters"),
}


_FROM_SUBMODELS = SiteSpec("(sites of the submodel)", None)  # placeholder: the submodels' own layouts apply


def _encoder_decoder(name: str, types: tuple[str, ...], sites: tuple[SiteSpec, SiteSpec],
                     cross: SiteSpec) -> Architecture:
    return Architecture.from_layouts(name, types, (ModelLayout("encoder.layers", *sites),
                                                   ModelLayout("decoder.layers", *sites, cross=cross)))


ARCHITECTURES: tuple[Architecture, ...] = (  # recognized by model type
    Architecture("bert", ("bert",), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture("roberta", ("roberta", "xlm-roberta"), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture("electra", ("electra",), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture("bert-generation", ("bert-generation",), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture("deberta", ("deberta", "deberta-v2"), **_BERT_LIKE),  # type: ignore[arg-type]
    # X-MOD: the sites AdapterHub gives it, with the norm its feed-forward adapter reads (the language adapters'
    # own norm, else the output LayerNorm they reuse); X-MOD's language adapters stay and run after the site.
    # The feed-forward output is read at ``output.dense``: ``output.dropout`` runs again inside the language adapter.
    *(Architecture(
        "xmod", ("xmod",),
        layers=("encoder.layer",),
        attention=_site("attention.output.dropout", "attention.output", 1, ("input_tensor",), None, "attention.output"),
        ffn=_site("output.dense", "output", 1, ("input_tensor",), norm, "output"),
        cross=_site("crossattention.output.dropout", "crossattention.output", 1, ("input_tensor",), None,
                    "crossattention.output"),
        cross_with_attention=True,
    ) for norm in ("output.adapter_layer_norm", "output.LayerNorm")),
    Architecture(
        "distilbert", ("distilbert",),
        layers=("transformer.layer",),
        attention=_site("attention", "attention", 0, ("query", "hidden_states"), "sa_layer_norm",
                        "attention_adapters"),
        ffn=_site("ffn", "ffn", 0, ("input",), "output_layer_norm", "output_adapters"),
    ),
    Architecture(
        "albert", ("albert",),
        layers=("encoder.albert_layer_groups.*.albert_layers",),
        # AdapterHub calls this adapter with the block input as its input and the attention output as its
        # residual; the swapped site does the same
        attention=replace(_site("attention.output_dropout", "attention", 0, ("hidden_states",), "attention.LayerNorm",
                                "attention.attention_adapters"), swapped=True),
        ffn=_site("ffn_output", "ffn", 0, ("input",), "full_layer_layer_norm", "output_adapters"),
    ),
    Architecture(
        "gpt2", ("gpt2",),
        layers=("h",),
        attention=_site("attn", "ln_1", 0, ("input",), None, "attention_adapters"),
        ffn=_site("mlp", "ln_2", 0, ("input",), None, "output_adapters"),
    ),
    Architecture(
        "gptj", ("gptj",),
        layers=("h",),
        attention=_site("attn", "ln_1", 0, ("input",), None, "attention_adapters"),
        ffn=_site("mlp", "ln_1", 0, ("input",), None, "output_adapters", plus="attn"),
    ),
    Architecture(
        "phi", ("phi",),
        layers=("layers",),
        attention=_site("self_attn.dense", "input_layernorm", 0, ("input",), None, "attention_adapters"),
        ffn=SiteSpec("mlp.fc2", None, hub_location="output_adapters"),
    ),
    Architecture("llama", ("llama",), **_LLAMA_LIKE),  # type: ignore[arg-type]
    Architecture("mistral", ("mistral",), **_LLAMA_LIKE),  # type: ignore[arg-type]
    Architecture("qwen2", ("qwen2", "qwen3"), **_LLAMA_LIKE),  # type: ignore[arg-type]
    Architecture("gemma2", ("gemma2", "gemma3_text"), **_GEMMA2_LIKE),  # type: ignore[arg-type]
    Architecture(
        "modernbert", ("modernbert",),
        layers=("layers",),
        attention=_site("attn.Wo", "attn", 0, ("hidden_states",), "mlp_norm", "attention_adapters"),
        ffn=_site("mlp.Wo", "mlp", 0, ("hidden_states",), None, "output_adapters"),
    ),
    Architecture(
        "vit", ("vit",),
        layers=("encoder.layer",),
        attention=_site("attention", "layernorm_before", 0, ("input",), None, "attention_adapters"),
        ffn=_site("output.dropout", "output", 1, ("input_tensor",), None, "output.output_adapters"),
    ),
    Architecture(  # transformers 5: pre-norm layers at ``layers``, each with its own ``mlp``
        "vit", ("vit",),
        layers=("layers",),
        attention=_site("attention", "layernorm_before", 0, ("input",), None, "attention_adapters"),
        ffn=_site("mlp", "layernorm_after", 0, ("input",), None, "output.output_adapters"),
        hub_layers="encoder.layer",
    ),
    Architecture(  # both sub-block outputs, scaled by the layer's lambda_1 and lambda_2, pass through drop_path
        "beit", ("beit",),
        layers=("encoder.layer", "layers"),
        attention=_site("drop_path", "layernorm_before", 0, ("input",), None, "attention_adapters", call=0),
        ffn=_site("drop_path", "layernorm_after", 0, ("input",), None, "output_adapters", call=1),
        hub_layers="encoder.layer",
    ),
    # one tower: under text_model / vision_model (transformers 4) or at the top (transformers 5)
    Architecture("clip_text_model", ("clip_text_model",), ("text_model.encoder.layers", "encoder.layers"),
                 *_CLIP_SITES),
    Architecture("clip_vision_model", ("clip_vision_model",), ("vision_model.encoder.layers", "encoder.layers"),
                 *_CLIP_SITES),
    Architecture.from_layouts("clip", ("clip",), (
        ModelLayout("text_model.encoder.layers", *_CLIP_SITES, hidden_size="text_config.hidden_size"),
        ModelLayout("vision_model.encoder.layers", *_CLIP_SITES, hidden_size="vision_config.hidden_size"),
    )),
    _encoder_decoder("bart", ("bart", "plbart"), _BART_POST_NORM, _BART_POST_NORM_CROSS),
    _encoder_decoder("mbart", ("mbart", "whisper"), _BART_PRE_NORM, _BART_PRE_NORM_CROSS),
    Architecture.from_layouts("t5", ("t5", "mt5"), (
        ModelLayout("encoder.block", _T5_ATTENTION,
                    _site("layer.1.dropout", "layer.1.layer_norm", 0, ("hidden_states",), None, "layer.1")),
        ModelLayout("decoder.block", _T5_ATTENTION,
                    _site("layer.2.dropout", "layer.2.layer_norm", 0, ("hidden_states",), None, "layer.2"),
                    cross=_site("layer.1.dropout", "layer.1.layer_norm", 0, ("hidden_states",), None, "layer.1")),
    )),
    Architecture("encoder-decoder", ("encoder-decoder",), (), _FROM_SUBMODELS, _FROM_SUBMODELS,
                 submodels=("encoder", "decoder")),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for arch in ARCHITECTURES for t in arch.model_types))
"""The model types recognized by name. Other model types whose layers match one of
``adapter_fused.hf.structure.STRUCTURAL_LAYOUTS`` are recognized too; see
``adapter_fused.hf.structure.STRUCTURALLY_TESTED_MODEL_TYPES``."""

_REGISTERED: dict[str | type, Architecture] = {}


def register_model_layout(model: str | type, layout: ModelLayout | Sequence[ModelLayout]) -> None:
    """Tell the adapters where the sites are in models of a class or model type they do not know.

    model: a model class (its subclasses match too) or a ``config.model_type`` string.
    layout: a ``ModelLayout``, or one per layer stack (encoder then decoder: layers are numbered
        across the stacks in this order).

    A registered layout takes precedence over the built-in ones and over recognition by structure;
    registering again for the same key replaces it. Every path is checked against the model's first
    layer of each stack when an adapter is added (ValueError naming what is missing).
    """
    if not (isinstance(model, str) and model) and not isinstance(model, type):
        raise TypeError(f"register_model_layout: model must be a model class or a model type string, got {model!r}")
    layouts = (layout,) if isinstance(layout, ModelLayout) else tuple(layout)
    if not layouts or not all(isinstance(item, ModelLayout) for item in layouts):
        raise TypeError("register_model_layout: layout must be a ModelLayout or a non-empty sequence of them")
    name = model if isinstance(model, str) else model.__name__
    _REGISTERED[model] = Architecture.from_layouts(f"registered layout for {name}", (), layouts)


def unregister_model_layout(model: str | type) -> None:
    """Forget the layout registered for ``model`` (KeyError if there is none)."""
    if model not in _REGISTERED:
        raise KeyError(f"unregister_model_layout: no layout registered for {model!r}")
    del _REGISTERED[model]


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module.<path>`` or None where any part is missing."""
    return _get(module, path)


def missing_modules(layer: nn.Module, *sites: SiteSpec) -> list[str]:
    """The paths ``sites`` hook or read that ``layer`` lacks, sorted."""
    return sorted({p for site in sites for p in site.paths if not isinstance(_get(layer, p), nn.Module)})


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


def _find_layers(base: nn.Module, paths: tuple[str, ...]) -> list[tuple[str, nn.ModuleList]]:
    """The layer lists of the first of ``paths`` present in ``base``, with their paths; [] if none is."""
    for path in paths:
        lists = _expand(base, path)
        if lists:
            return lists
    return []


def _config_width(config: object, path: str | None) -> int | None:
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


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def resolve_layers(arch: Architecture, base: nn.Module, config: object = None) -> list[ModelLayer]:
    """Every layer of ``base`` (a base model) that ``arch`` describes, numbered across its stacks in
    order; stacks absent from ``base`` (the encoder of a decoder-only variant) are skipped."""
    config = config if config is not None else getattr(base, "config", None)
    out: list[ModelLayer] = []
    if arch.submodels:
        for name in arch.submodels:
            sub = _get(base, name)
            if sub is None:
                continue
            sub_base = _base(sub)
            inner = next((n for n, m in sub.named_modules() if m is sub_base), "")
            prefix = f"{name}.{inner}" if inner else name
            for layer in resolve_layers(_lookup(sub, sub_base), sub_base, getattr(sub, "config", None)):
                out.append(replace(layer, index=len(out), path=f"{prefix}.{layer.path}"))
        return out
    for stack in arch.stacks:
        width = _config_width(config, stack.hidden_size)
        for list_path, layers in _find_layers(base, stack.layers):  # type: ignore[arg-type]
            for position, module in enumerate(layers):
                cross = stack.cross if stack.cross is not None and _get(module, stack.cross.output) is not None else None
                out.append(ModelLayer(len(out), f"{list_path}.{position}", module, stack.attention, stack.ffn, width,
                                      cross, stack.cross_with_attention and cross is not None))
    return out


def _recognized() -> str:
    return f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}, and models whose layers match a layout " \
           f"recognized by structure (adapter_fused.hf.structure.STRUCTURAL_LAYOUTS)"


_REGISTER_HINT = "describe its layers with adapter_fused.register_model_layout (see README, 'Other models')"


def _registered(model: nn.Module, base: nn.Module, model_type: object) -> Architecture | None:
    for cls in (*type(model).__mro__, *type(base).__mro__):
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return _REGISTERED.get(model_type) if isinstance(model_type, str) else None


def _lookup(model: nn.Module, base: nn.Module) -> Architecture:
    """The Architecture of ``model`` (registered, by model type, or by structure); ValueError if none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = _registered(model, base, model_type)
    if arch is not None:
        return arch
    candidates = [a for a in ARCHITECTURES if model_type in a.model_types]
    if candidates:  # the first entry this model's layers fit (transformers version, config), else the first
        config = getattr(model, "config", None)
        resolved = [(a, resolve_layers(a, base, config)) for a in candidates]
        fitting = [a for a, layers in resolved if layers and not missing_modules(layers[0].module,
                                                                                 *layers[0].sites.values())]
        return next(iter(fitting), next((a for a, layers in resolved if layers), candidates[0]))
    return _find_by_structure(model, base, model_type)


def model_layers(model: nn.Module) -> tuple[Architecture, list[ModelLayer]]:
    """The architecture of ``model`` and all its layers (see ``resolve_layers``), after checking that
    every site module exists in the first layer of each stack. ValueError naming the layer class and
    the missing modules otherwise."""
    base = _base(model)
    arch = _lookup(model, base)
    layers = resolve_layers(arch, base, getattr(model, "config", None))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if not layers:
        paths = " or ".join(p for s in arch.stacks for p in s.layers) if not arch.submodels else \
            " or ".join(arch.submodels)
        raise ValueError(f"adapter_fused: {type(model).__name__} has model type {model_type!r} but no layer list at "
                         f"{paths}; supported model types: {supported}; or {_REGISTER_HINT}")
    seen: set[tuple[SiteSpec, ...]] = set()
    for layer in layers:
        specs = tuple(layer.sites.values())
        if specs in seen:
            continue
        seen.add(specs)
        missing = missing_modules(layer.module, *specs)
        calls = [(spec.output, spec.output_call) for spec in specs]
        shared = next((c for c in calls if calls.count(c) > 1), None)
        if shared is not None:
            raise ValueError(f"adapter_fused: two sites of {type(layer.module).__name__} (at {layer.path}) take call "
                             f"{shared[1]} of {shared[0]}; give each its own SiteSpec.output_call")
        if missing:
            raise ValueError(f"adapter_fused: {type(layer.module).__name__} (at {layer.path}) lacks the modules "
                             f"{', '.join(missing)} expected for {arch.name}; supported model types: {supported}; "
                             f"or {_REGISTER_HINT}")
    return arch, layers


def find_architecture(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    """The architecture of a transformers model and its layers.

    A layout registered with ``register_model_layout`` for the model's class or type comes first; a
    model type in ``ARCHITECTURES`` uses its entry; any other model is matched by the structure of
    its layers against ``adapter_fused.hf.structure.STRUCTURAL_LAYOUTS`` (checked on a dummy forward pass)
    and gets an Architecture named after the layout whose ``model_types`` is the model's type.
    The layers are the model's own ``nn.ModuleList`` when it has one stack, else a new ModuleList
    holding the layers of every stack in numbering order (see ``model_layers`` for their paths).
    Raises ValueError naming the layer class, the model type and the recognized model types and
    layouts when nothing matches.
    """
    arch, layers = model_layers(model)
    base = _base(model)
    parents = {layer.path.rsplit(".", 1)[0] for layer in layers}
    if len(parents) == 1:
        parent = base.get_submodule(parents.pop())
        if isinstance(parent, nn.ModuleList) and len(parent) == len(layers):
            return arch, parent
    return arch, nn.ModuleList([layer.module for layer in layers])


def _find_by_structure(model: nn.Module, base: nn.Module, model_type: object) -> Architecture:
    """``_lookup`` for a model type not in ``ARCHITECTURES``: see ``adapter_fused.hf.structure``."""
    from .structure import find_by_structure

    what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (not a transformers model)"
    return find_by_structure(model, base, model_type, f"adapter_fused: {what} is not supported; {_recognized()}",
                             _REGISTER_HINT)


def hidden_size(model: nn.Module) -> int:
    """The model width d (``config.hidden_size``, ``n_embd``, ``dim`` or ``d_model``; for a model
    whose config has none of these, such as CLIP or an encoder-decoder, the width of its first layer)."""
    config = model.config  # type: ignore[attr-defined]
    width = _config_width(config, None)
    if width is not None:
        return width
    try:
        _, layers = model_layers(model)
    except ValueError:
        layers = []
    if layers and layers[0].hidden_size is not None:
        return layers[0].hidden_size
    raise ValueError(f"adapter_fused: cannot find the hidden size in {type(config).__name__}")


def layer_widths(model: nn.Module) -> list[int]:
    """The width d of every layer of ``model``, in layer order (stacks may differ: CLIP's towers)."""
    _, layers = model_layers(model)
    default = None
    widths = []
    for layer in layers:
        if layer.hidden_size is None:
            default = default if default is not None else hidden_size(model)
        widths.append(layer.hidden_size if layer.hidden_size is not None else default)
    return widths  # type: ignore[return-value]


def adapterhub_weights_by_layer(model: nn.Module, weights: dict[str, Any], source: str) -> dict[str, Any]:
    """AdapterHub weight names (``<layer path>.<location>.adapters.<name>.<projection>``) renamed to
    ``<layer number>.attention.adapters...`` or ``<layer number>.output.adapters...`` by matching each
    name's layer path and location against this model's layers and sites, so that the weights of an
    encoder-decoder model reach the right stack (``<layer number>.cross.adapters...`` for the sites
    after cross-attention). Models whose sites do not say where AdapterHub keeps them (structural or
    registered layouts) get ``weights`` unchanged. ValueError naming ``source`` for adapter weights at a
    location no site of this model has."""
    arch, layers = model_layers(model)
    table: dict[str, tuple[int, str]] = {}
    locations = {"attention": "attention", "cross": "cross", "ffn": "output"}
    for layer in layers:
        for name, spec in layer.sites.items():
            location = spec.hub_location
            if location is None:
                return weights
            table[f"{layer.path}.{location}"] = (layer.index, locations[name])
            if arch.hub_layers is not None:
                position = layer.path.rsplit(".", 1)[-1]
                table[f"{arch.hub_layers}.{position}.{location}"] = table[f"{layer.path}.{location}"]
    out: dict[str, Any] = {}
    for key, value in weights.items():
        head, sep, tail = key.partition(".adapters.")
        matches = [k for k in table if head == k or head.endswith("." + k)] if sep else []
        if not sep:
            out[key] = value  # not an adapter weight: weights_from_adapterhub names it
            continue
        if not matches:
            raise ValueError(f"{source}: {key} is not at an adapter site of this model (its sites hold adapters "
                             f"after self-attention, after cross-attention in decoder layers and after the "
                             f"feed-forward block)")
        index, site = table[max(matches, key=len)]
        out[f"{index}.{site}.adapters.{tail}"] = value
    return out
