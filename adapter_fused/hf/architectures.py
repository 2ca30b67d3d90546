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
"""

from __future__ import annotations

from dataclasses import dataclass

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

ARCHITECTURES: tuple[Architecture, ...] = (
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


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def get_submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module.<path>`` or None where any part is missing."""
    return _get(module, path)


def find_architecture(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    """The architecture of a transformers model and its ModuleList of layers.

    Raises ValueError naming the supported model types when the model is not one of them.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    arch = next((a for a in ARCHITECTURES if model_type in a.model_types), None)
    if arch is None:
        what = f"model type {model_type!r}" if model_type else f"{type(model).__name__} (not a transformers model)"
        raise ValueError(f"adapter_fused: {what} is not supported; supported model types: {supported}")
    base = getattr(model, "base_model", model)
    for path in arch.layers:
        layers = _get(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            break
    else:
        raise ValueError(f"adapter_fused: {type(model).__name__} has model type {model_type!r} but no layer list at "
                         f"{' or '.join(arch.layers)}; supported model types: {supported}")
    spec_paths = [p for s in (arch.attention, arch.ffn) for p in (s.output, s.residual, s.norm) if p]
    missing = sorted({p for p in spec_paths if _get(layers[0], p) is None})
    if missing:
        raise ValueError(f"adapter_fused: {type(layers[0]).__name__} lacks the modules {', '.join(missing)} expected "
                         f"for {arch.name}; supported model types: {supported}")
    return arch, layers


def hidden_size(model: nn.Module) -> int:
    """The model width d (``config.hidden_size``, ``n_embd`` or ``dim``)."""
    config = model.config  # type: ignore[attr-defined]
    for key in ("hidden_size", "n_embd", "dim", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"adapter_fused: cannot find the hidden size in {type(config).__name__}")
