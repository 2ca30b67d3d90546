"""The layouts of the model types recognized by name (``ARCHITECTURES``), and where the invertible
adapter sits in them (``EMBEDDING_MODULES``)."""

from __future__ import annotations

from dataclasses import replace

from .spec import Architecture, ModelLayout, SiteSpec


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
``adapter_fused.hf.layouts.structure.STRUCTURAL_LAYOUTS`` are recognized too; see
``adapter_fused.hf.layouts.structure.STRUCTURALLY_TESTED_MODEL_TYPES``."""

EMBEDDING_MODULES: dict[str, str] = {"bert": "embeddings", "roberta": "embeddings", "distilbert": "embeddings",
                                     "gpt2": "drop"}
"""Path (from the base model) of the module whose output the invertible adapter transforms, by
architecture name; other architectures (Llama-like) use ``embed_tokens``."""
