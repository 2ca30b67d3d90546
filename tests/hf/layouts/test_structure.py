"""Models recognized by the structure of their layers rather than by model type: exact base outputs
without an active adapter, parity with adapters computed by hand in float64, one hook call per adapted site of
each layer, and clear refusals of layers laid out differently."""

from __future__ import annotations

import copy
import inspect
import re
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused import ACTIVATIONS
from adapter_fused.hf import (
    AdapterConfig,
    ModelLayout,
    SiteSpec,
    add_adapter,
    register_model_layout,
    set_active_adapters,
    unregister_model_layout,
)
from adapter_fused.hf import model as hf_model
from adapter_fused.hf.layouts import find_layers, model_layers
from adapter_fused.hf.layouts.structure import LAYERS, STRUCTURALLY_TESTED_MODEL_TYPES
from adapter_fused.hf.sites import Site

from ..models import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0}
GPT = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64}
# hybrid models: both kinds of layer, in either order (a linear-attention first layer needs the hybrid candidate)
LINEAR_ATTENTION = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                    "linear_value_head_dim": 8, "head_dim": 16}
EXTRA: dict[str, dict[str, Any]] = {
    "qwen3_next": {**LINEAR_ATTENTION, "layer_types": ["linear_attention", "full_attention"], "num_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "decoder_sparse_step": 1},
    "qwen3_5_text": {**LINEAR_ATTENTION, "layer_types": ["full_attention", "linear_attention"]},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gemma": {"head_dim": 16},
    "deepseek_v3": {"first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "moe_intermediate_size": 32, "q_lora_rank": None, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    "gpt_bigcode": GPT,
    "codegen": {**GPT, "rotary_dim": 8},
    "bloom": {"n_layer": 2, "n_head": 4},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
}
PRE = "pre-norm layer (input_layernorm, self_attn; post_attention_layernorm, mlp)"
MOE = "pre-norm layer (input_layernorm, self_attn; post_attention_layernorm, block_sparse_moe)"
HYBRID = "pre-norm hybrid layer (input_layernorm, self_attn or linear_attn; post_attention_layernorm, mlp)"
# The layout each type must get, decided by reading its layer's forward pass.
EXPECTED = {
    "qwen3_moe": PRE, "qwen2_moe": PRE, "gemma": PRE, "phi3": PRE, "olmo": PRE, "olmoe": PRE,
    "granite": PRE, "smollm3": PRE, "stablelm": PRE, "starcoder2": PRE, "glm": PRE, "deepseek_v3": PRE,
    "mixtral": MOE, "granitemoe": MOE,
    "olmo2": "sandwich-norm layer (self_attn, post_attention_layernorm; mlp, post_feedforward_layernorm)",
    "glm4": "sandwich-norm layer (input_layernorm, self_attn, post_self_attn_layernorm; post_attention_layernorm, "
            "mlp, post_mlp_layernorm)",
    "cohere": "parallel block (input_layernorm, self_attn and mlp)",
    "gpt_neox": "parallel block (input_layernorm, attention and mlp)",
    "falcon": "parallel block (input_layernorm, self_attention and mlp)",
    "codegen": "parallel block (ln_1, attn and mlp)",
    "gpt_neo": "pre-norm layer (ln_1, attn; ln_2, mlp)",
    "gpt_bigcode": "pre-norm layer (ln_1, attn; ln_2, mlp)",
    "opt": "pre-norm layer (self_attn_layer_norm, self_attn; final_layer_norm, fc1 ... fc2)",
    "bloom": "pre-norm layer adding the residual inside its sub-blocks (input_layernorm, self_attention.dense; "
             "post_attention_layernorm, mlp.dense_4h_to_h)",
    "camembert": "post-norm BERT-like layer (attention.output: dense, dropout, LayerNorm; output: dense, dropout, "
                 "LayerNorm)",
    "qwen3_next": HYBRID, "qwen3_5_text": HYBRID,
    "apertus": "pre-norm layer (attention_layernorm, self_attn; feedforward_layernorm, mlp)",
    "mpt": "pre-norm layer adding the residual inside its feed-forward block (norm_1, attn; norm_2, ffn.down_proj)",
}
MODEL_TYPES = tuple(EXPECTED)
# Variants selected by config flags: the layout found changes with them.
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "stablelm-parallel": ("stablelm", {"use_parallel_residual": True},
                          "parallel block (input_layernorm, self_attn and mlp)"),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False},
                            "pre-norm layer (input_layernorm, attention; post_attention_layernorm, mlp)"),
    "falcon-new-architecture": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 4},
                                "parallel block (ln_attn, self_attention; ln_mlp, mlp)"),
    "falcon-sequential": ("falcon", {"parallel_attn": False},
                          "pre-norm layer (input_layernorm, self_attention; post_attention_layernorm, mlp)"),
    "opt-post-norm": ("opt", {"do_layer_norm_before": False},
                      "post-norm layer (self_attn, self_attn_layer_norm; fc1 ... fc2, final_layer_norm)"),
}
# Layers whose sub-block outputs and residual combine in a way no layout describes.
REFUSED = {"granite": {"residual_multiplier": 0.5}, "bloom": {"pretraining_tp": 2, "slow_but_exact": True}}


