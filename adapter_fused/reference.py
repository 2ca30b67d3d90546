"""The plain-PyTorch adapter: the library's ground truth and its fallback on machines without Triton."""

import math

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .validation import check_adapter_args


def reference_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scale: float = 1.0,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + scale * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)`` with eager ops
    (``residual + ...`` when a residual shaped like x is given).

    Shapes: x (..., d); down_weight (r, d); down_bias (r,) or None; up_weight (d, r);
    up_bias (d,) or None. Returns a tensor shaped like x. Differentiable by autograd, any float dtype,
    any device; under autocast it follows ``F.linear``.
    """
    act, scale_f = check_adapter_args(
        "reference_adapter", x, down_weight, down_bias, up_weight, up_bias, activation, scale,
        same_dtype=not torch.is_autocast_enabled(x.device.type), residual=residual,
    )
    return adapter_math(x, down_weight, down_bias, up_weight, up_bias, act, scale_f, residual)


def adapter_math(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
    scale: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``reference_adapter`` without its argument checks, for callers that checked them already."""
    hidden = ACTIVATIONS[activation](F.linear(x, down_weight, down_bias))
    out = F.linear(hidden, up_weight, up_bias)
    base = x if residual is None else residual
    return base + out if scale == 1.0 else torch.add(base, out, alpha=scale)


RowWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]
"""Each row's adapter weights, gathered: W_down^T (B, d, r), b_down (B, 1, r) or None, W_up^T (B, r, d),
b_up (B, 1, d) or None, and whether the row has an adapter, (B, 1, 1) bool."""


def gather_rows(index: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                up_weight: torch.Tensor, up_bias: torch.Tensor | None) -> RowWeights:
    """The weights of row b's adapter ``index[b]`` (B,) from parameters stacked over n adapters
    (down_weight (n, r, d), down_bias (n, r) or None, up_weight (n, d, r), up_bias (n, d) or None)."""
    keep = index.clamp(min=0)
    return (down_weight.index_select(0, keep).transpose(1, 2),
            None if down_bias is None else down_bias.index_select(0, keep).unsqueeze(1),
            up_weight.index_select(0, keep).transpose(1, 2),
            None if up_bias is None else up_bias.index_select(0, keep).unsqueeze(1),
            (index >= 0).view(-1, 1, 1))


def rows_math(x: torch.Tensor, rows: RowWeights, activation: str, scale: float,
              residual: torch.Tensor | None) -> torch.Tensor:
    """The grouped adapter as a fixed sequence of plain operators (no loop over adapters, no reading of
    the index's values): two batched matrix products with each row's gathered weights (``gather_rows``),
    then rows without an adapter take the residual. x (B, S, d): row b's S tokens use its adapter;
    residual (B, S, d) or None (x)."""
    down, down_bias, up, up_bias, present = rows
    hidden = x @ down if down_bias is None else torch.baddbmm(down_bias, x, down)
    hidden = ACTIVATIONS[activation](hidden)
    out = hidden @ up if up_bias is None else torch.baddbmm(up_bias, hidden, up)
    base = x if residual is None else residual
    out = base + out if scale == 1.0 else torch.add(base, out, alpha=scale)
    return torch.where(present, out, base)


def reference_adapter_grouped(
    x: torch.Tensor,
    index: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scale: float = 1.0,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped adapter with eager ops, one adapter at a time: row m of x (..., d) goes through
    adapter ``index`` (-1: unchanged; the residual's row when a residual shaped like x is given). Parameters stacked over n adapters: down_weight (n, r, d),
    down_bias (n, r) or None, up_weight (n, d, r), up_bias (n, d) or None. ``index`` has shape
    x.shape[:-1] (per token) or (x.shape[0],) (per sequence); its values are not checked here.
    """
    d = x.shape[-1]
    rows = index.reshape(-1) if index.shape == x.shape[:-1] else index.repeat_interleave(math.prod(x.shape[1:-1]))
    flat = x.reshape(-1, d)
    res = flat if residual is None else residual.reshape(-1, d)
    out = res.clone()
    for k in range(down_weight.shape[0]):
        sel = rows == k
        if bool(sel.any()):
            out[sel] = reference_adapter(
                flat[sel], down_weight[k], None if down_bias is None else down_bias[k],
                up_weight[k], None if up_bias is None else up_bias[k], activation, scale, residual=res[sel],
            )
    return out.view(x.shape)
