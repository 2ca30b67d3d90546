"""Argument checks shared by the fused op and the reference: every mistake is reported before any
kernel launches, naming the argument, what was expected and what was given."""

import math
from numbers import Real

import torch

from .activations import canonical_activation


def check_adapter_args(
    fn: str,
    x: object,
    down_weight: object,
    down_bias: object,
    up_weight: object,
    up_bias: object,
    activation: object,
    scale: object,
    same_dtype: bool = True,
    stacked: bool = False,
    residual: object = None,
) -> tuple[str, float]:
    """Validate an adapter call; return (canonical activation name, scale as float).

    ``same_dtype=False`` (autocast) lets x and the parameters differ in floating dtype, as
    ``F.linear`` does under autocast; everything else is checked the same way. ``stacked``: the
    parameters hold n adapters along a leading dimension (down_weight (n, r, d), and so on).
    ``residual``, when given, must be a tensor shaped like x, on its device, in its dtype.
    """
    given = {"x": x, "down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in given.items():
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        tensors[name] = t

    x_t, down_w = tensors["x"], tensors["down_weight"]
    lead: tuple[int, ...] = ()
    label = ""
    if stacked:
        if down_w.dim() != 3 or down_w.shape[0] < 1:
            raise ValueError(f"{fn}: down_weight must be 3-D (n, r, d) with n >= 1, got shape {tuple(down_w.shape)}")
        lead, label = (down_w.shape[0],), "n, "
    elif down_w.dim() != 2:
        raise ValueError(f"{fn}: down_weight must be 2-D (r, d), got shape {tuple(down_w.shape)}")
    r, d = down_w.shape[-2:]
    if x_t.dim() < 1 or x_t.shape[-1] != d:
        got = x_t.shape[-1] if x_t.dim() else "a 0-d tensor"
        raise ValueError(f"{fn}: x.shape[-1] must equal d = down_weight.shape[-1] = {d}, got {got} "
                         f"(x shape {tuple(x_t.shape)})")
    expected = {"up_weight": (*lead, d, r), "down_bias": (*lead, r), "up_bias": (*lead, d)}
    labels = {"up_weight": f"({label}d, r)", "down_bias": f"({label}r)" if stacked else "(r,)",
              "up_bias": f"({label}d)" if stacked else "(d,)"}
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {labels[name]} = {shape}, got {tuple(tensors[name].shape)}")

    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{fn}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x_t.shape:
            raise ValueError(f"{fn}: residual must have the shape of x {tuple(x_t.shape)}, got {tuple(residual.shape)}")
        tensors["residual"] = residual
    for name, t in tensors.items():
        if t.device != x_t.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x_t.device}; put them on one device")
        if same_dtype and t.dtype != x_t.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but x has dtype {x_t.dtype}; "
                            "x and the adapter parameters must share a dtype (as with F.linear)")

    act = canonical_activation(activation)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"{fn}: scale must be a real number, got {type(scale).__name__}")
    scale_f = float(scale)
    if not math.isfinite(scale_f):
        raise ValueError(f"{fn}: scale must be finite, got {scale_f}")
    return act, scale_f
