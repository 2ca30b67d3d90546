"""Named argument records: what each kernel takes, by name, built in one place per kernel from tensors.

A kernel with 30 to 50 arguments launched from a positional list gives a silent wrong answer when one
argument shifts. Here each kernel has a record type (a NamedTuple) whose fields are the kernel's
parameters by name, in signature order, up to the block sizes a tuning configuration supplies, and one
builder that derives every stride, size and flag from the tensors it is given. Builders fill their
record by keyword, so a misnamed or missing field is a TypeError; a launch unpacks the record once
(``kernel[grid](*record, **config)``). ``tests/kernels/test_records.py`` checks every record's fields
against its kernel's own parameter names.

Tensor roles (every tensor may have any strides unless said otherwise):
    src, res, out   (M, D)       rows in, the residual added, rows out
    w1              (R, D) view  W_down (forward) or W_up read transposed (backward); grouped: stacked (n, ...)
    w2              (D, R) view  W_up (forward) or W_down read transposed (backward)
    b1, b2          (R,), (D,) or None; grouped (n, R), (n, D)
    saved_h, mid    (M, R) fp32  h saved by the forward (read with unit column stride), the stored middle block
    index           1-D integer tensor or None: row m uses adapter index[m // rows_per_index]
A pointer the kernel does not touch (an absent bias or index, h in the forward, a buffer not stored)
is filled with another tensor of the launch, of the dtype the tuning keys kept on disk were made with
(the pointers' dtypes are part of them): an absent bias with its weight, the unstored middle block
with the saved h (backward) or the input rows (forward); an absent bias's, index's or h's strides are 0.
"""

from typing import Any, NamedTuple

from torch import Tensor

from .tuning import REDUCE_BLOCK, padded_rank, rows_bucket


class FusedRowsArgs(NamedTuple):
    """``fused_rows_kernel``'s arguments (its block sizes come from the tuning configuration)."""

    src_ptr: Tensor
    stride_sm: int
    stride_sk: int
    w1_ptr: Tensor
    stride_w1a: int
    stride_w1r: int
    stride_w1k: int
    b1_ptr: Tensor
    stride_b1a: int
    stride_b1r: int
    saved_h_ptr: Tensor
    stride_hm: int
    mid_ptr: Tensor
    stride_mid: int
    w2_ptr: Tensor
    stride_w2a: int
    stride_w2n: int
    stride_w2r: int
    b2_ptr: Tensor
    stride_b2a: int
    stride_b2n: int
    out_ptr: Tensor
    stride_om: int
    stride_on: int
    res_ptr: Tensor
    stride_rm: int
    stride_rn: int
    idx_ptr: Tensor
    stride_idx: int
    rows_per_index: int
    n_adapters: int
    M: int
    D: int
    R: int
    scale: float
    rows_bucket: int
    ACT: int
    BACKWARD: bool
    HAS_B1: bool
    HAS_B2: bool
    STORE_MID: bool
    STORE_OUT: bool
    ADD_RESIDUAL: bool
    GROUPED: bool
    DOT_F32: bool
    PRECISION: str
    R_PAD: int


class ProjectArgs(NamedTuple):
    """``project_kernel``'s arguments (its block sizes come from the tuning configuration)."""

    src_ptr: Tensor
    stride_sm: int
    stride_sk: int
    w1_ptr: Tensor
    stride_w1a: int
    stride_w1r: int
    stride_w1k: int
    b1_ptr: Tensor
    stride_b1a: int
    stride_b1r: int
    saved_h_ptr: Tensor
    stride_hm: int
    mid_ptr: Tensor
    stride_mid: int
    idx_ptr: Tensor
    stride_idx: int
    rows_per_index: int
    n_adapters: int
    M: int
    D: int
    R: int
    scale: float
    rows_bucket: int
    ACT: int
    BACKWARD: bool
    HAS_B1: bool
    GROUPED: bool
    DOT_F32: bool
    PRECISION: str