def build(model_type: str, **overrides: Any) -> nn.Module:
    """A tiny random 2-layer base model of ``model_type`` in eval mode; skips when this transformers lacks it."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no config class for {model_type!r}")
    config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="eager").eval()


def inputs(seq2seq: bool = False, features: int | None = None) -> dict[str, Any]:
    """Two token sequences (``features``: two sequences of 16 random speech frames of that width), and
    with ``seq2seq`` the decoder's token ids."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if features is not None:
        out = {"input_features": torch.randn(2, 16, features, generator=generator)}
    if seq2seq:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=generator)
        out["use_cache"] = False  # FSMT's decoder fails to build a cache on transformers 4.57
    return out


def float64_if_it_runs(model: nn.Module, x: dict[str, torch.Tensor]) -> nn.Module:
    """A float64 copy of ``model``, or a float32 one where its forward does not run in float64 (some
    mixtures of experts mix dtypes or use float32-only grouped matrix products). Call it through
    ``run_reference``."""
    reference = copy.deepcopy(model).double()
    for default in (False, True):
        reference.__dict__["default_float64"] = default
        try:
            run_reference(reference, x)
            return reference
        except RuntimeError:
            pass
    reference.__dict__["default_float64"] = False
    return reference.float()


def run_reference(reference: nn.Module, x: dict[str, Any]) -> Any:
    """``reference(**x)`` in its dtype, without gradients. Some float64 models need float64 as torch's
    default dtype (Speech2Text's decoder fills its causal mask with float64's minimum in a tensor of
    the default dtype on transformers 4.57)."""
    default = torch.get_default_dtype()
    if reference.__dict__.get("default_float64"):
        torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            return reference(**as_dtype(x, next(reference.parameters()).dtype))
    finally:
        torch.set_default_dtype(default)


