"""Invertible adapters (MAD-X): a NICE coupling block on the embedding output, its inverse before the
output embeddings.

For embeddings e (..., d) split into e1 = e[..., :d1] and e2 = e[..., d1:] (d1 = d // 2):

    forward:  y1 = e1 + F(e2)          y2 = e2 + G(y1)          -> cat(y1, y2)
    inverse:  x2 = y2 - G(y1)          x1 = y1 - F(x2)          -> cat(x1, x2)

F and G are bottleneck MLPs ``Linear -> activation -> Linear`` of width ``int(n_in // reduction_factor)``
(F: d - d1 -> d1, G: d1 -> d - d1), as in AdapterHub's ``NICECouplingBlock``, whose parameter names
(``F.0.weight``, ``F.2.bias``, ...) they keep. With d even each half-step is one fused kernel launch
(input one half, residual the other, scale +1 or -1); with d odd it runs in plain PyTorch.

The forward block runs on the output of the model's embedding module (AdapterHub's hook point:
``embeddings`` for BERT, RoBERTa and DistilBERT, ``drop`` for GPT-2, ``embed_tokens`` for Llama-like
models), the inverse on the input of ``model.get_output_embeddings()`` when the model has one (where
AdapterHub's language-modelling heads run it), both only while the adapter is active.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ACTIVATIONS
from ..ops import fused_adapter
from .layouts import embedding_module


class _Activation(nn.Module):
    """An activation of ``adapter_fused.ACTIVATIONS`` as a module (no parameters)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)


def _subnet(n_in: int, n_out: int, reduction_factor: float, activation: str, **kw: Any) -> nn.Sequential:
    width = int(n_in // reduction_factor)
    if width < 1:
        raise ValueError(f"invertible adapter: inv_adapter_reduction_factor {reduction_factor} leaves no width for "
                         f"an input of {n_in} channels")
    return nn.Sequential(nn.Linear(n_in, width, **kw), _Activation(activation), nn.Linear(width, n_out, **kw))


class NiceCoupling(nn.Module):
    """The NICE coupling block: ``module(e, rev=False)``, e (..., d) -> (..., d); see the module docstring."""

    def __init__(self, d_model: int, reduction_factor: float, activation: str, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if d_model < 2:
            raise ValueError(f"invertible adapter: needs a hidden size of at least 2, got {d_model}")
        self.split = d_model // 2
        rest = d_model - self.split
        kw = {"device": device, "dtype": dtype}
        self.F = _subnet(rest, self.split, reduction_factor, activation, **kw)
        self.G = _subnet(self.split, rest, reduction_factor, activation, **kw)
        self.activation = activation
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights normal (std 0.02), biases zero (AdapterHub's initialisation)."""
        for net in (self.F, self.G):
            for layer in (net[0], net[2]):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def _step(self, net: nn.Sequential, z: torch.Tensor, residual: torch.Tensor, sign: float) -> torch.Tensor:
        """``residual + sign * net(z)``."""
        down, up = net[0], net[2]
        if z.shape == residual.shape:
            return fused_adapter(z, down.weight, down.bias, up.weight, up.bias, self.activation, sign,
                                 residual=residual)
        out = up(ACTIVATIONS[self.activation](down(z)))
        return residual + out if sign > 0 else residual - out

    def forward(self, e: torch.Tensor, rev: bool = False) -> torch.Tensor:
        a, b = e[..., :self.split], e[..., self.split:]
        if not rev:
            y1 = self._step(self.F, b, a, 1.0)
            return torch.cat((y1, self._step(self.G, y1, b, 1.0)), -1)
        x2 = self._step(self.G, a, b, -1.0)
        return torch.cat((self._step(self.F, x2, a, -1.0), x2), -1)


class InvertibleHook:
    """Forward hook on the embedding module (``rev=False``) or forward pre-hook on the output
    embeddings (``rev=True``): runs the active adapter's ``invertible`` block, if it has one."""

    def __init__(self, state: Any, rev: bool) -> None:
        self.state = state
        self.rev = rev

    def _block(self) -> nn.Module | None:
        state = self.state
        call = state.call
        if call.batch is not None or state.active is None:
            return None
        modules = state.adapters_of_call(call)[state.active]
        return modules._modules.get("invertible")

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any = None) -> Any:
        block = self._block()
        if block is None:
            return None
        if self.rev:
            return (block(args[0], rev=True), *args[1:])
        if isinstance(output, tuple):
            return (block(output[0]), *output[1:])
        return block(output)


def hook_invertible(model: nn.Module, state: Any) -> None:
    """Register the two ``InvertibleHook``s of ``model`` (once per model)."""
    if state.__dict__.get("invertible_hooked"):
        return
    embeddings = embedding_module(state.base, state.arch.name)
    handles = [embeddings.register_forward_hook(InvertibleHook(state, rev=False))]
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(output, nn.Module):
        handles.append(output.register_forward_pre_hook(InvertibleHook(state, rev=True)))
    state.handles.extend(handles)
    state.__dict__["invertible_hooked"] = True