class ExpandArgs(NamedTuple):
    """``expand_kernel``'s arguments (its block sizes come from the tuning configuration)."""

    src_ptr: Tensor
    stride_sm: int
    stride_sk: int
    mid_ptr: Tensor
    stride_mid: int
    w2_ptr: Tensor
    stride_w2a: int
    stride_w2n: int
    stride_w2r: int
    b2_ptr: Tensor
    stride_b2a: int
    stride_b2n: int
    out_ptr: Tensor
    stride_om: int
    stride_on: int
    idx_ptr: Tensor
    stride_idx: int
    rows_per_index: int
    n_adapters: int
    M: int
    D: int
    R: int
    out_scale: float
    rows_bucket: int
    ACT: int
    APPLY_ACT: bool
    HAS_B2: bool
    ADD_RESIDUAL: bool
    GROUPED: bool
    DOT_F32: bool
    PRECISION: str


class WeightGradArgs(NamedTuple):
    """``weight_grad_kernel``'s arguments (its block sizes come from the tuning configuration)."""

    g_ptr: Tensor
    stride_gm: int
    stride_gk: int
    x_ptr: Tensor
    stride_xm: int
    stride_xk: int
    h_ptr: Tensor
    stride_hm: int
    gh_ptr: Tensor
    stride_ghm: int
    dtype_ptr: Tensor
    out_ptr: Tensor
    group_stride: int
    off_wd: int
    off_bu: int
    off_bd: int
    idx_ptr: Tensor
    stride_idx: int
    rows_per_index: int
    M: int
    D: int
    R: int
    scale: float
    rows_per_group: int
    groups: int
    rows_bucket: int
    ACT: int
    NEED_DWU: bool
    NEED_DBU: bool
    NEED_DWD: bool
    NEED_DBD: bool
    GROUPED: bool
    DOT_F32: bool
    PRECISION: str
    R_PAD: int


class ReduceGroupsArgs(NamedTuple):
    """``reduce_groups_kernel``'s arguments (not tuned: all of them)."""

    partial_ptr: Tensor
    out_ptr: Tensor
    total: int
    groups: int
    BLOCK: int


# ---- pieces shared by the builders -----------------------------------------------------------------

def _matrix(w: Tensor, transposed: bool) -> tuple[int, int, int]:
    """(adapter stride, row stride, column stride) of a 2-D or stacked 3-D weight, read as its
    transpose when ``transposed``."""
    strides = w.stride()  # one call: stride(dim) costs as much as the whole tuple
    adapter, rows, cols = strides if len(strides) == 3 else (0, *strides)
    return (adapter, cols, rows) if transposed else (adapter, rows, cols)


def _vector(b: Tensor | None, fallback: Tensor) -> tuple[Tensor, int, int]:
    """(tensor, adapter stride, element stride) of a bias, 1-D or stacked 2-D; ``fallback`` with zero
    strides when there is none."""
    if b is None:
        return fallback, 0, 0
    strides = b.stride()
    return (b, *strides) if len(strides) == 2 else (b, 0, strides[0])


def _index(index: Tensor | None, rows_per_index: int, fallback: Tensor) -> tuple[Tensor, int, int]:
    """(index tensor, its stride, rows per entry); ``fallback``, 0, 1 when there is none."""
    return (fallback, 0, 1) if index is None else (index, index.stride()[0], rows_per_index)


def _bottleneck(w: Tensor, transposed: bool) -> int:
    """R of a weight read as (R, D) (``transposed``: stored (D, R))."""
    return w.shape[-1] if transposed else w.shape[-2]


# ---- builders ----------------------------------------------------------------------------------------

