"""Where the adapter sites are in each supported transformers architecture.

Every supported layer has two sites, after the attention block and after the feed-forward block.
At a site the layer combines the sub-block output ``h`` with the block residual ``x``, either as
``LN(h + x)`` (post-LN: BERT, RoBERTa, DistilBERT) or as ``h + x`` (pre-LN: GPT-2, Llama, Mistral,
Qwen2). A site is described by module paths relative to the layer:

- ``output``: the module whose output is ``h`` (a tensor, or a tuple whose first item is ``h``);
- ``residual``: a module that receives ``x`` as an argument before ``output`` runs, with the
  argument's position and the keyword names it may be passed under;
- ``norm``: the layer norm of ``LN(h + x)``, or None for pre-LN layers.

The adapters hook these modules; no base module is replaced and no parameter renamed.

Models are recognized in two ways. A model type listed in ``ARCHITECTURES`` uses that entry. Any
other model is recognized by the structure of its first layer (see ``STRUCTURAL_LAYOUTS``): a
pre-norm decoder layer laid out like Llama's, with ``input_layernorm`` and ``self_attn``, then
``post_attention_layernorm`` and a feed-forward block ``mlp`` (or a mixture of experts
``block_sparse_moe``), gets the Llama sites. The forward pass itself cannot be checked without running
it, so this rests on an assumption: the layer computes ``x = x + self_attn(input_layernorm(x))`` and
then ``x = x + mlp(post_attention_layernorm(x))``. Layers that visibly differ are refused: an extra
layer norm directly in the layer (sub-block outputs normalized before the residual add, as in Gemma 2
or OLMo 2), a ``residual_multiplier`` other than 1 (Granite) or ``use_parallel_residual`` (StableLM's
parallel variant). At run time, a site whose placement needs the residual ``x`` and whose residual
module did not run before its output module in the same call raises RuntimeError rather than compute
wrong numbers. Dropout applied by the layer to a sub-block output (Phi-3, StableLM) acts on the
adapted output, which changes nothing in evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class SiteSpec:
    """Module paths (relative to a layer) that locate one adapter site; see the module docstring."""

    output: str
    residual: str
    residual_position: int
    residual_keywords: tuple[str, ...]
    norm: str | None


@dataclass(frozen=True)
class Architecture:
    """A family of transformers models sharing one layer layout."""

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths, from the base model, of the ModuleList of layers
    attention: SiteSpec
    ffn: SiteSpec

    def site(self, name: str) -> SiteSpec:
        """The SiteSpec of ``"attention"`` or ``"ffn"``."""
        return self.attention if name == "attention" else self.ffn


_BERT_LIKE = dict(
    layers=("encoder.layer",),
    attention=SiteSpec("attention.output.dropout", "attention.output", 1, ("input_tensor",),
                       "attention.output.LayerNorm"),
    ffn=SiteSpec("output.dropout", "output", 1, ("input_tensor",), "output.LayerNorm"),
)

_LLAMA_LIKE = dict(
    layers=("layers",),
    attention=SiteSpec("self_attn", "input_layernorm", 0, ("hidden_states",), None),
    ffn=SiteSpec("mlp", "post_attention_layernorm", 0, ("hidden_states",), None),
)

ARCHITECTURES: tuple[Architecture, ...] = (  # recognized by model type
    Architecture("bert", ("bert",), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture("roberta", ("roberta", "xlm-roberta"), **_BERT_LIKE),  # type: ignore[arg-type]
    Architecture(
        "distilbert", ("distilbert",),
        layers=("transformer.layer",),
        attention=SiteSpec("attention", "attention", 0, ("query", "hidden_states"), "sa_layer_norm"),
        ffn=SiteSpec("ffn", "ffn", 0, ("input",), "output_layer_norm"),
    ),
    Architecture(
        "gpt2", ("gpt2",),
        layers=("h",),
        attention=SiteSpec("attn", "ln_1", 0, ("input",), None),
        ffn=SiteSpec("mlp", "ln_2", 0, ("input",), None),
    ),
    Architecture("llama", ("llama",), **_LLAMA_LIKE),  # type: ignore[arg-type]
    Architecture("mistral", ("mistral",), **_LLAMA_LIKE),  # type: ignore[arg-type]
    Architecture("qwen2", ("qwen2",), **_LLAMA_LIKE),  # type: ignore[arg-type]
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for arch in ARCHITECTURES for t in arch.model_types)
"""The model types recognized by name. Other model types whose layers match one of
``STRUCTURAL_LAYOUTS`` are recognized too; see ``STRUCTURALLY_TESTED_MODEL_TYPES``."""

_STRUCTURAL_LAYERS = ("layers", "model.layers", "decoder.layers", "h", "blocks")

STRUCTURAL_LAYOUTS: tuple[Architecture, ...] = (
    Architecture("llama-like pre-norm decoder", (), _STRUCTURAL_LAYERS,
                 _LLAMA_LIKE["attention"], _LLAMA_LIKE["ffn"]),  # type: ignore[arg-type]
    Architecture("llama-like pre-norm decoder with block_sparse_moe", (), _STRUCTURAL_LAYERS,
                 _LLAMA_LIKE["attention"],  # type: ignore[arg-type]
                 SiteSpec("block_sparse_moe", "post_attention_layernorm", 0, ("hidden_states",), None)),
)
"""Layer layouts recognized by structure for model types not in ``ARCHITECTURES``: a layer with
``input_layernorm`` + ``self_attn`` and ``post_attention_layernorm`` + ``mlp`` (or ``block_sparse_moe``),
with no other layer norm directly in the layer. The feed-forward adapter rewrites the first item when
the block returns a tuple (a mixture of experts' ``(hidden, router_logits)``)."""

STRUCTURALLY_TESTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "gemma", "phi3", "olmo", "granite", "granitemoe", "smollm3",
    "stablelm", "starcoder2", "glm", "deepseek_v3",
)
"""Model types recognized by structure whose tiny random models the tests check (granite and
granitemoe only with ``residual_multiplier=1``)."""


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module.<path>`` or None where any part is missing."""
    return _get(module, path)


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` looks like a layer norm (LayerNorm, RMSNorm or a model's own ``*Norm`` class)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm")


def _structural_mismatch(layer: nn.Module, arch: Architecture) -> str | None:
    """Why ``layer`` does not follow ``arch`` (a structural layout), or None when it does."""
    expected = [p for s in (arch.attention, arch.ffn) for p in (s.output, s.residual, s.norm) if p]
    missing = [p for p in expected if not isinstance(_get(layer, p), nn.Module)]
    if missing:
        return f"lacks {', '.join(missing)}"
    extra = [name for name, child in layer.named_children() if name not in expected and _is_norm(child)]
    if extra:
        return f"has layer norms besides input_layernorm and post_attention_layernorm ({', '.join(extra)})"
    multiplier = getattr(layer, "residual_multiplier", 1)
    if not isinstance(multiplier, (int, float)) or multiplier != 1:
        return f"scales its sub-block outputs before the residual add (residual_multiplier={multiplier!r})"
    if getattr(layer, "use_parallel_residual", False):
        return "runs attention and feed-forward in parallel (use_parallel_residual)"
    return None


def _find_layers(base: nn.Module, paths: tuple[str, ...]) -> nn.ModuleList | None:
    for path in paths:
        layers = _get(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _recognized() -> str:
    layouts = "; ".join(
        f"{a.name} (layers with {a.attention.residual} + {a.attention.output} and {a.ffn.residual} + {a.ffn.output})"
        for a in STRUCTURAL_LAYOUTS)
    return f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}, and any model whose layers are laid out " \
           f"as one of: {layouts}"


def find_architecture(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    """The architecture of a transformers model and its ModuleList of layers.

    A model type in ``ARCHITECTURES`` uses its entry; any other model is matched by the structure of
    its first layer against ``STRUCTURAL_LAYOUTS`` (see the module docstring for what that assumes)
    and gets an Architecture named after the layout whose ``model_types`` is the model's type.
    Raises ValueError naming the layer class, the model type and the recognized model types and
    layouts when nothing matches.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    base = getattr(model, "base_model", model)
    arch = next((a for a in ARCHITECTURES if model_type in a.model_types), None)
    if arch is None:
        return _find_by_structure(model, base, model_type)
    layers = _find_layers(base, arch.layers)
    if layers is None:
        raise ValueError(f"adapter_fused: {type(model).__name__} has model type {model_type!r} but no layer list at "
                         f"{' or '.join(arch.layers)}; supported model types: {supported}")
    spec_paths = [p for s in (arch.attention, arch.ffn) for p in (s.output, s.residual, s.norm) if p]
    missing = sorted({p for p in spec_paths if _get(layers[0], p) is None})
    if missing:
        raise ValueError(f"adapter_fused: {type(layers[0]).__name__} lacks the modules {', '.join(missing)} expected "
                         f"for {arch.name}; supported model types: {supported}")
    return arch, layers


