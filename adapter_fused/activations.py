"""Activation names and their PyTorch definitions (the ground truth the kernels are tested against).

Spellings follow transformers' ``ACT2FN``; aliases map to one canonical name per function.
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

LEAKY_RELU_SLOPE = 0.01


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


def _leaky_relu(h: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(h, LEAKY_RELU_SLOPE)


_CANONICAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": _leaky_relu,
    "identity": _identity,
}

_ALIASES: dict[str, str] = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "linear": "identity",
}

ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {**_CANONICAL, **{alias: _CANONICAL[name] for alias, name in _ALIASES.items()}}
)
"""Every accepted activation name (aliases included) mapped to its PyTorch function."""


def canonical_activation(name: object, argument: str = "activation") -> str:
    """The canonical name for ``name`` (e.g. ``"swish"`` -> ``"silu"``); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a string naming an activation, got {type(name).__name__}")
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"{argument}: unknown activation {name!r}; expected one of {', '.join(sorted(ACTIVATIONS))}")
    return _ALIASES.get(key, key)