def fused_rows_args(
    *,
    src: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    saved_h: Tensor | None,
    mid: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    out: Tensor | None,
    res: Tensor,
    index: Tensor | None,
    rows_per_index: int,
    scale: float,
    act: int,
    backward: bool,
    add_residual: bool,
    transposed: bool,
    dot_f32: bool,
    precision: str,
) -> FusedRowsArgs:
    """The one-pass kernel's record. src, res, out (M, D); w1 read as (R, D) and w2 as (D, R) (both
    read transposed when ``transposed``: the backward passes W_up and W_down); ``saved_h`` (M, R) fp32
    for the backward (None forward); ``mid`` (M, R) fp32 to store h or g_h into (None: not stored);
    ``out`` None: no row output stored. With an ``index`` the weights are stacked over adapters."""
    M, D = src.shape
    R = _bottleneck(w1, transposed)
    w1_a, w1_r, w1_k = _matrix(w1, transposed)
    w2_a, w2_n, w2_r = _matrix(w2, transposed)
    b1_t, b1_a, b1_r = _vector(b1, w1)
    b2_t, b2_a, b2_n = _vector(b2, w2)
    idx, stride_idx, per_index = _index(index, rows_per_index, src)
    out_t = out if out is not None else src
    stride_sm, stride_sk = src.stride()
    stride_om, stride_on = out_t.stride()
    stride_rm, stride_rn = res.stride()
    return FusedRowsArgs(
        src_ptr=src, stride_sm=stride_sm, stride_sk=stride_sk,
        w1_ptr=w1, stride_w1a=w1_a, stride_w1r=w1_r, stride_w1k=w1_k,
        b1_ptr=b1_t, stride_b1a=b1_a, stride_b1r=b1_r,
        saved_h_ptr=saved_h if saved_h is not None else src,
        stride_hm=saved_h.stride()[0] if saved_h is not None else 0,
        mid_ptr=mid if mid is not None else saved_h if saved_h is not None else src, stride_mid=R,
        w2_ptr=w2, stride_w2a=w2_a, stride_w2n=w2_n, stride_w2r=w2_r,
        b2_ptr=b2_t, stride_b2a=b2_a, stride_b2n=b2_n,
        out_ptr=out_t, stride_om=stride_om, stride_on=stride_on,
        res_ptr=res, stride_rm=stride_rm, stride_rn=stride_rn,
        idx_ptr=idx, stride_idx=stride_idx, rows_per_index=per_index,
        n_adapters=w1.shape[0] if index is not None else 1,
        M=M, D=D, R=R, scale=scale, rows_bucket=rows_bucket(M),
        ACT=act, BACKWARD=backward, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        STORE_MID=mid is not None, STORE_OUT=out is not None, ADD_RESIDUAL=add_residual, GROUPED=index is not None,
        DOT_F32=dot_f32, PRECISION=precision, R_PAD=padded_rank(R),
    )


def project_args(
    *,
    src: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    saved_h: Tensor | None,
    mid: Tensor,
    index: Tensor | None,
    rows_per_index: int,
    scale: float,
    act: int,
    backward: bool,
    transposed: bool,
    dot_f32: bool,
    precision: str,
) -> ProjectArgs:
    """The wide path's first kernel: src (M, D) through w1 (read as (R, D)) into ``mid`` (M, R) fp32
    (h forward, g_h backward, which reads ``saved_h`` (M, R) fp32)."""
    M, D = src.shape
    w1_a, w1_r, w1_k = _matrix(w1, transposed)
    b1_t, b1_a, b1_r = _vector(b1, w1)
    idx, stride_idx, per_index = _index(index, rows_per_index, src)
    stride_sm, stride_sk = src.stride()
    return ProjectArgs(
        src_ptr=src, stride_sm=stride_sm, stride_sk=stride_sk,
        w1_ptr=w1, stride_w1a=w1_a, stride_w1r=w1_r, stride_w1k=w1_k,
        b1_ptr=b1_t, stride_b1a=b1_a, stride_b1r=b1_r,
        saved_h_ptr=saved_h if saved_h is not None else mid,
        stride_hm=saved_h.stride()[0] if saved_h is not None else 0,
        mid_ptr=mid, stride_mid=mid.stride()[0],
        idx_ptr=idx, stride_idx=stride_idx, rows_per_index=per_index,
        n_adapters=w1.shape[0] if index is not None else 1,
        M=M, D=D, R=_bottleneck(w1, transposed), scale=scale, rows_bucket=rows_bucket(M),
        ACT=act, BACKWARD=backward, HAS_B1=b1 is not None, GROUPED=index is not None,
        DOT_F32=dot_f32, PRECISION=precision,
    )


