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
def load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok):
    """Load ``ptr[rows, cols]`` as a (len(rows), len(cols)) block; entries outside the two masks are 0
    (and are not read from memory)."""
    mask = row_ok[:, None] & col_ok[None, :]
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
def tile_adapters(idx_ptr, stride_idx, rows_per_index, rows, in_range, n_adapters, GROUPED: tl.constexpr):
    """The adapter of each row of a tile and the range [lo, hi] of adapters present in it.

    Ungrouped: every row uses adapter 0. Grouped: row m uses ``idx[m // rows_per_index]`` (any
    integer dtype); -1 means no adapter, and a tile holding only such rows gets lo > hi.
    """
    if GROUPED:
        idx = tl.load(idx_ptr + (rows // rows_per_index) * stride_idx, mask=in_range, other=-1).to(tl.int32)
        lo = tl.min(tl.where(idx >= 0, idx, n_adapters), axis=0)
        hi = tl.max(idx, axis=0)
    else:
        idx = tl.zeros(rows.shape, dtype=tl.int32)
        lo = 0
        hi = 0
    return idx, lo, hi


@triton.jit
def any_true(mask):
    """Whether any entry of a boolean vector is set (a runtime scalar)."""
    return tl.max(mask.to(tl.int32), axis=0) > 0


@triton.jit
def project(src_ptr, stride_sm, stride_sk, w_ptr, stride_wr, stride_wk, rows, row_ok, rcols, K, R,
            DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``src[rows, :K] @ w[rcols, :K]^T``: a (BLOCK_M, BLOCK_R) block, K-loop in BLOCK_K steps.
    Rows outside ``row_ok`` read as zero."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    r_ok = rcols < R
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        src = load_tile(src_ptr, rows, ks, stride_sm, stride_sk, row_ok, k_ok)
        w_t = load_tile(w_ptr, ks, rcols, stride_wk, stride_wr, k_ok, r_ok)
        acc = tl.dot(dot_operand(src, w_t.dtype, DOT_F32), dot_operand(w_t, w_t.dtype, DOT_F32),
                     acc, input_precision=PRECISION)
    return acc


@triton.jit
def middle_epilogue(acc, rows, row_ok, rcols, R, bias_ptr, stride_bias, saved_h_ptr, stride_hm, scale,
                    ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Finish the r-wide middle block (fp32, zero in padded columns).

    forward:  h   = acc + b_down                      (acc = x @ W_down^T; b_down[j] at bias_ptr + j * stride_bias)
    backward: g_h = act'(h) * (scale * acc)            (acc = g @ W_up, h read from ``saved_h_ptr``, unit column stride)
    """
    r_ok = rcols < R
    if BACKWARD:
        h = load_tile(saved_h_ptr, rows, rcols, stride_hm, 1, row_ok, r_ok)
        mid = activation_backward(scale * acc, h, ACT)
    else:
        mid = acc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rcols * stride_bias, mask=r_ok, other=0.0).to(tl.float32)
            mid = mid + bias[None, :]
    return tl.where(r_ok[None, :], mid, 0.0)


@triton.jit
def store_mid(mid_ptr, stride_mid, rows, row_ok, rcols, R, mid):
    """Store an fp32 (rows, r) block of h or g_h (a buffer with unit column stride)."""
    mask = row_ok[:, None] & (rcols[None, :] < R)
    tl.store(mid_ptr + rows[:, None] * stride_mid + rcols[None, :], mid, mask=mask)


@triton.jit
def store_residual(out_ptr, stride_om, stride_on, res_ptr, stride_rm, stride_rn, bias_ptr, stride_bias,
                   rows, row_ok, ns, N, acc, out_scale, HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """out[rows, ns] = res[rows, ns] + out_scale * (acc + bias[ns]), added in fp32, rows in ``row_ok``
    (without ADD_RESIDUAL the ``res`` term is left out); bias[n] sits at ``bias_ptr + n * stride_bias``."""
    n_ok = ns < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ns * stride_bias, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out = out_scale * acc
    if ADD_RESIDUAL:
        out += load_tile(res_ptr, rows, ns, stride_rm, stride_rn, row_ok, n_ok).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :] * stride_on,
             cast(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def copy_rows(out_ptr, stride_om, stride_on, res_ptr, stride_rm, stride_rn, rows, row_ok, ns, N,
              ADD_RESIDUAL: tl.constexpr):
    """out[rows, ns] = res[rows, ns] (zero without ADD_RESIDUAL) for rows in ``row_ok``: the rows
    that no adapter touches."""
    n_ok = ns < N
    mask = row_ok[:, None] & n_ok[None, :]
    if ADD_RESIDUAL:
        value = load_tile(res_ptr, rows, ns, stride_rm, stride_rn, row_ok, n_ok)
    else:
        value = tl.zeros((rows.shape[0], ns.shape[0]), dtype=tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :] * stride_on,
             cast(value, out_ptr.dtype.element_ty), mask=mask)
