"""Tiny random models (no downloads) of the model types supported by type, with inputs and a way to
read every stack's output, for the family tests. A type this transformers lacks skips with its reason."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 99
WIDTH = 32
TEXT = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": VOCAB, "max_position_embeddings": 64}
SEQ2SEQ = {"d_model": WIDTH, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": VOCAB,
           "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
           "decoder_start_token_id": 2}
T5 = {"d_model": WIDTH, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2,
      "vocab_size": VOCAB, "decoder_start_token_id": 0}
VISION = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "image_size": 16, "patch_size": 8}

CONFIGS: dict[str, dict[str, Any]] = {
    "albert": {**TEXT, "embedding_size": 16},
    "electra": {**TEXT, "embedding_size": WIDTH},
    "bert-generation": TEXT,
    "deberta": TEXT,
    "deberta-v2": TEXT,
    "bart": SEQ2SEQ,
    "plbart": SEQ2SEQ,
    "mbart": SEQ2SEQ,
    "whisper": {**SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32,
                "pad_token_id": 1, "begin_suppress_tokens": None, "suppress_tokens": None},
    "t5": T5,
    "mt5": T5,
    "vit": VISION,
    "beit": {**VISION, "layer_scale_init_value": 0.5},
    "xlm-roberta": {**TEXT, "pad_token_id": 1},
    "xmod": {**TEXT, "pad_token_id": 1, "languages": ["en_XX", "de_DE"], "default_language": "de_DE"},
    "clip_text_model": {**TEXT, "max_position_embeddings": 16, "pad_token_id": 1, "bos_token_id": 0,
                        "eos_token_id": 2},
    "clip_vision_model": {**VISION, "hidden_size": 48, "intermediate_size": 96},
    "clip": {"text_config": {**TEXT, "max_position_embeddings": 16, "pad_token_id": 1, "bos_token_id": 0,
                             "eos_token_id": 2},
             "vision_config": {**VISION, "hidden_size": 48, "intermediate_size": 96}},
    "gptj": {"n_embd": WIDTH, "n_layer": 2, "n_head": 2, "rotary_dim": 8, "vocab_size": VOCAB, "n_positions": 64},
    "phi": TEXT,
    "qwen3": {**TEXT, "num_key_value_heads": 1, "head_dim": 16},
    "gemma2": {**TEXT, "head_dim": 16, "num_key_value_heads": 1},
    "gemma3_text": {**TEXT, "head_dim": 16, "num_key_value_heads": 1},
    "modernbert": {**TEXT, "global_attn_every_n_layers": 1, "pad_token_id": 1, "bos_token_id": 0,
                   "eos_token_id": 2, "cls_token_id": 0, "sep_token_id": 2},
    "encoder-decoder": {},
}
MODEL_TYPES = tuple(CONFIGS)


def require(model_type: str) -> None:
    """Skip unless this transformers has a config class for ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no config class for {model_type!r}")


def build(model_type: str, seed: int = 0) -> nn.Module:
    """A 2-layer (per stack) base model of ``model_type`` with random weights, in eval mode."""
    require(model_type)
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    if model_type == "encoder-decoder":
        model = encoder_decoder("bert")
    else:
        config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
        model = AutoModel.from_config(config, attn_implementation="eager")
    return model.eval()


def encoder_decoder(kind: str) -> nn.Module:
    """An ``EncoderDecoderModel`` of two 2-layer models of type ``kind`` (``"bert"`` or ``"xmod"``), the
    decoder with cross-attention and an LM head."""
    if kind == "bert":
        encoder = transformers.BertModel(transformers.BertConfig(**TEXT), add_pooling_layer=False)
        decoder = transformers.BertLMHeadModel(transformers.BertConfig(**TEXT, is_decoder=True,
                                                                       add_cross_attention=True))
    else:
        encoder = transformers.XmodModel(transformers.XmodConfig(**CONFIGS[kind]), add_pooling_layer=False)
        decoder = transformers.XmodForCausalLM(transformers.XmodConfig(**CONFIGS[kind], is_decoder=True,
                                                                       add_cross_attention=True))
    model = transformers.EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = 2
    model.config.pad_token_id = 1
    return model


def inputs(model_type: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of 2 for ``model_type``: token ids (encoder and decoder), pixels or audio features."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    out: dict[str, torch.Tensor] = {}
    if model_type in ("vit", "beit", "clip", "clip_vision_model"):
        out["pixel_values"] = torch.randn(2, 3, 16, 16, generator=generator)
    if model_type == "whisper":
        out["input_features"] = torch.randn(2, 8, 32, generator=generator)
    elif model_type not in ("vit", "beit", "clip_vision_model"):
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
    if model_type in ("bart", "plbart", "mbart", "whisper", "t5", "mt5", "encoder-decoder"):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=generator)
    return out


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every stack's last hidden state (and logits, where the model has a head), flattened and
    concatenated: a change at any layer of any stack shows."""
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if hasattr(value, "items"):
            for key, item in value.items():
                if isinstance(item, torch.Tensor) and (key.endswith("last_hidden_state") or key == "logits"):
                    found.append(item.flatten())
                elif hasattr(item, "items"):
                    walk(item)

    walk(model(**batch))
    assert found
    return torch.cat(found)
