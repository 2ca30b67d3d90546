"""Adapters take the dtype of their layer's floating-point parameters, also where a layer's first
parameter is a packed integer weight (as in bitsandbytes' quantized layers; tests/hf/test_quantized.py
runs the real ones where bitsandbytes works)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused.hf import add_adapter, train_adapter
from adapter_fused.hf.model import adapter_placement

from .models import make_inputs, make_model

transformers = pytest.importorskip("transformers")


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored as uint8 codes (a frozen integer parameter) with a float
    step, computed in the dtype of its input."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        low, high = weight.min(), weight.max()
        self.codes = nn.Parameter(((weight - low) / (high - low) * 255).round().to(torch.uint8), requires_grad=False)
        self.register_buffer("low", low.to(linear.weight.dtype))
        self.register_buffer("step", ((high - low) / 255).to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.codes.to(x.dtype) * self.step.to(x.dtype) + self.low.to(x.dtype)
        return F.linear(x, weight, self.bias)


def packed_llama() -> nn.Module:
    """A tiny bf16 Llama whose attention projections hold uint8 codes (q_proj first in each layer)."""
    model = make_model("llama").to(torch.bfloat16)
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, PackedLinear(getattr(layer.self_attn, name)))
        assert next(layer.parameters()).dtype == torch.uint8
    return model


def test_adapters_take_the_dtype_of_the_float_parameters() -> None:
    model = packed_llama()
    add_adapter(model, "a", "houlsby")
    train_adapter(model, "a")
    adapters = {n: p for n, p in model.named_parameters() if "fused_adapters.a." in n}
    assert len(adapters) == 16 and {p.dtype for p in adapters.values()} == {torch.bfloat16}
    out = model(**make_inputs(batch=2, length=5)).last_hidden_state
    assert out.dtype == torch.bfloat16
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out.float() * projection.float()).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in adapters.values())


def test_placement_of_a_module_without_float_parameters() -> None:
    packed = nn.Module()
    packed.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)
    model = nn.Sequential(nn.Linear(2, 2, dtype=torch.float16), packed)
    assert adapter_placement(packed, model) == (torch.device("cpu"), torch.float16)  # the model's float dtype
    assert adapter_placement(model, model) == (torch.device("cpu"), torch.float16)
    assert adapter_placement(nn.Identity(), nn.Identity()) == (None, None)
    assert adapter_placement(nn.Identity(), model) == (torch.device("cpu"), torch.float16)
