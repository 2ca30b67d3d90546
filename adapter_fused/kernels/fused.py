"""The one-pass kernel: a row tile goes down to r, through the middle epilogue, and back up to d
without the r-wide block leaving registers.

Forward (one launch):
    h   = x @ W_down^T + b_down                (K-loop over d, fp32 accumulator BLOCK_M x R_PAD)
    y   = res + scale * (act(h) @ W_up^T + b_up)  (N-loop over d; res is x, re-read normally from L2,
                                                 or a residual the caller gives)
    h is stored (fp32, rows x r) only when autograd will need it.

Backward, input-gradient half (the same kernel with BACKWARD=True):
    g_h = act'(h) * (scale * g @ W_up)          (K-loop over d)
    dx  = g + g_h @ W_down                      (N-loop over d; without the g term when the residual
                                                 was not x: its gradient is g itself)
    g_h is stored (fp32, rows x r) when weight gradients are needed; dx only when x needs one.

Each program owns BLOCK_M rows; the r-wide block is padded to R_PAD with zero columns.
The kernel reads every operand through (row, column) strides, so W_up is passed as an (r, d)
view for the backward K-loop and W_down as a (d, r) view for its N-loop.

Grouped (GROUPED=True): the weights are stacked over adapters (adapter strides ``stride_*a``) and
row m uses adapter ``idx[m // rows_per_index]``. A program runs the two loops once per adapter
present in its tile, each time for that adapter's rows only; rows with index -1 are copied
through (y = x, dx = g). Ungrouped, the loop over adapters runs once, for adapter 0.
"""

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import (any_true, copy_rows, dot_operand, load_tile, middle_epilogue, project, store_mid,
                    store_residual, tile_adapters)
from .tuning import FUSED_CONFIGS, PRUNE_FUSED


@triton.jit
def fused_rows_kernel(
    src_ptr, stride_sm, stride_sk,        # x (forward) or g (backward): (M, D)
    w1_ptr, stride_w1a, stride_w1r, stride_w1k,  # (R, D) view: W_down (forward) or W_up^T (backward)
    b1_ptr, stride_b1a, stride_b1r,       # b_down (forward only): adapter and element strides
    saved_h_ptr, stride_hm,               # h saved by the forward (backward only), fp32 (M, R)
    mid_ptr, stride_mid,                  # out: h (forward) or g_h (backward), fp32 (M, R)
    w2_ptr, stride_w2a, stride_w2n, stride_w2r,  # (D, R) view: W_up (forward) or W_down^T (backward)
    b2_ptr, stride_b2a, stride_b2n,       # b_up (forward only): adapter and element strides
    out_ptr, stride_om, stride_on,        # out: y (forward) or dx (backward): (M, D)
    res_ptr, stride_rm, stride_rn,        # residual added to out: x or a given residual (forward), g (backward)
    idx_ptr, stride_idx, rows_per_index, n_adapters,  # grouped only: adapter index per row block
    M, D, R, scale, rows_bucket,
    ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    STORE_MID: tl.constexpr, STORE_OUT: tl.constexpr, ADD_RESIDUAL: tl.constexpr, GROUPED: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    rcols = tl.arange(0, R_PAD).to(tl.int64)
    idx, lo, hi = tile_adapters(idx_ptr, stride_idx, rows_per_index, rows, in_range, n_adapters, GROUPED)

    if GROUPED:
        skip = in_range & (idx < 0)
        if any_true(skip):
            if STORE_MID:
                store_mid(mid_ptr, stride_mid, rows, skip, rcols, R, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32))
            if STORE_OUT:
                for n0 in range(0, D, BLOCK_N):
                    ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                    copy_rows(out_ptr, stride_om, stride_on, res_ptr, stride_rm, stride_rn, rows, skip, ns, D,
                              ADD_RESIDUAL)

    for k in range(lo, hi + 1):
        sel = in_range & (idx == k)
        if any_true(sel):
            adapter = pid * 0 + k  # int64
            acc = project(src_ptr, stride_sm, stride_sk, w1_ptr + adapter * stride_w1a, stride_w1r, stride_w1k,
                          rows, sel, rcols, D, R, DOT_F32, PRECISION, BLOCK_M, R_PAD, BLOCK_K)
            mid = middle_epilogue(acc, rows, sel, rcols, R, b1_ptr + adapter * stride_b1a, stride_b1r,
                                  saved_h_ptr, stride_hm,
                                  scale, ACT, BACKWARD, HAS_B1)
            if STORE_MID:
                store_mid(mid_ptr, stride_mid, rows, sel, rcols, R, mid)
            if STORE_OUT:
                if BACKWARD:
                    a = mid
                    out_scale = 1.0
                else:
                    a = tl.where(rcols[None, :] < R, apply_activation(mid, ACT), 0.0)
                    out_scale = scale
                a = dot_operand(a, w2_ptr.dtype.element_ty, DOT_F32)
                w2_k = w2_ptr + adapter * stride_w2a
                for n0 in range(0, D, BLOCK_N):
                    ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                    w2_t = load_tile(w2_k, rcols, ns, stride_w2r, stride_w2n, rcols < R, ns < D)
                    up = tl.dot(a, dot_operand(w2_t, w2_t.dtype, DOT_F32), input_precision=PRECISION)
                    store_residual(out_ptr, stride_om, stride_on, res_ptr, stride_rm, stride_rn,
                                   b2_ptr + adapter * stride_b2a, stride_b2n, rows, sel, ns, D, up, out_scale, HAS_B2,
                                   ADD_RESIDUAL)


fused_rows_tuned = triton.autotune(
    configs=FUSED_CONFIGS,
    key=["D", "R", "rows_bucket", "BACKWARD", "STORE_MID", "STORE_OUT", "GROUPED"],
    prune_configs_by={"early_config_prune": PRUNE_FUSED},
)(fused_rows_kernel)