def expand_args(
    *,
    res: Tensor,
    mid: Tensor,
    w2: Tensor,
    b2: Tensor | None,
    out: Tensor,
    index: Tensor | None,
    rows_per_index: int,
    out_scale: float,
    act: int,
    apply_act: bool,
    add_residual: bool,
    transposed: bool,
    dot_f32: bool,
    precision: str,
) -> ExpandArgs:
    """The wide path's second kernel: ``out`` (M, D) = res + out_scale * (act?(mid) @ w2^T + b2), w2
    read as (D, R), mid (M, R) fp32."""
    M, D = out.shape
    w2_a, w2_n, w2_r = _matrix(w2, transposed)
    b2_t, b2_a, b2_n = _vector(b2, w2)
    idx, stride_idx, per_index = _index(index, rows_per_index, res)
    stride_sm, stride_sk = res.stride()
    stride_om, stride_on = out.stride()
    return ExpandArgs(
        src_ptr=res, stride_sm=stride_sm, stride_sk=stride_sk,
        mid_ptr=mid, stride_mid=mid.stride()[0],
        w2_ptr=w2, stride_w2a=w2_a, stride_w2n=w2_n, stride_w2r=w2_r,
        b2_ptr=b2_t, stride_b2a=b2_a, stride_b2n=b2_n,
        out_ptr=out, stride_om=stride_om, stride_on=stride_on,
        idx_ptr=idx, stride_idx=stride_idx, rows_per_index=per_index,
        n_adapters=w2.shape[0] if index is not None else 1,
        M=M, D=D, R=mid.shape[1], out_scale=out_scale, rows_bucket=rows_bucket(M),
        ACT=act, APPLY_ACT=apply_act, HAS_B2=b2 is not None, ADD_RESIDUAL=add_residual, GROUPED=index is not None,
        DOT_F32=dot_f32, PRECISION=precision,
    )


def weight_grad_args(
    *,
    grad: Tensor,
    x: Tensor,
    h: Tensor,
    gh: Tensor | None,
    weight: Tensor,
    out: Tensor,
    offsets: tuple[int, int, int],
    groups: int,
    index: Tensor | None,
    rows_per_index: int,
    scale: float,
    act: int,
    need_up_weight: bool,
    need_up_bias: bool,
    need_down_weight: bool,
    need_down_bias: bool,
    dot_f32: bool,
    precision: str,
) -> WeightGradArgs:
    """The weight-gradient kernel: grad, x (M, D); h and g_h (M, R) fp32 with unit column stride (g_h
    None when no down-projection gradient is asked for); ``weight`` any weight (the dtype the dots
    run in); ``out`` the (groups, total) or (total,) buffer with the parts at ``offsets`` (down weight,
    up bias, down bias; the up weight at 0), one slot per row group."""
    M, D = grad.shape
    R = h.shape[1]
    idx, stride_idx, per_index = _index(index, rows_per_index, grad)
    off_wd, off_bu, off_bd = offsets
    stride_gm, stride_gk = grad.stride()
    stride_xm, stride_xk = x.stride()
    return WeightGradArgs(
        g_ptr=grad, stride_gm=stride_gm, stride_gk=stride_gk,
        x_ptr=x, stride_xm=stride_xm, stride_xk=stride_xk,
        h_ptr=h, stride_hm=h.stride()[0],
        gh_ptr=gh if gh is not None else h, stride_ghm=R,
        dtype_ptr=weight,
        out_ptr=out, group_stride=out.shape[-1], off_wd=off_wd, off_bu=off_bu, off_bd=off_bd,
        idx_ptr=idx, stride_idx=stride_idx, rows_per_index=per_index,
        M=M, D=D, R=R, scale=scale, rows_per_group=-(-M // groups), groups=groups, rows_bucket=rows_bucket(M),
        ACT=act, NEED_DWU=need_up_weight, NEED_DBU=need_up_bias, NEED_DWD=need_down_weight, NEED_DBD=need_down_bias,
        GROUPED=index is not None, DOT_F32=dot_f32, PRECISION=precision, R_PAD=padded_rank(R),
    )


def reduce_groups_args(*, partial: Tensor, out: Tensor) -> ReduceGroupsArgs:
    """The ordered reduction: ``out`` (total,) = the sum over groups of ``partial`` (groups, total) fp32."""
    groups, total = partial.shape
    return ReduceGroupsArgs(partial_ptr=partial, out_ptr=out, total=total, groups=groups, BLOCK=REDUCE_BLOCK)


RECORDS: dict[str, Any] = {
    "fused_rows_kernel": FusedRowsArgs, "project_kernel": ProjectArgs, "expand_kernel": ExpandArgs,
    "weight_grad_kernel": WeightGradArgs, "reduce_groups_kernel": ReduceGroupsArgs,
}
"""Each kernel's record type by the kernel's name."""