def as_dtype(x: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``x`` with its floating-point tensors (speech frames) in ``dtype``."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}


def hand_adapted(reference: nn.Module, layers: list[Any], placement: str, weights: dict[str, dict[str, torch.Tensor]],
                 act: str, scale: float) -> None:
    """Patch the modules of ``reference`` (a float64 copy of the base model, whose dtype the adapter
    ``weights`` take) at the sites of ``layers`` (``ModelLayer`` items: paths and SiteSpecs) so that they
    add the adapters by hand, at each site ``weights`` has an adapter for. houlsby: the output module
    returns ``h + s f(h)``. pfeiffer, with ``x`` the residual module's input (plus the ``residual_plus``
    module's output): pre-norm, ``h + s f(h + x)``; post-norm, the norm returns
    ``LN(h + x + s f(LN(h + x)))``, as AdapterHub's ``seq_bn`` does."""
    dtype = next(reference.parameters()).dtype
    weights = {site: {k: v.to(dtype) for k, v in w.items()} for site, w in weights.items()}
    base = reference.base_model

    def f(z: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(ACTIVATIONS[act](F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out

    def rewrite(out: Any, new: torch.Tensor) -> Any:
        return (new, *out[1:]) if isinstance(out, tuple) else new

    for layer, site in [(item, site) for item in layers for site in item.sites]:
        if f"{layer.index}.{site}" not in weights:
            continue
        module = base.get_submodule(layer.path)
        spec, w, box = layer.site(site), weights[f"{layer.index}.{site}"], {}
        if placement == "houlsby":
            module.get_submodule(spec.output).register_forward_hook(
                lambda m, a, out, w=w: rewrite(out, first(out) + scale * f(first(out), w)))
            continue

        def stash(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], spec: Any = spec, box: dict = box) -> None:
            box["x"] = args[spec.residual_position] if len(args) > spec.residual_position else \
                next(kwargs[k] for k in spec.residual_keywords if k in kwargs)
        module.get_submodule(spec.residual).register_forward_pre_hook(stash, with_kwargs=True)
        if spec.residual_plus:
            module.get_submodule(spec.residual_plus).register_forward_hook(
                lambda m, a, out, box=box: box.update(x=box["x"] + first(out)))
        if spec.norm is None:
            module.get_submodule(spec.output).register_forward_hook(
                lambda m, a, out, w=w, box=box: rewrite(out, first(out) + scale * f(first(out) + box["x"], w)))
        else:
            norm = module.get_submodule(spec.norm)

            def normed(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, w: dict = w) -> Any:
                total = args[0]  # h + x; out = LN(h + x)
                return F.layer_norm(total + scale * f(out, w), m.normalized_shape, m.weight, m.bias, m.eps)
            norm.register_forward_hook(normed)


def check_against_hand(model: nn.Module, placement: str, expected_layout: str, monkeypatch: pytest.MonkeyPatch,
                       launches: Any, seq2seq: bool = False, batch: dict[str, Any] | None = None) -> None:
    """(1) no active adapter computes the base model bit for bit; (2) the adapters change the output;
    (3) one hook call per layer and adapted site, each running the fused kernel; (4) parity with adapters added
    by hand in float64 at the sites of ``expected_layout``, the layout the model must be recognized as.
    ``seq2seq``: an encoder-decoder model, whose adapters also sit after the decoder's cross-attention
    (``cross_adapter=True``). ``batch``: the model's inputs, where they are not token ids."""
    calls: Counter[tuple[str, str]] = Counter()
    apply = Site.apply

    def counting(self: Site, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        calls[self.key] += 1
        return apply(self, module, args, output)

    monkeypatch.setattr(Site, "apply", counting)
    x = batch if batch is not None else inputs(seq2seq, getattr(model.config, "input_feat_per_channel", None))
    reference = float64_if_it_runs(model, x)
    with torch.no_grad():
        base = model(**x).last_hidden_state
        add_adapter(model, "a", AdapterConfig(placement, cross_adapter=seq2seq))
        arch, layers = model_layers(model)
        assert arch.name == expected_layout
        assert torch.equal(model(**x).last_hidden_state, base)  # (1)
        randomize(model.base_model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        calls.clear()
        launches.clear()
        out = model(**x).last_hidden_state
    config = hf_model.adapter_config(model, "a")
    # (3) one hook call per layer and adapted site; sites without an adapter have no hook
    assert calls == Counter({(str(layer.index), s): 1 for layer in layers for s in hf_model.layer_sites(config, layer)})
    assert len(layers) == (4 if seq2seq else 2) and all(("cross" in layer.sites) == (seq2seq and layer.index >= 2)
                                                        for layer in layers)
    assert (out - base).abs().max() > 1e-2  # (2)
    weights = {f"{layer}.{site}": {k: v.detach().double() for k, v in module.state_dict().items()}
               for layer, block in model.base_model.fused_adapters["a"].items() for site, module in block.items()}
    assert sorted(weights) == sorted(f"{layer.index}.{s}" for layer in layers for s in hf_model.layer_sites(config, layer))
    assert len(launches) >= len(weights)  # (3) the fused kernel ran at every adapted site
    hand_adapted(reference, layers, placement, weights, config.resolved_activation, config.scale)
    expected = run_reference(reference, x).last_hidden_state
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)  # (4)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layers_are_recognized_by_structure(model_type: str, placement: str, monkeypatch: pytest.MonkeyPatch,
                                            launches: Any) -> None:
    model, expected = build(model_type), EXPECTED[model_type]
    if expected == MOE and not hasattr(model.base_model.layers[0], "block_sparse_moe"):
        expected = PRE  # transformers 5 names the mixture of experts mlp
    check_against_hand(model, placement, expected, monkeypatch, launches)
    if expected == HYBRID:  # each layer adapted after its own token mixer, both kinds present
        mixers = ["linear_attn" if kind == "linear_attention" else "self_attn" for kind in model.config.layer_types]
        assert sorted(mixers) == ["linear_attn", "self_attn"]
        assert [layer.attention.output for layer in model_layers(model)[1]] == mixers


SEQ2SEQ = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": VOCAB,
           "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
           "decoder_start_token_id": 2}
PRE_ED = ("pre-norm encoder-decoder (self_attn_layer_norm, self_attn; encoder_attn_layer_norm, encoder_attn; "
          "final_layer_norm, fc1 ... fc2)")
POST_ED = ("post-norm encoder-decoder (self_attn, self_attn_layer_norm; encoder_attn, encoder_attn_layer_norm; "
           "fc1 ... fc2, final_layer_norm)")
PRE_ED_MOE = ("pre-norm encoder-decoder (self_attn_layer_norm, self_attn; cross_attention_layer_norm, "
              "cross_attention; ff_layer_norm, ffn)")
# Encoder-decoder types recognized by structure, with the layout read from their layers' forward pass.
SEQ2SEQ_EXPECTED = {"marian": POST_ED, "blenderbot-small": POST_ED, "mvp": POST_ED, "led": POST_ED, "fsmt": POST_ED,
                    "pegasus": PRE_ED, "blenderbot": PRE_ED, "m2m_100": PRE_ED, "bigbird_pegasus": PRE_ED,
                    "speech_to_text": PRE_ED, "nllb-moe": PRE_ED_MOE}
SEQ2SEQ_EXTRA: dict[str, dict[str, Any]] = {
    "led": {"attention_window": 4, "max_encoder_position_embeddings": 64, "max_decoder_position_embeddings": 64},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "fsmt": {"src_vocab_size": VOCAB, "tgt_vocab_size": VOCAB, "langs": ["en", "de"]},  # time-major layers
    # every second layer a mixture of experts: each stack has a dense and a sparse feed-forward block
    "nllb-moe": {"num_experts": 4, "expert_capacity": 16, "encoder_sparse_step": 2, "decoder_sparse_step": 2},
    # speech frames in (the structure check's dummy batch gives them too), through two strided convolutions
    "speech_to_text": {"input_feat_per_channel": 8, "input_channels": 1, "conv_channels": 16,
                       "max_source_positions": 64, "max_target_positions": 64},
}


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("model_type", list(SEQ2SEQ_EXPECTED))
def test_encoder_decoder_layers_are_recognized_by_structure(model_type: str, placement: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           launches: Any) -> None:
    """Both stacks are found and checked; the decoder's layers get a site after cross-attention, which
    holds an adapter with ``cross_adapter=True``."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no config class for {model_type!r}")
    config = AutoConfig.for_model(model_type, **SEQ2SEQ, **SEQ2SEQ_EXTRA.get(model_type, {}))
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager").eval()
    check_against_hand(model, placement, SEQ2SEQ_EXPECTED[model_type], monkeypatch, launches, seq2seq=True)


VIT = "pre-norm ViT-style layer (layernorm_before, attention; layernorm_after, intermediate, output: dense, dropout)"
VIT_MLP = "pre-norm layer (layernorm_before, attention; layernorm_after, mlp)"  # ViT's layout on transformers 5
SCALED = "pre-norm layer with layer scale (norm1, attention, layer_scale1; norm2, mlp, layer_scale2)"
CLIP_LIKE = "pre-norm layer (layer_norm1, self_attn; layer_norm2, mlp)"
SPEECH_POST = "post-norm speech encoder layer (attention, layer_norm; feed_forward, final_layer_norm)"
SPEECH_PRE = "pre-norm speech encoder layer (layer_norm, attention; final_layer_norm, feed_forward)"
IMAGE = {"image_size": 32, "patch_size": 8}
AUDIO = {"conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_conv_pos_embeddings": 4,
         "num_conv_pos_embedding_groups": 2}
# Vision and audio encoders recognized by structure: (model type, config overrides, the layout it must get)
SIGNALS: dict[str, tuple[str, dict[str, Any], str]] = {
    **{t: (t, IMAGE, VIT) for t in ("deit", "vit_mae", "vit_msn", "ijepa", "dpt")},
    "vivit": ("vivit", {**IMAGE, "num_frames": 4, "tubelet_size": [2, 8, 8]}, VIT),
    "videomae": ("videomae", {**IMAGE, "num_frames": 4, "tubelet_size": 2}, VIT),
    "audio-spectrogram-transformer": ("audio-spectrogram-transformer", {"max_length": 32, "num_mel_bins": 16,
                                                                        "frequency_stride": 8, "time_stride": 8}, VIT),
    "dinov2": ("dinov2", IMAGE, SCALED),
    "dinov2_with_registers": ("dinov2_with_registers", IMAGE, SCALED),
    "siglip_vision_model": ("siglip_vision_model", IMAGE, CLIP_LIKE),
    "idefics3_vision": ("idefics3_vision", IMAGE, CLIP_LIKE),
    "aimv2_vision_model": ("aimv2_vision_model", IMAGE, "pre-norm layer (rms_norm1, attention; rms_norm2, ffn)"),
    "pixtral": ("pixtral", {**IMAGE, "head_dim": 16},
                "pre-norm layer (attention_norm, attention; ffn_norm, feed_forward)"),
    **{t: (t, AUDIO, SPEECH_POST) for t in ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "sew", "unispeech",
                                            "unispeech-sat")},
    "wav2vec2-stable-layer-norm": ("wav2vec2", {**AUDIO, "do_stable_layer_norm": True}, SPEECH_PRE),
}


def signal_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two random images, videos, spectrograms or raw audio clips for ``model``'s main input."""
    config, generator = model.config, torch.Generator().manual_seed(1)
    if "pixel_values" in inspect.signature(model.forward).parameters:
        frames = (config.num_frames,) if hasattr(config, "num_frames") else ()
        batch = {"pixel_values": torch.randn(2, *frames, 3, 32, 32, generator=generator)}
        if config.model_type == "vit_mae":  # the random masking, fixed
            batch["noise"] = torch.rand(2, 16, generator=generator)
        return batch
    if hasattr(config, "conv_kernel"):  # raw audio through the convolutional feature encoder
        return {"input_values": torch.randn(2, 400, generator=generator)}
    return {"input_values": torch.randn(2, config.max_length, config.num_mel_bins, generator=generator)}


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", list(SIGNALS))
def test_vision_and_audio_encoders_are_recognized_by_structure(name: str, placement: str,
                                                               monkeypatch: pytest.MonkeyPatch, launches: Any) -> None:
    """Their dummy batch is an image, a video, a spectrogram or a raw audio clip, of the config's shape."""
    model_type, overrides, expected = SIGNALS[name]
    model = build(model_type, **overrides)
    layer = find_layers(model.base_model, LAYERS)[0][1][0]
    if expected == VIT and hasattr(layer, "mlp"):
        expected = VIT_MLP
    check_against_hand(model, placement, expected, monkeypatch, launches, batch=signal_inputs(model))


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_get_their_own_layout(variant: str, placement: str, monkeypatch: pytest.MonkeyPatch,
                                              launches: Any) -> None:
    model_type, overrides, layout = VARIANTS[variant]
    check_against_hand(build(model_type, **overrides), placement, layout, monkeypatch, launches)


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_layers_combined_differently_are_refused(model_type: str) -> None:
    model = build(model_type, **REFUSED[model_type])
    layer = type(find_layers(model.base_model, LAYERS)[0][1][0]).__name__
    with pytest.raises(ValueError, match=rf"model type '{model_type}' is not supported; supported model types: .*"
                                         rf"Such a model is not recognized: its layer class {layer} matches no known "
                                         rf"layout on a forward pass \(as a .*\)"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model.base_model, "fused_adapters")


def test_encoder_layers_with_a_second_stream_are_refused() -> None:
    """PEGASUS-X's encoder layers run fc2 for the tokens and again for the global tokens: no candidate
    fits, and the reasons say so."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "pegasus_x" not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no config class for 'pegasus_x'")
    config = AutoConfig.for_model("pegasus_x", **SEQ2SEQ, block_size=4, num_global_tokens=2)
    model = AutoModel.from_config(config).eval()
    with pytest.raises(ValueError, match=r"model type 'pegasus_x' is not supported.*its layer class "
                                         r"PegasusXEncoderLayer matches no known layout on a forward pass .*"
                                         r"encoder.layers: in layer 0, fc2 ran 2 times in 1 calls"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model.base_model, "fused_adapters")


def test_recognition_runs_once_per_model_and_survives_copies() -> None:
    model = build("olmo")
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    add_adapter(model, "a", "pfeiffer")
    add_adapter(model, "b", "houlsby")
    assert len(forwards) == 1  # the check's dummy batch, once
    assert model.training is False
    copied = copy.deepcopy(model)
    forwards.clear()
    add_adapter(copied, "c", "houlsby")
    assert forwards == []


def test_tested_types_are_listed() -> None:
    assert set(STRUCTURALLY_TESTED_MODEL_TYPES) == {*MODEL_TYPES, *SEQ2SEQ_EXPECTED,
                                                    *(model_type for model_type, _, _ in SIGNALS.values())}


class _Mystery(nn.Module):
    def __init__(self, layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", hidden_size=8, vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([layer(), layer()])

    def forward(self, input_ids: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if x is None else x
        for layer in self.layers:
            x = layer(x)
        return x


def test_unrecognized_layer_is_refused() -> None:
    model = _Mystery(lambda: nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"model type 'mystery' is not supported; supported model types: .*"
                                         r"Such a model is not recognized: its layer class Linear has the modules of "
                                         r"no known layout; describe its layers with "
                                         r"adapter_fused.register_model_layout"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")


def test_encoder_of_an_unrecognized_encoder_decoder_is_not_taken_alone() -> None:
    """Layers under ``encoder`` that a one-stack layout would fit are not adapted when the model also has
    a decoder no layout describes: the error says why."""
    class _Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(model_type="pair", hidden_size=8, vocab_size=16)
            self.encoder = _Mystery(_SkipsNorm)
            self.decoder = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(input_ids))

    model = _Pair()
    with pytest.raises(ValueError, match=r"the layers of its encoder \(_SkipsNorm\) and of its decoder match no "
                                         r"layout of both, and adapters in the encoder alone would leave out "
                                         r"the decoder; describe its layers"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")
    add_adapter(model.encoder, "a", "pfeiffer")  # the encoder alone, asked for, is recognized
    assert model_layers(model.encoder)[0].name == "parallel block (input_layernorm, self_attn and mlp)"


def test_one_tower_of_a_two_tower_model_is_not_taken_alone() -> None:
    """SigLIP's vision tower alone is recognized (see SIGNALS); the two-tower model is refused rather
    than adapted in its vision tower only."""
    from transformers import AutoConfig, AutoModel

    tower = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    config = AutoConfig.for_model("siglip", text_config={**tower, "vocab_size": VOCAB},
                                  vision_config={**tower, **IMAGE})
    model = AutoModel.from_config(config).eval()
    with pytest.raises(ValueError, match=r"the layers of its vision_model \(SiglipEncoderLayer\) and of its "
                                         r"text_model match no layout of both, and adapters in the vision_model "
                                         r"alone would leave out the text_model"):
        add_adapter(model, "a", "houlsby")
    assert not hasattr(model.base_model, "fused_adapters")


class _SkipsNorm(nn.Module):
    """Llama's modules, but the feed-forward block reads the attention output without running
    ``post_attention_layernorm``."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(8)
        self.self_attn = nn.Linear(8, 8)
        self.post_attention_layernorm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class _ScalesMlp(_SkipsNorm):
    """Llama's modules and order, but the feed-forward output is halved before the residual add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + 0.5 * self.mlp(self.post_attention_layernorm(x))


class _Pictures(_Mystery):
    """Llama-like layers in a model that reads only images: the check's dummy batch cannot run it."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x=pixel_values.flatten(1, 2))


def test_model_the_dummy_batch_cannot_run_is_refused_with_the_reason() -> None:
    model = _Pictures(_ScalesMlp)
    with pytest.raises(ValueError, match=r"a forward pass of the base model on a dummy batch \(of input_ids\), run to "
                                         r"check the layout, failed \(TypeError: .*input_ids.*\); describe its layers"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")


def test_layer_that_combines_differently_is_refused_on_the_forward_pass() -> None:
    model = _Mystery(_ScalesMlp)
    with pytest.raises(ValueError, match=r"its layer class _ScalesMlp matches no known layout on a forward pass "
                                         r"\(as a pre-norm layer \(input_layernorm, self_attn; post_attention_layernorm, "
                                         r"mlp\): the layer output is not mlp output \+ residual \(off by .*; as a "
                                         r"parallel block"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")


class _Hybrid(_SkipsNorm):
    """Llama's layer whose token mixer is ``self_attn`` or, with ``linear``, ``linear_attn`` (Qwen3-Next's
    names); the feed-forward output is multiplied by ``scale`` before the residual add."""

    def __init__(self, linear: bool, scale: float = 1.0) -> None:
        super().__init__()
        if linear:
            self.linear_attn = self.self_attn
            del self.self_attn
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self.linear_attn if hasattr(self, "linear_attn") else self.self_attn
        x = x + mixer(self.input_layernorm(x))
        return x + self.scale * self.mlp(self.post_attention_layernorm(x))


def test_hybrid_layers_are_checked_in_each_kind() -> None:
    """A layer lacking a candidate's token mixer fails that candidate (its module ran 0 times); the hybrid
    candidate checks the sums in the first layer of each kind, so a linear-attention layer that scales its
    feed-forward output is refused although the first layer fits."""
    model = _Mystery(iter([_Hybrid(False), _Hybrid(True, scale=0.5)]).__next__)
    with pytest.raises(ValueError, match=r"as a pre-norm layer \(input_layernorm, self_attn; post_attention_layernorm, "
                                         r"mlp\): in layer 1, self_attn ran 0 times in 1 calls; .*as a pre-norm hybrid "
                                         r"layer \(input_layernorm, self_attn or linear_attn; post_attention_layernorm, "
                                         r"mlp\): in layer 1, the layer output is not mlp output \+ residual \(off by"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")
    model = _Mystery(iter([_Hybrid(True), _Hybrid(False)]).__next__)
    add_adapter(model, "a", "pfeiffer")
    assert [layer.attention.output for layer in model_layers(model)[1]] == ["linear_attn", "self_attn"]


def test_layer_whose_residual_sums_fit_a_parallel_block_gets_its_sites() -> None:
    """``x = x + attn(n1(x)); x + mlp(x)`` never runs ``post_attention_layernorm``, so the sequential layout
    fails; the single-norm parallel layout's sums (feed-forward residual = input + attention output) hold,
    and are the right ones for this layer."""
    model = _Mystery(_SkipsNorm)
    reference = copy.deepcopy(model).double()
    add_adapter(model, "a", "pfeiffer")
    arch, _ = model_layers(model)
    assert arch.name == "parallel block (input_layernorm, self_attn and mlp)"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(ids)
        randomize(model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        out = model(ids)
        config = hf_model.adapter_config(model, "a")
        x = reference.embed(ids)
        for index, ref in enumerate(reference.layers):
            w = {k: v.double() for k, v in model.fused_adapters["a"][str(index)]["ffn"].state_dict().items()}
            x = x + ref.self_attn(ref.input_layernorm(x))
            h = ref.mlp(x)
            z = h + x
            f = F.linear(ACTIVATIONS[config.resolved_activation](F.linear(z, w["down.weight"], w["down.bias"])),
                         w["up.weight"], w["up.bias"])
            x = x + h + config.scale * f
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, x.float(), rtol=1e-4, atol=1e-4)


class _Registered(_Mystery):
    pass


def test_uncaptured_residual_raises_instead_of_computing_wrong_numbers() -> None:
    """A described (registered) layout is not checked on a forward pass; a site whose residual module
    did not run raises at the call instead."""
    register_model_layout(_Registered, ModelLayout(
        "layers", SiteSpec("self_attn", "input_layernorm", 0, ("input",)),
        SiteSpec("mlp", "post_attention_layernorm", 0, ("input",))))
    try:
        model = _Registered(_SkipsNorm)
        x = torch.randn(2, 3, 8)
        add_adapter(model, "a", "pfeiffer")  # reads the residual x at the feed-forward site
        add_adapter(model, "b", "houlsby")  # needs no residual
        randomize(model.fused_adapters.parameters())
        base = model(x=x)
        set_active_adapters(model, "b")
        assert (model(x=x) - base).abs().max() > 1e-2
        set_active_adapters(model, "a")
        with pytest.raises(RuntimeError, match="residual of this site was not captured"):
            model(x=x)
        set_active_adapters(model, None)
        assert torch.equal(model(x=x), base)
    finally:
        unregister_model_layout(_Registered)


def test_meta_device_model_gets_the_first_matching_layout_with_a_warning() -> None:
    """Parameters on the meta device cannot run the check: the first candidate whose modules exist is
    taken, and a warning says so (and names it)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("olmo", **COMMON)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    with pytest.warns(UserWarning, match=rf"on the meta device, so its layers cannot be checked on a forward pass; "
                                         rf"assuming the {re.escape(PRE)}"):
        arch, layers = model_layers(model)
    assert arch.name == PRE and len(layers) == 2
