"""The fused adapter op: dispatch, autocast, and the autograd.Function around the Triton kernels.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were first imported, and the
reference otherwise. float64 (and any dtype or device the kernels do not cover) runs the reference.
"""

import functools
from types import ModuleType
from typing import Any

import torch

from .reference import reference_adapter
from .validation import check_adapter_args

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton kernels module, imported on first use (None where Triton is not installed)."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def kernels_available(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels (on the GPU or in the interpreter)."""
    kernels = _kernels()
    if kernels is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(kernels.INTERPRET)


class _FusedAdapterFunction(torch.autograd.Function):
    """Autograd around the kernels. Inputs are 2-D views: x (M, d); see ``fused_adapter``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
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
        y, h = kernels.adapter_forward(x, down_weight, down_bias, up_weight, up_bias, code, scale, save_h, fixed)
        if save_h:
            ctx.save_for_backward(x, h, down_weight, up_weight)
        ctx.code = code
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, h, down_weight, up_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        kernels = _kernels()
        assert kernels is not None
        dx, d_down_w, d_down_b, d_up_w, d_up_b = kernels.adapter_backward(
            grad, x, h, down_weight, up_weight, ctx.code, ctx.scale,
            need_x=need[0], need_down_weight=need[1], need_down_bias=need[2],
            need_up_weight=need[3], need_up_bias=need[4],
            fixed_config=torch.are_deterministic_algorithms_enabled(),
        )
        return dx, d_down_w, d_down_b, d_up_w, d_up_b, None, None, None


def fused_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scale: float = 1.0,
) -> torch.Tensor:
    """A bottleneck adapter in one fused pass:
    ``y = x + scale * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)``.

    Shapes (nn.Linear layout): x (..., d) with any leading dims and strides; down_weight (r, d);
    down_bias (r,) or None; up_weight (d, r); up_bias (d,) or None. Returns a contiguous tensor
    shaped like x. x and the parameters share a dtype (fp32, fp16 or bf16 run the kernels);
    under ``torch.autocast`` the projections run in the autocast dtype, as ``F.linear`` would, and
    the residual is added in x's dtype. Differentiable in x and every parameter.

    Raises TypeError/ValueError naming the offending argument before anything is launched.
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    act, scale_f = check_adapter_args(
        "fused_adapter", x, down_weight, down_bias, up_weight, up_bias, activation, scale, same_dtype=not autocast,
    )
    if autocast:
        compute = torch.get_autocast_dtype(x.device.type)
        down_weight, up_weight = down_weight.to(compute), up_weight.to(compute)
        down_bias = down_bias.to(compute) if down_bias is not None else None
        up_bias = up_bias.to(compute) if up_bias is not None else None
        x = x.to(torch.promote_types(x.dtype, compute))
    if down_weight.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES or not kernels_available(x.device):
        with torch.autocast(x.device.type, enabled=False):
            return reference_adapter(x, down_weight, down_bias, up_weight, up_bias, act, scale_f)

    d = down_weight.shape[1]
    params = (down_weight, down_bias, up_weight, up_bias)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    with torch.autocast(x.device.type, enabled=False):
        y = _FusedAdapterFunction.apply(x.reshape(-1, d), *params, act, scale_f, save_h)
    return y.view(x.shape)


