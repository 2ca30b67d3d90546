"""The modules adapters are made of: what sits at a site (``site_adapter``: a plain ``FusedAdapter``, or a
``BottleneckAdapter`` for configs with more options) and the invertible adapter (``NiceCoupling``).

``BottleneckAdapter``: a site adapter with AdapterHub's extra bottleneck options around the fused core.

For an adapter input z and a residual (both (..., d)), with t = s * (W_up act(W_down a + b_down) + b_up):

    a = LN_before(z)            if ln_before, else z
    t = dropout(t)              in training mode
    t = g * t                   if use_gating: g = mean over dim 1 of sigmoid(z w_g + b_g), (batch, 1, 1)
    out = LN_after(residual + t)        if ln_after and adapter_residual_before_ln
    out = residual + LN_after(t)        if ln_after otherwise
    out = residual + t                  without ln_after

This is what AdapterHub's ``Adapter.forward`` computes (its ``ParallelAdapter`` is the second form).
The bottleneck always runs in the fused kernel. A learned scale s (a scalar or a vector (d,)) is
folded into the up-projection on each call, ``W_up' = s[:, None] * W_up`` and ``b_up' = s * b_up``,
so it stays in the one launch and autograd carries its gradient. When nothing follows the kernel
(no gating, no ln_after after the residual, no dropout in training) the residual is added in the
kernel too; otherwise the kernel computes t with a residual of zeros that is never materialised.

``NiceCoupling``, the invertible adapter (MAD-X): a NICE coupling block on the embedding output, its inverse
before the output embeddings.

For embeddings e (..., d) split into e1 = e[..., :d1] and e2 = e[..., d1:] (d1 = d // 2):

    forward:  y1 = e1 + F(e2)          y2 = e2 + G(y1)          -> cat(y1, y2)
    inverse:  x2 = y2 - G(y1)          x1 = y1 - F(x2)          -> cat(x1, x2)

F and G are bottleneck MLPs ``Linear -> activation -> Linear`` of width ``int(n_in // reduction_factor)``
(F: d - d1 -> d1, G: d1 -> d - d1), as in AdapterHub's ``NICECouplingBlock``, whose parameter names
(``F.0.weight``, ``F.2.bias``, ...) they keep. With d even each half-step is one fused kernel launch
(input one half, residual the other, scale +1 or -1); with d odd it runs in plain PyTorch.

The forward block runs on the output of the model's embedding module (AdapterHub's hook point:
``embeddings`` for BERT, RoBERTa and DistilBERT, ``drop`` for GPT-2, ``embed_tokens`` for Llama-like
models; see ``layouts.embedding_module``), the inverse on the input of ``model.get_output_embeddings()``
when the model has one (where AdapterHub's language-modelling heads run it), both only while the adapter
is active (``sites.InvertibleHook``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ACTIVATIONS
from ..layer import FusedAdapter
from ..ops import fused_adapter
from .config import AdapterConfig


class BottleneckAdapter(FusedAdapter):
    """A ``FusedAdapter`` (parameters ``down.*``, ``up.*``) with optional extras: ``scaling`` ((1,) or
    (d,), for a learned scale), ``norm_before.*`` / ``norm_after.*`` (LayerNorm(d)), ``gate.*``
    (Linear(d, 1)) and a dropout probability. Called as ``module(z, residual=None)`` like
    ``FusedAdapter``; z (..., d) -> (..., d), the residual defaulting to z. Gating needs z of shape
    (batch, seq, d) (the gate is averaged over dim 1, as AdapterHub does)."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scale: float | str = 1.0,
                 init: str = "bert", *, ln_before: bool = False, ln_after: bool = False,
                 adapter_residual_before_ln: bool = False, use_gating: bool = False, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        learned = isinstance(scale, str)
        if learned and scale not in ("learned", "channel"):
            raise ValueError(f"BottleneckAdapter: scale must be a number, 'learned' or 'channel', got {scale!r}")
        super().__init__(d_model, bottleneck, activation, 1.0 if learned else scale, init, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        self.scaling = (nn.Parameter(torch.ones(1 if scale == "learned" else d_model, **kw)) if learned  # type: ignore[arg-type]
                        else None)
        self.norm_before = nn.LayerNorm(d_model, **kw) if ln_before else None  # type: ignore[arg-type]
        self.norm_after = nn.LayerNorm(d_model, **kw) if ln_after else None  # type: ignore[arg-type]
        self.gate = nn.Linear(d_model, 1, **kw) if use_gating else None  # type: ignore[arg-type]
        self.adapter_residual_before_ln = adapter_residual_before_ln
        self.dropout = nn.Dropout(dropout)
        self._reset_extras()

    @classmethod
    def from_config(cls, config: AdapterConfig, d_model: int, bottleneck: int, *,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BottleneckAdapter:
        """The site adapter of ``config`` with width ``bottleneck``."""
        return cls(d_model, bottleneck, config.resolved_activation, config.scale, config.init,
                   ln_before=config.ln_before, ln_after=config.ln_after,
                   adapter_residual_before_ln=config.adapter_residual_before_ln, use_gating=config.use_gating,
                   dropout=config.dropout, device=device, dtype=dtype)

    @torch.no_grad()
    def _reset_extras(self) -> None:
        if self.scaling is not None:
            self.scaling.fill_(1.0)
        for norm in (self.norm_before, self.norm_after):
            if norm is not None:
                norm.reset_parameters()
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def reset_parameters(self) -> None:
        """Re-initialise the bottleneck (see ``FusedAdapter``), a learned scale to 1, the layer norms
        to the identity and the gate to normal (std 0.02) weights and a zero bias."""
        super().reset_parameters()
        if "gate" in self.__dict__ or "gate" in self._modules:
            self._reset_extras()

    @property
    def unfused_options(self) -> tuple[str, ...]:
        """The steps this adapter computes outside the fused kernel (``"dropout"`` in training only)."""
        out = [name for name, module in (("ln_before", self.norm_before), ("ln_after", self.norm_after),
                                         ("use_gating", self.gate)) if module is not None]
        if self.dropout.p > 0:
            out.append("dropout")
        return tuple(out)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: the adapter input z (..., d_model); residual (..., d_model) or None (z itself)."""
        residual = x if residual is None else residual
        a = self.norm_before(x) if self.norm_before is not None else x
        up_weight, up_bias, scale = self.up.weight, self.up.bias, self.scale
        if self.scaling is not None:
            s = self.scaling.to(up_weight.dtype)
            up_weight = s[:, None] * up_weight
            up_bias = s * up_bias if up_bias is not None else None
            scale = 1.0
        params = (self.down.weight, self.down.bias, up_weight, up_bias)
        dropping = self.training and self.dropout.p > 0
        ln_after_residual = self.norm_after is not None and not self.adapter_residual_before_ln
        if self.gate is None and not dropping and not ln_after_residual:
            out = fused_adapter(a, *params, self.activation, scale, residual=None if residual is a else residual)
            return self.norm_after(out) if self.norm_after is not None else out
        zero = a.new_zeros(()).expand_as(a)
        term = fused_adapter(a, *params, self.activation, scale, residual=zero)
        term = self.dropout(term)
        if self.gate is not None:
            if x.dim() < 2:
                raise ValueError(f"BottleneckAdapter: gating averages over dim 1 and needs input of shape "
                                 f"(batch, seq, d), got {tuple(x.shape)}")
            term = term * torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
        if self.norm_after is None:
            return residual + term
        if self.adapter_residual_before_ln:
            return self.norm_after(residual + term)
        return residual + self.norm_after(term)

    def extra_repr(self) -> str:
        extra = ", ".join(self.unfused_options)
        scale = f", scaling={tuple(self.scaling.shape)}" if self.scaling is not None else ""
        return super().extra_repr() + scale + (f", unfused: {extra}" if extra else "")


def site_adapter(config: AdapterConfig, d_model: int, bottleneck: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> FusedAdapter:
    """The module at one site: a plain ``FusedAdapter`` for plain configs (fully fused), a
    ``BottleneckAdapter`` when ``config`` uses any extra option."""
    if config.plain:
        return FusedAdapter(d_model, bottleneck, config.resolved_activation, float(config.scale), config.init,
                            device=device, dtype=dtype)
    return BottleneckAdapter.from_config(config, d_model, bottleneck, device=device, dtype=dtype)


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
