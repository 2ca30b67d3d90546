"""The two-kernel path for bottlenecks too wide to keep in registers (padded r > MAX_FUSED_R).

project_kernel, grid (row tiles, r tiles):
    forward:  h   = x @ W_down^T + b_down             stored fp32 (M, R)
    backward: g_h = act'(h) * (scale * g @ W_up)       stored fp32 (M, R)
expand_kernel, grid (row tiles, d tiles), K-loop over r (``src`` is only the residual here):
    forward:  y  = res + scale * (act(h) @ W_up^T + b_up)     (res: x or a given residual)
    backward: dx = g + g_h @ W_down                          (no g term when the residual was not x)

The same operand views and the same grouped mode as the one-pass kernel (see fused.py); the middle
block goes through HBM once, which beats a one-pass kernel that would spill it.
"""

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import (any_true, copy_rows, dot_operand, load_tile, middle_epilogue, project, store_mid,
                    store_residual, tile_adapters)
from .tuning import EXPAND_CONFIGS, PROJECT_CONFIGS, PRUNE_TILE


@triton.jit
def project_kernel(
    src_ptr, stride_sm, stride_sk,
    w1_ptr, stride_w1a, stride_w1r, stride_w1k,
    b1_ptr, stride_b1a, stride_b1r,
    saved_h_ptr, stride_hm,
    mid_ptr, stride_mid,
    idx_ptr, stride_idx, rows_per_index, n_adapters,
    M, D, R, scale, rows_bucket,
    ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_B1: tl.constexpr, GROUPED: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    idx, lo, hi = tile_adapters(idx_ptr, stride_idx, rows_per_index, rows, in_range, n_adapters, GROUPED)
    if GROUPED:
        store_mid(mid_ptr, stride_mid, rows, in_range & (idx < 0), rcols, R,
                  tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32))
    for k in range(lo, hi + 1):
        sel = in_range & (idx == k)
        if any_true(sel):
            adapter = pid_m * 0 + k  # int64
            acc = project(src_ptr, stride_sm, stride_sk, w1_ptr + adapter * stride_w1a, stride_w1r, stride_w1k,
                          rows, sel, rcols, D, R, DOT_F32, PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
            mid = middle_epilogue(acc, rows, sel, rcols, R, b1_ptr + adapter * stride_b1a, stride_b1r,
                                  saved_h_ptr, stride_hm,
                                  scale, ACT, BACKWARD, HAS_B1)
            store_mid(mid_ptr, stride_mid, rows, sel, rcols, R, mid)


@triton.jit
def expand_kernel(
    src_ptr, stride_sm, stride_sk,
    mid_ptr, stride_mid,
    w2_ptr, stride_w2a, stride_w2n, stride_w2r,
    b2_ptr, stride_b2a, stride_b2n,
    out_ptr, stride_om, stride_on,
    idx_ptr, stride_idx, rows_per_index, n_adapters,
    M, D, R, out_scale, rows_bucket,
    ACT: tl.constexpr, APPLY_ACT: tl.constexpr, HAS_B2: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    GROUPED: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = ns < D
    idx, lo, hi = tile_adapters(idx_ptr, stride_idx, rows_per_index, rows, in_range, n_adapters, GROUPED)
    if GROUPED:
        copy_rows(out_ptr, stride_om, stride_on, src_ptr, stride_sm, stride_sk, rows, in_range & (idx < 0), ns, D,
                  ADD_RESIDUAL)
    for k in range(lo, hi + 1):
        sel = in_range & (idx == k)
        if any_true(sel):
            adapter = pid_m * 0 + k  # int64
            w2_k = w2_ptr + adapter * stride_w2a
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rcols = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
                r_ok = rcols < R
                a = load_tile(mid_ptr, rows, rcols, stride_mid, 1, sel, r_ok)
                if APPLY_ACT:
                    a = tl.where(r_ok[None, :], apply_activation(a, ACT), 0.0)
                w2_t = load_tile(w2_k, rcols, ns, stride_w2r, stride_w2n, r_ok, n_ok)
                acc = tl.dot(dot_operand(a, w2_t.dtype, DOT_F32), dot_operand(w2_t, w2_t.dtype, DOT_F32),
                             acc, input_precision=PRECISION)
            store_residual(out_ptr, stride_om, stride_on, src_ptr, stride_sm, stride_sk, b2_ptr + adapter * stride_b2a,
                           stride_b2n, rows, sel, ns, D, acc, out_scale, HAS_B2, ADD_RESIDUAL)


project_tuned = triton.autotune(
    configs=PROJECT_CONFIGS, key=["D", "R", "rows_bucket", "BACKWARD", "GROUPED"],
    prune_configs_by={"early_config_prune": PRUNE_TILE},
)(project_kernel)

expand_tuned = triton.autotune(
    configs=EXPAND_CONFIGS, key=["D", "R", "rows_bucket", "APPLY_ACT", "GROUPED"],
    prune_configs_by={"early_config_prune": PRUNE_TILE},
)(expand_kernel)