def _find_by_structure(model: nn.Module, base: nn.Module, model_type: object) -> tuple[Architecture, nn.ModuleList]:
    """``find_architecture`` for a model type not in ``ARCHITECTURES``."""
    what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (not a transformers model)"
    layers = _find_layers(base, _STRUCTURAL_LAYERS)
    if layers is None:
        raise ValueError(f"adapter_fused: {what} is not supported; {_recognized()}. Such a model is not "
                         f"recognized: it has no non-empty layer list at {', '.join(_STRUCTURAL_LAYERS)}")
    reasons = []
    for layout in STRUCTURAL_LAYOUTS:
        reason = _structural_mismatch(layers[0], layout)
        if reason is None:
            return replace(layout, model_types=(str(model_type),) if model_type else ()), layers
        reasons.append(f"as a {layout.name} it {reason}")
    raise ValueError(f"adapter_fused: {what} is not supported; {_recognized()}. Such a model is not recognized: "
                     f"its layer class {type(layers[0]).__name__} matches no known layout ({'; '.join(reasons)})")


def hidden_size(model: nn.Module) -> int:
    """The model width d (``config.hidden_size``, ``n_embd`` or ``dim``)."""
    config = model.config  # type: ignore[attr-defined]
    for key in ("hidden_size", "n_embd", "dim", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"adapter_fused: cannot find the hidden size in {type(config).__name__}")
