"""Models recognized by the structure of their layers rather than by model type: exact base outputs
without an active adapter, parity with adapters computed by hand in float64, one hook call per layer
and site, and clear refusals of layers laid out differently."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused import ACTIVATIONS
from adapter_fused.hf import add_adapter, set_active_adapters
from adapter_fused.hf import model as hf_model

from .models import randomize

transformers = pytest.importorskip("transformers")

VOCAB = 101
COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0}
EXTRA: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma": {"head_dim": 16},
    "deepseek_v3": {"first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "moe_intermediate_size": 32, "q_lora_rank": None, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8},
}
MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "gemma", "phi3", "olmo", "olmo2", "granite",
               "granitemoe", "smollm3", "stablelm", "starcoder2", "cohere", "glm", "deepseek_v3")
# Layers that look llama-like at a glance but combine sub-block and residual differently.
NOT_LLAMA_LIKE = {"olmo2": {}, "cohere": {}, "granite": {"residual_multiplier": 0.5},
                  "stablelm": {"use_parallel_residual": True}}


def build(model_type: str, **overrides: Any) -> nn.Module:
    """A tiny random 2-layer base model of ``model_type`` in eval mode; skips when this transformers lacks it."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no config class for {model_type!r}")
    config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="eager").eval()


def inputs() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def layers_of(model: nn.Module) -> nn.ModuleList:
    layers = model.base_model.layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def ffn_name(layer: nn.Module) -> str:
    return "mlp" if isinstance(getattr(layer, "mlp", None), nn.Module) else "block_sparse_moe"


def float64_if_it_runs(model: nn.Module, x: dict[str, torch.Tensor]) -> nn.Module:
    """A float64 copy of ``model``, or a float32 one where its forward does not run in float64 (some
    mixtures of experts mix dtypes or use float32-only grouped matrix products)."""
    reference = copy.deepcopy(model).double()
    try:
        with torch.no_grad():
            reference(**x)
    except RuntimeError:
        reference.float()
    return reference


def hand_adapted(reference: nn.Module, placement: str, weights: dict[str, dict[str, torch.Tensor]], act: str,
                 scale: float) -> None:
    """Replace the ``forward`` of the sub-blocks of ``reference`` (a float64 copy of the base model, whose
    dtype the adapter ``weights`` take)
    by ones that add the adapters by hand: ``h + s f(h)`` (houlsby, both sites) or ``h + s f(h + x)``
    (pfeiffer, feed-forward site), ``x`` being the input of ``post_attention_layernorm``."""
    dtype = next(reference.parameters()).dtype
    weights = {site: {k: v.to(dtype) for k, v in w.items()} for site, w in weights.items()}

    def f(z: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(ACTIVATIONS[act](F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

    def adapted(module: nn.Module, w: dict[str, torch.Tensor], box: dict[str, torch.Tensor] | None) -> Callable:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            new = h + scale * f(h if box is None else h + box.pop("x"), w)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return forward

    def stashing(module: nn.Module, box: dict[str, torch.Tensor]) -> Callable:
        original = module.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            box["x"] = x
            return original(x, *args, **kwargs)
        return forward

    for index, layer in enumerate(layers_of(reference)):
        ffn = getattr(layer, ffn_name(layer))
        if placement == "houlsby":
            layer.self_attn.forward = adapted(layer.self_attn, weights[f"{index}.attention"], None)
            ffn.forward = adapted(ffn, weights[f"{index}.ffn"], None)
        else:
            box: dict[str, torch.Tensor] = {}
            layer.post_attention_layernorm.forward = stashing(layer.post_attention_layernorm, box)
            ffn.forward = adapted(ffn, weights[f"{index}.ffn"], box)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_llama_like_layers_are_recognized(model_type: str, placement: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(model_type)
    if model_type in NOT_LLAMA_LIKE and not NOT_LLAMA_LIKE[model_type]:
        with pytest.raises(ValueError, match="not recognized"):
            add_adapter(model, "a", placement)
        pytest.skip(f"{model_type}: {type(layers_of(model)[0]).__name__} is not laid out like Llama's")
    calls: Counter[tuple[str, str]] = Counter()
    apply = hf_model._Site.apply

    def counting(self: hf_model._Site, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        calls[self.key] += 1
        return apply(self, module, args, output)

    monkeypatch.setattr(hf_model._Site, "apply", counting)
    x = inputs()
    reference = float64_if_it_runs(model, x)
    with torch.no_grad():
        base = model(**x).last_hidden_state
        add_adapter(model, "a", placement)
        assert torch.equal(model(**x).last_hidden_state, base)  # (1) no active adapter: the base model, bit for bit
        randomize(model.base_model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        calls.clear()
        out = model(**x).last_hidden_state
    # (3) one call per layer and site
    assert calls == Counter({(str(i), s): 1 for i in range(2) for s in ("attention", "ffn")})
    # (2) the adapters change the output
    assert (out - base).abs().max() > 1e-2
    # (4) parity with adapters added by hand in float64
    config = hf_model.adapter_config(model, "a")
    weights = {f"{layer}.{site}": {k: v.detach().double() for k, v in module.state_dict().items()}
               for layer, block in model.base_model.fused_adapters["a"].items() for site, module in block.items()}
    assert sorted(weights) == sorted(f"{i}.{s}" for i in range(2) for s in config.layout.sites)
    hand_adapted(reference, placement, weights, config.resolved_activation, config.scale)
    with torch.no_grad():
        expected = reference(**x).last_hidden_state
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", list(NOT_LLAMA_LIKE))
def test_layers_combined_differently_are_refused(model_type: str) -> None:
    model = build(model_type, **NOT_LLAMA_LIKE[model_type])
    layer = type(layers_of(model)[0]).__name__
    with pytest.raises(ValueError, match=rf"model type '{model_type}' is not supported; supported model types: .*"
                                         rf"Such a model is not recognized: its layer class {layer} matches no known "
                                         rf"layout"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model.base_model, "fused_adapters")


class _Mystery(nn.Module):
    def __init__(self, layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", hidden_size=8)
        self.layers = nn.ModuleList([layer(), layer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_unrecognized_layer_is_refused() -> None:
    model = _Mystery(lambda: nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"model type 'mystery' is not supported; supported model types: .*"
                                         r"Such a model is not recognized: its layer class Linear matches no known layout .*lacks self_attn, input_layernorm"):
        add_adapter(model, "a", "pfeiffer")
    assert not hasattr(model, "fused_adapters")


class _SkipsNorm(nn.Module):
    """Llama's modules, but the feed-forward block reads the attention output without running
    ``post_attention_layernorm``: the feed-forward residual is never captured."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(8)
        self.self_attn = nn.Linear(8, 8)
        self.post_attention_layernorm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


def test_uncaptured_residual_raises_instead_of_computing_wrong_numbers() -> None:
    model = _Mystery(_SkipsNorm)
    x = torch.randn(2, 3, 8)
    add_adapter(model, "a", "pfeiffer")  # reads the residual x at the feed-forward site
    add_adapter(model, "b", "houlsby")  # needs no residual
    randomize(model.fused_adapters.parameters())
    base = model(x)
    set_active_adapters(model, "b")
    assert (model(x) - base).abs().max() > 1e-2
    set_active_adapters(model, "a")
    with pytest.raises(RuntimeError, match="residual of this site was not captured"):
        model(x)
    set_active_adapters(model, None)
    assert torch.equal(model(x), base)
