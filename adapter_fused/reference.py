"""The plain-PyTorch adapter: the library's ground truth and its fallback on machines without Triton."""

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
) -> torch.Tensor:
    """``x + scale * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)`` with eager ops.

    Shapes: x (..., d); down_weight (r, d); down_bias (r,) or None; up_weight (d, r);
    up_bias (d,) or None. Returns a tensor shaped like x. Differentiable by autograd, any float dtype,
    any device; under autocast it follows ``F.linear``.
    """
    act, scale_f = check_adapter_args(
        "reference_adapter", x, down_weight, down_bias, up_weight, up_bias, activation, scale,
        same_dtype=not torch.is_autocast_enabled(x.device.type),
    )
    hidden = ACTIVATIONS[act](F.linear(x, down_weight, down_bias))
    return x + scale_f * F.linear(hidden, up_weight, up_bias)
