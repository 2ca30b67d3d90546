"""The named launch records: each record's fields are its kernel's parameters by name, and the builders
fill them from tensors (strides, flags and placeholders) as the launches need."""

import inspect
from typing import Any

import pytest
import torch

from adapter_fused.kernels import fused, records, weight_grad, wide
from adapter_fused.kernels.tuning import REDUCE_BLOCK, padded_rank

TUNED = {"fused_rows_kernel": fused.fused_rows_tuned, "project_kernel": wide.project_tuned,
         "expand_kernel": wide.expand_tuned, "weight_grad_kernel": weight_grad.weight_grad_tuned}


def _jit_kernels() -> dict[str, object]:
    """Every jit kernel the package launches, by name (what the kernel modules define as ``*_kernel``)."""
    found = {}
    for module in (fused, wide, weight_grad):
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "arg_names"):
                found[name] = value
    return found


def test_every_kernel_has_a_record() -> None:
    assert set(_jit_kernels()) == set(records.RECORDS)


@pytest.mark.parametrize("name", sorted(records.RECORDS))
def test_record_fields_are_the_kernels_parameters(name: str) -> None:
    """The fields are the kernel's parameters in signature order, and the rest of its parameters are
    exactly the block sizes every one of its tuning configurations sets."""
    kernel = _jit_kernels()[name]
    fields = list(records.RECORDS[name]._fields)
    names = list(kernel.arg_names)  # type: ignore[attr-defined]
    assert names == list(inspect.signature(kernel.fn).parameters)  # type: ignore[attr-defined]
    assert names[:len(fields)] == fields
    rest = names[len(fields):]
    if name in TUNED:
        tuned = TUNED[name]
        assert list(tuned.arg_names) == names
        assert rest and all(set(config.kwargs) == set(rest) for config in tuned.configs), rest
        assert set(tuned.keys) <= set(fields)  # the launcher reads the autotuning key from the record
    else:
        assert rest == []


def test_a_misnamed_or_missing_field_is_an_error() -> None:
    x = torch.zeros(2, 2)
    fields: dict[str, Any] = {"partial_ptr": x, "out_ptr": x, "total": 4, "groups": 2, "BLOCK": REDUCE_BLOCK}
    assert records.ReduceGroupsArgs(**fields).total == 4
    with pytest.raises(TypeError):
        records.ReduceGroupsArgs(**{**{k: v for k, v in fields.items() if k != "total"}, "totl": 4})
    with pytest.raises(TypeError):
        records.ReduceGroupsArgs(**{k: v for k, v in fields.items() if k != "groups"})


def test_fused_record_reads_strides_from_the_tensors() -> None:
    """Forward: W_down as given, biases through their strides, no index, h not stored; backward:
    both weights read transposed, the saved h's row stride, no row output."""
    n, rows, d, r = 3, 5, 40, 24
    x = torch.randn(d, rows).t()  # column-major
    down = torch.randn(n, r, d)
    up = torch.randn(n, d, 2 * r)[:, :, ::2]  # strided columns
    down_bias = torch.randn(n, 2 * r)[:, ::2]
    y = torch.empty(rows, d)
    index = torch.zeros(2 * rows, dtype=torch.int64)[::2]
    args = records.fused_rows_args(
        src=x, w1=down, b1=down_bias, saved_h=None, mid=None, w2=up, b2=None, out=y, res=x, index=index,
        rows_per_index=1, scale=0.5, act=2, backward=False, add_residual=True, transposed=False, dot_f32=True,
        precision="ieee")
    assert (args.stride_sm, args.stride_sk) == x.stride() == (1, rows)
    assert (args.stride_w1a, args.stride_w1r, args.stride_w1k) == down.stride()
    assert (args.stride_w2a, args.stride_w2n, args.stride_w2r) == up.stride()
    assert (args.b1_ptr, args.stride_b1a, args.stride_b1r) == (down_bias, 2 * r, 2)
    assert args.b2_ptr is up and (args.stride_b2a, args.stride_b2n) == (0, 0) and not args.HAS_B2 and args.HAS_B1
    assert args.idx_ptr is index and args.stride_idx == 2 and args.n_adapters == n and args.GROUPED
    assert args.saved_h_ptr is x and args.mid_ptr is x and args.stride_hm == 0 and not args.STORE_MID
    assert args.out_ptr is y and args.STORE_OUT and (args.M, args.D, args.R) == (rows, d, r)
    assert args.R_PAD == padded_rank(r) and args.rows_bucket == 16

    g = torch.randn(rows, d)
    h = torch.randn(rows, 3 * r)[:, :r]
    back = records.fused_rows_args(
        src=g, w1=up[0], b1=None, saved_h=h, mid=None, w2=down[0], b2=None, out=None, res=g, index=None,
        rows_per_index=7, scale=0.5, act=2, backward=True, add_residual=False, transposed=True, dot_f32=True,
        precision="ieee")
    assert (back.stride_w1a, back.stride_w1r, back.stride_w1k) == (0, up.stride(2), up.stride(1))
    assert (back.stride_w2a, back.stride_w2n, back.stride_w2r) == (0, 1, d)
    assert back.R == r and back.saved_h_ptr is h and back.stride_hm == 3 * r
    assert back.mid_ptr is h and not back.STORE_MID  # the saved h's dtype, as the tuning key had it
    assert back.out_ptr is g and not back.STORE_OUT and not back.GROUPED
    assert (back.idx_ptr, back.stride_idx, back.rows_per_index, back.n_adapters) == (g, 0, 1, 1)


def test_weight_grad_and_reduce_records() -> None:
    rows, d, r, groups = 9, 32, 8, 3
    grad, x = torch.randn(rows, d), torch.randn(rows, d)
    h = torch.randn(rows, r)
    weight = torch.randn(r, d)
    total = 2 * d * r + d + r
    partial = torch.empty(groups, total)
    args = records.weight_grad_args(
        grad=grad, x=x, h=h, gh=None, weight=weight, out=partial, offsets=(d * r, 2 * d * r, 2 * d * r + d),
        groups=groups, index=None, rows_per_index=1, scale=2.0, act=0, need_up_weight=True, need_up_bias=True,
        need_down_weight=False, need_down_bias=False, dot_f32=True, precision="ieee")
    assert args.gh_ptr is h and args.group_stride == total and args.rows_per_group == 3 and args.groups == groups
    assert (args.off_wd, args.off_bu, args.off_bd) == (d * r, 2 * d * r, 2 * d * r + d) and args.R_PAD == 16
    reduce = records.reduce_groups_args(partial=partial, out=torch.empty(total))
    assert (reduce.total, reduce.groups, reduce.BLOCK) == (total, groups, REDUCE_BLOCK)
