"""Weight and bias gradients: a column-parallel kernel over row groups, then an ordered reduction.

weight_grad_kernel, grid (d tiles, r tiles, adapters x row groups). Program (n, j, (k, grp)) walks
the rows of its group in BLOCK_M steps, keeps those that use adapter k (all of them when not
grouped), and accumulates in fp32 registers:
    dW_up[k][n, j]   += g[rows, n]^T  @ act(h[rows, j])      (scaled by `scale` at the end)
    db_up[k][n]      += sum_rows g[rows, n]                   (scaled; programs with j == 0)
    dW_down[k][j, n] += g_h[rows, j]^T @ x[rows, n]
    db_down[k][j]    += sum_rows g_h[rows, j]                 (programs with n == 0)
Row tiles holding no row of adapter k are skipped, and masked rows are not read, so a mixed batch
costs about what one adapter's batch costs. It writes one slot per row group of a buffer laid out
as [G, dW_up (n*D*R) | dW_down (n*R*D) | db_up (n*D) | db_down (n*R)]. With G == 1 that buffer is
the gradient itself (in the weights' dtype); otherwise it holds fp32 partials that
reduce_groups_kernel sums in group order. No atomics: the result is the same bits on every run.
"""

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import any_true, cast, dot_operand, load_tile
from .tuning import PRUNE_WEIGHT_GRAD, WEIGHT_GRAD_CONFIGS


@triton.jit
def weight_grad_kernel(
    g_ptr, stride_gm, stride_gk,          # upstream gradient (M, D)
    x_ptr, stride_xm, stride_xk,          # adapter input (M, D)
    h_ptr, stride_hm,                     # pre-activation h, fp32 (M, R)
    gh_ptr, stride_ghm,                   # g_h = d loss / d h, fp32 (M, R)
    dtype_ptr,                            # any weight: the dtype the dots run in
    out_ptr, group_stride, off_wd, off_bu, off_bd,  # [G, n*(2*D*R + D + R)] buffer and part offsets
    idx_ptr, stride_idx, rows_per_index,  # grouped only: adapter index per row block
    M, D, R, scale, rows_per_group, groups, rows_bucket,
    ACT: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr,
    NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr, GROUPED: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_kg = tl.program_id(2).to(tl.int64)
    adapter = pid_kg // groups
    pid_g = pid_kg % groups
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rc = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    n_ok = ns < D
    r_ok = rc < R
    row_start = pid_g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    compute_dtype = dtype_ptr.dtype.element_ty

    acc_wu = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_wd = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_bd = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        sel = rows < row_end
        if GROUPED:
            idx = tl.load(idx_ptr + (rows // rows_per_index) * stride_idx, mask=sel, other=-1)
            sel = sel & (idx == adapter)
        if any_true(sel):
            if NEED_DWU or NEED_DBU:
                g_t = load_tile(g_ptr, ns, rows, stride_gk, stride_gm, n_ok, sel)  # (BLOCK_N, BLOCK_M)
                if NEED_DBU:
                    acc_bu += tl.sum(g_t.to(tl.float32), axis=1)
                if NEED_DWU:
                    h = load_tile(h_ptr, rows, rc, stride_hm, 1, sel, r_ok)
                    a = tl.where(sel[:, None] & r_ok[None, :], apply_activation(h, ACT), 0.0)
                    acc_wu = tl.dot(dot_operand(g_t, compute_dtype, DOT_F32), dot_operand(a, compute_dtype, DOT_F32),
                                    acc_wu, input_precision=PRECISION)
            if NEED_DWD or NEED_DBD:
                gh_t = load_tile(gh_ptr, rc, rows, 1, stride_ghm, r_ok, sel)  # (BLOCK_R, BLOCK_M)
                if NEED_DBD:
                    acc_bd += tl.sum(gh_t, axis=1)
                if NEED_DWD:
                    x = load_tile(x_ptr, rows, ns, stride_xm, stride_xk, sel, n_ok)
                    acc_wd = tl.dot(dot_operand(gh_t, compute_dtype, DOT_F32), dot_operand(x, compute_dtype, DOT_F32),
                                    acc_wd, input_precision=PRECISION)

    out_dtype = out_ptr.dtype.element_ty
    base = out_ptr + pid_g * group_stride
    if NEED_DWU:
        tl.store(base + adapter * D * R + ns[:, None] * R + rc[None, :], cast(scale * acc_wu, out_dtype),
                 mask=n_ok[:, None] & r_ok[None, :])
    if NEED_DWD:
        tl.store(base + off_wd + adapter * R * D + rc[:, None] * D + ns[None, :], cast(acc_wd, out_dtype),
                 mask=r_ok[:, None] & n_ok[None, :])
    if NEED_DBU:
        if pid_r == 0:
            tl.store(base + off_bu + adapter * D + ns, cast(scale * acc_bu, out_dtype), mask=n_ok)
    if NEED_DBD:
        if pid_n == 0:
            tl.store(base + off_bd + adapter * R + rc, cast(acc_bd, out_dtype), mask=r_ok)


@triton.jit
def reduce_groups_kernel(partial_ptr, out_ptr, total, groups, BLOCK: tl.constexpr):
    """out[i] = sum over g of partial[g, i], summed in group order (fp32), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = partial_ptr + offs
    for _ in range(0, groups):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += total
    tl.store(out_ptr + offs, cast(acc, out_ptr.dtype.element_ty), mask=mask)


weight_grad_tuned = triton.autotune(
    configs=WEIGHT_GRAD_CONFIGS,
    key=["D", "R", "rows_bucket", "NEED_DWU", "NEED_DWD", "GROUPED"],
    prune_configs_by={"early_config_prune": PRUNE_WEIGHT_GRAD},
)(weight_grad_kernel)
