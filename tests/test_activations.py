"""Activation names: every transformers spelling we accept, and nothing else."""

import math

import pytest
import torch

from adapter_fused import ACTIVATIONS
from adapter_fused.activations import canonical_activation

EXPECTED = {
    "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid",
    "leaky_relu": "leaky_relu", "identity": "identity", "linear": "identity",
}


def test_names_and_aliases() -> None:
    assert set(ACTIVATIONS) == set(EXPECTED)
    for name, canonical in EXPECTED.items():
        assert canonical_activation(name) == canonical
        assert ACTIVATIONS[name] is ACTIVATIONS[canonical]


def test_values() -> None:
    h = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    want = {
        "relu": h.clamp_min(0), "gelu": h * cdf, "gelu_tanh": tanh_gelu, "silu": h / (1 + torch.exp(-h)),
        "tanh": torch.tanh(h), "sigmoid": 1 / (1 + torch.exp(-h)), "leaky_relu": torch.where(h < 0, 0.01 * h, h),
        "identity": h,
    }
    for name, value in want.items():
        assert torch.allclose(ACTIVATIONS[name](h), value, atol=1e-15), name


def test_unknown_and_read_only() -> None:
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        canonical_activation("mish")
    with pytest.raises(TypeError):
        ACTIVATIONS["mish"] = torch.tanh  # type: ignore[index]
