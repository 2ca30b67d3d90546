"""Many adapters in one batch: each row (token or sequence) picks its adapter from a stacked bank,
all in the launches one adapter would take."""

import math

import torch

from .ops import checked_call, run_kernels
from .reference import reference_adapter_grouped

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
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a different adapter to each row of one batch, in the launches a single adapter takes.

    Shapes: x (..., d); parameters stacked over n adapters: down_weight (n, r, d), down_bias (n, r)
    or None, up_weight (n, d, r), up_bias (n, d) or None. ``index`` is an integer tensor of shape
    x.shape[:-1] (one adapter per token) or (x.shape[0],) (one per sequence); -1 leaves the row
    unchanged. Row m of the result is ``x[m] + scale * (act(x[m] @ W_down[k].T + b_down[k]) @
    W_up[k].T + b_up[k])`` with k its index (``residual[m]`` in place of ``x[m]`` when a residual
    shaped like x is given; rows with index -1 then get ``residual[m]``). Differentiable in x and
    every parameter; adapter k's gradients come from its rows only. Returns a contiguous tensor
    shaped like x.

    ``check_index`` reads the index values to refuse any outside [-1, n) before launching (a device
    sync); turn it off only for an index built correct by construction (e.g. inside a CUDA graph).
    """
    x, params, act, scale_f, use_kernels, residual = checked_call(
        _FN, x, (down_weight, down_bias, up_weight, up_bias), activation, scale, stacked=True, residual=residual)
    rows_index, rows_per_index = index_layout(x, index)
    if check_index:
        check_index_values(index, params[0].shape[0])
    if not use_kernels and not torch.compiler.is_exporting():  # under the caller's autocast, if any
        return reference_adapter_grouped(x, index, *params, act, scale_f, residual=residual)
    return run_kernels(x, params, act, scale_f, rows_index, rows_per_index, residual)
