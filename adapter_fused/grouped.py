"""Many adapters in one batch: each row (token or sequence) picks its adapter from a stacked bank,
all in the launches one adapter would take."""

import math
from typing import Any

import torch

from .ops import KERNEL_DTYPES, _kernels, kernels_available
from .reference import reference_adapter_grouped
from .validation import check_adapter_args

_FN = "fused_adapter_grouped"


def index_layout(x: torch.Tensor, index: object) -> tuple[torch.Tensor, int]:
    """Check ``index`` against x (..., d); return it as a 1-D tensor and the rows each entry covers.

    Per token: index.shape == x.shape[:-1]. Per sequence: index.shape == (x.shape[0],) and each entry
    covers the x.shape[1:-1] rows of its sequence.
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{_FN}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{_FN}: index must be an integer tensor, got dtype {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"{_FN}: index is on {index.device} but x is on {x.device}; put them on one device")
    lead = tuple(x.shape[:-1])
    if tuple(index.shape) == lead:
        return index.reshape(-1), 1
    if x.dim() >= 2 and tuple(index.shape) == (x.shape[0],):
        return index, max(1, math.prod(lead[1:]))
    raise ValueError(f"{_FN}: index must have shape x.shape[:-1] = {lead} (one adapter per token) or "
                     f"(x.shape[0],) = {(x.shape[0],) if x.dim() >= 2 else '(n/a for 1-D x)'} (one per sequence), "
                     f"got {tuple(index.shape)}")


def check_index_values(index: torch.Tensor, n_adapters: int) -> None:
    """ValueError unless every entry lies in [-1, n_adapters) (reads the values: a device sync)."""
    if index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < -1 or hi >= n_adapters:
        raise ValueError(f"{_FN}: index values must lie in [-1, {n_adapters}) (-1: no adapter), "
                         f"got min {lo} and max {hi}")


class _GroupedFunction(torch.autograd.Function):
    """Autograd around the grouped kernels. x (M, d), index 1-D; see ``fused_adapter_grouped``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        index: torch.Tensor,
        rows_per_index: int,
        down_weight: torch.Tensor,
        down_bias: torch.Tensor | None,
        up_weight: torch.Tensor,
        up_bias: torch.Tensor | None,
        activation: str,
        scale: float,
        save_h: bool,
    ) -> torch.Tensor:
        kernels = _kernels()
        assert kernels is not None
        code = kernels.ACTIVATION_CODES[activation]
        fixed = torch.are_deterministic_algorithms_enabled()
        y, h = kernels.adapter_forward(x, down_weight, down_bias, up_weight, up_bias, code, scale, save_h, fixed,
                                       index=index, rows_per_index=rows_per_index)
        if save_h:
            ctx.save_for_backward(x, h, index, down_weight, up_weight)
        ctx.code, ctx.scale, ctx.rows_per_index = code, scale, rows_per_index
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, h, index, down_weight, up_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        kernels = _kernels()
        assert kernels is not None
        dx, d_down_w, d_down_b, d_up_w, d_up_b = kernels.adapter_backward(
            grad, x, h, down_weight, up_weight, ctx.code, ctx.scale,
            need_x=need[0], need_down_weight=need[3], need_down_bias=need[4],
            need_up_weight=need[5], need_up_bias=need[6],
            fixed_config=torch.are_deterministic_algorithms_enabled(),
            index=index, rows_per_index=ctx.rows_per_index,
        )
        return dx, None, None, d_down_w, d_down_b, d_up_w, d_up_b, None, None, None


def fused_adapter_grouped(
    x: torch.Tensor,
    index: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scale: float = 1.0,
    *,
    check_index: bool = True,
) -> torch.Tensor:
    """Apply a different adapter to each row of one batch, in the launches a single adapter takes.

    Shapes: x (..., d); parameters stacked over n adapters: down_weight (n, r, d), down_bias (n, r)
    or None, up_weight (n, d, r), up_bias (n, d) or None. ``index`` is an integer tensor of shape
    x.shape[:-1] (one adapter per token) or (x.shape[0],) (one per sequence); -1 leaves the row
    unchanged. Row m of the result is ``x[m] + scale * (act(x[m] @ W_down[k].T + b_down[k]) @
    W_up[k].T + b_up[k])`` with k its index. Differentiable in x and every parameter; adapter k's
    gradients come from its rows only. Returns a contiguous tensor shaped like x.

    ``check_index`` reads the index values to refuse any outside [-1, n) before launching (a device
    sync); turn it off only for an index built correct by construction (e.g. inside a CUDA graph).
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    act, scale_f = check_adapter_args(_FN, x, down_weight, down_bias, up_weight, up_bias, activation, scale,
                                      same_dtype=not autocast, stacked=True)
    rows_index, rows_per_index = index_layout(x, index)
    n = down_weight.shape[0]
    if check_index:
        check_index_values(index, n)
    if autocast:
        compute = torch.get_autocast_dtype(x.device.type)
        down_weight, up_weight = down_weight.to(compute), up_weight.to(compute)
        down_bias = down_bias.to(compute) if down_bias is not None else None
        up_bias = up_bias.to(compute) if up_bias is not None else None
        x = x.to(torch.promote_types(x.dtype, compute))
    if down_weight.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES or not kernels_available(x.device):
        with torch.autocast(x.device.type, enabled=False):
            return reference_adapter_grouped(x, index, down_weight, down_bias, up_weight, up_bias, act, scale_f)
    params = (down_weight, down_bias, up_weight, up_bias)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    with torch.autocast(x.device.type, enabled=False):
        y = _GroupedFunction.apply(x.reshape(-1, x.shape[-1]), rows_index, rows_per_index, *params, act, scale_f, save_h)
    return y.view(x.shape)
