"""The two-kernel path for bottlenecks too wide to keep in registers (padded r > MAX_FUSED_R).

project_kernel, grid (row tiles, r tiles):
    forward:  h   = x @ W_down^T + b_down             stored fp32 (M, R)
    backward: g_h = act'(h) * (scale * g @ W_up)       stored fp32 (M, R)
expand_kernel, grid (row tiles, d tiles), K-loop over r:
    forward:  y  = x + scale * (act(h) @ W_up^T + b_up)
    backward: dx = g + g_h @ W_down

The same operand views as the one-pass kernel (see fused.py); the middle block goes through HBM
once, which beats a one-pass kernel that would spill it.
"""

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import dot_operand, load_tile, middle_epilogue, project, store_residual
from .tuning import EXPAND_CONFIGS, PROJECT_CONFIGS, PRUNE_TILE


@triton.jit
def project_kernel(
    src_ptr, stride_sm, stride_sk,
    w1_ptr, stride_w1r, stride_w1k,
    b1_ptr,
    saved_h_ptr, stride_hm,
    mid_ptr, stride_mid,
    M, D, R, scale, rows_bucket,
    ACT: tl.constexpr, BACKWARD: tl.constexpr, HAS_B1: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    acc = project(src_ptr, stride_sm, stride_sk, w1_ptr, stride_w1r, stride_w1k, rows, rcols, M, D, R,
                  DOT_F32, PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    mid = middle_epilogue(acc, rows, rcols, M, R, b1_ptr, saved_h_ptr, stride_hm, scale,
                          ACT, BACKWARD, HAS_B1)
    mask = (rows[:, None] < M) & (rcols[None, :] < R)
    tl.store(mid_ptr + rows[:, None] * stride_mid + rcols[None, :], mid, mask=mask)


@triton.jit
def expand_kernel(
    src_ptr, stride_sm, stride_sk,
    mid_ptr, stride_mid,
    w2_ptr, stride_w2n, stride_w2r,
    b2_ptr,
    out_ptr, stride_om, stride_on,
    M, D, R, out_scale, rows_bucket,
    ACT: tl.constexpr, APPLY_ACT: tl.constexpr, HAS_B2: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rcols = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        a = load_tile(mid_ptr, rows, rcols, stride_mid, 1, M, R)
        if APPLY_ACT:
            a = tl.where(rcols[None, :] < R, apply_activation(a, ACT), 0.0)
        w2_t = load_tile(w2_ptr, rcols, ns, stride_w2r, stride_w2n, R, D)
        acc = tl.dot(dot_operand(a, w2_t.dtype, DOT_F32), dot_operand(w2_t, w2_t.dtype, DOT_F32),
                     acc, input_precision=PRECISION)
    store_residual(out_ptr, stride_om, stride_on, src_ptr, stride_sm, stride_sk, b2_ptr,
                   rows, ns, M, D, acc, out_scale, HAS_B2)


project_tuned = triton.autotune(
    configs=PROJECT_CONFIGS, key=["D", "R", "rows_bucket"], prune_configs_by={"early_config_prune": PRUNE_TILE},
)(project_kernel)

expand_tuned = triton.autotune(
    configs=EXPAND_CONFIGS, key=["D", "R", "rows_bucket"], prune_configs_by={"early_config_prune": PRUNE_TILE},
)(expand_kernel)
