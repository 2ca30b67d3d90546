"""Activation functions and their derivatives, evaluated in fp32 inside the kernels.

Each activation has a small integer code (``ACTIVATION_CODES``) passed to the kernels as a
``tl.constexpr``, so every kernel is compiled for exactly one activation and the branch below
costs nothing at run time.

Constants are ``tl.constexpr`` (kernels may only read constexpr globals) and always stand to the
right of a tensor in arithmetic: ``constexpr * tensor`` would wrap the result as a constexpr.

NaN handling follows PyTorch: ``relu(nan) = nan``, which is why the comparisons are written as
``h < 0`` (false for NaN) rather than ``h > 0``.
"""

import triton
import triton.language as tl

ACTIVATION_CODES: dict[str, int] = {
    "identity": 0,
    "relu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "silu": 4,
    "tanh": 5,
    "sigmoid": 6,
    "leaky_relu": 7,
}

LEAKY_RELU_SLOPE = tl.constexpr(0.01)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


@triton.jit
def _tanh(h):
    # tanh(h) = sign(h) * (1 - e) / (1 + e) with e = exp(-2|h|): never overflows.
    e = tl.exp(-2.0 * tl.abs(h))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(h < 0, -t, t)


@triton.jit
def apply_activation(h, ACT: tl.constexpr):
    """act(h) for an fp32 block ``h``."""
    if ACT == 0:
        out = h
    elif ACT == 1:
        out = tl.where(h < 0, 0.0, h)
    elif ACT == 2:
        out = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT_2))
    elif ACT == 3:
        out = 0.5 * h * (1.0 + _tanh((h + h * h * h * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACT == 4:
        out = h * _sigmoid(h)
    elif ACT == 5:
        out = _tanh(h)
    elif ACT == 6:
        out = _sigmoid(h)
    else:
        out = tl.where(h < 0, h * LEAKY_RELU_SLOPE, h)
    return out


@triton.jit
def activation_backward(grad, h, ACT: tl.constexpr):
    """grad * act'(h) for fp32 blocks ``grad`` and ``h``.

    relu and leaky_relu select rather than multiply, as PyTorch's backward does, so a NaN or Inf
    in ``grad`` does not leak through a zero slope.
    """
    if ACT == 0:
        out = grad
    elif ACT == 1:
        out = tl.where(h > 0, grad, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        out = grad * (cdf + h * pdf)
    elif ACT == 3:
        inner = (h + h * h * h * _GELU_TANH_C) * _SQRT_2_OVER_PI
        t = _tanh(inner)
        d_inner = (1.0 + h * h * (3.0 * _GELU_TANH_C)) * _SQRT_2_OVER_PI
        out = grad * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * d_inner)
    elif ACT == 4:
        sig = _sigmoid(h)
        out = grad * (sig * (1.0 + h * (1.0 - sig)))
    elif ACT == 5:
        t = _tanh(h)
        out = grad * (1.0 - t * t)
    elif ACT == 6:
        sig = _sigmoid(h)
        out = grad * (sig * (1.0 - sig))
    else:
        out = tl.where(h > 0, grad, grad * LEAKY_RELU_SLOPE)
    return out
