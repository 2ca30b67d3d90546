"""Small ``@triton.jit`` helpers shared by every kernel: masked 2-D tile loads, dot operands, and
the epilogue of the r-wide middle stage.

All row and column indices are int64, so ``row * stride`` is right past 2**31 elements.
"""

import triton
import triton.language as tl

from .activations import activation_backward
from .tuning import INTERPRET

# The interpreter converts fp32 to bf16 by truncation; the GPU rounds to nearest even.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even on every backend (an fp32 -> bf16 cast in the
    interpreter is rounded here by hand first, so the CPU tests see the GPU's numbers)."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """Load ``ptr[rows, cols]`` as a (len(rows), len(cols)) block; out-of-range entries are 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)


@triton.jit
def dot_operand(tile, compute_dtype: tl.constexpr, DOT_F32: tl.constexpr):
    """Round ``tile`` to the compute dtype; widen to fp32 when the dot must run in fp32.

    The interpreter multiplies bf16 dot operands as raw bits, so there the operands are widened
    after rounding: the numbers are those of the GPU kernel, only the summation order differs.
    """
    tile = cast(tile, compute_dtype)
    if DOT_F32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def project(src_ptr, stride_sm, stride_sk, w_ptr, stride_wr, stride_wk, rows, rcols, M, K, R,
            DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``src[rows, :K] @ w[rcols, :K]^T``: a (BLOCK_M, BLOCK_R) block, K-loop in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        src = load_tile(src_ptr, rows, ks, stride_sm, stride_sk, M, K)
        w_t = load_tile(w_ptr, ks, rcols, stride_wk, stride_wr, K, R)
        acc = tl.dot(dot_operand(src, w_t.dtype, DOT_F32), dot_operand(w_t, w_t.dtype, DOT_F32),
                     acc, input_precision=PRECISION)
    return acc


@triton.jit
def middle_epilogue(acc, rows, rcols, M, R, bias_ptr, saved_h_ptr, stride_hm, scale,
                    ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Finish the r-wide middle block (fp32, zero in padded columns).

    forward:  h   = acc + b_down                      (acc = x @ W_down^T)
    backward: g_h = act'(h) * (scale * acc)            (acc = g @ W_up, h read from ``saved_h_ptr``)
    """
    if BACKWARD:
        h = load_tile(saved_h_ptr, rows, rcols, stride_hm, 1, M, R)
        mid = activation_backward(scale * acc, h, ACT)
    else:
        mid = acc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rcols, mask=rcols < R, other=0.0).to(tl.float32)
            mid = mid + bias[None, :]
    return tl.where(rcols[None, :] < R, mid, 0.0)


@triton.jit
def store_residual(out_ptr, stride_om, stride_on, src_ptr, stride_sm, stride_sk, bias_ptr,
                   rows, ns, M, N, acc, out_scale, HAS_BIAS: tl.constexpr):
    """out[rows, ns] = src[rows, ns] + out_scale * (acc + bias[ns]), added in fp32."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    src = load_tile(src_ptr, rows, ns, stride_sm, stride_sk, M, N).to(tl.float32)
    out = src + out_scale * acc
    mask = (rows[:, None] < M) & (ns[None, :] < N)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :] * stride_on,
             cast(out, out_ptr.dtype.element_ty), mask=mask)
