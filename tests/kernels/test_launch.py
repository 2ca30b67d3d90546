"""The host launchers directly: the split-row weight-gradient reduction, path selection, launch counts."""

import pytest
import torch

from adapter_fused.kernels import ACTIVATION_CODES, MAX_FUSED_R, adapter_backward, adapter_forward, padded_rank
from tests.cases import float64_truth, make_problem
from tests.conftest import DEVICE
from tests.tolerances import assert_matches

ALL = dict(need_x=True, need_down_weight=True, need_down_bias=True, need_up_weight=True, need_up_bias=True)


def test_padded_rank() -> None:
    assert [padded_rank(r) for r in (1, 8, 16, 17, 24, 48, 64, 256, 257)] == [16, 16, 16, 32, 32, 64, 64, 256, 512]
    assert MAX_FUSED_R == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 3, 7])
def test_row_groups_reduce_to_the_truth(groups: int, dtype: torch.dtype, launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((53,), 72, 24, dtype, DEVICE, seed=11)
    code = ACTIVATION_CODES["silu"]
    y, h = adapter_forward(p.x, p.down_weight, p.down_bias, p.up_weight, p.up_bias, code, 0.6, save_h=True)
    assert h is not None and h.dtype == torch.float32 and h.shape == (53, 24)
    launches.clear()
    grads = adapter_backward(p.grad, p.x, h, p.down_weight, p.up_weight, code, 0.6, row_groups=groups, **ALL)
    assert len(launches) == (2 if groups == 1 else 3), launches.names
    y_true, grads_true = float64_truth(p, "silu", 0.6)
    assert_matches(y, y_true, dtype, "y")
    for name, g, t in zip(["dx", "dW_down", "db_down", "dW_up", "db_up"], grads, grads_true):
        assert_matches(g, t, dtype, f"{name} with {groups} row groups")  # type: ignore[arg-type]


def test_wide_path_backward_is_three_launches(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((6,), 24, 300, torch.float32, DEVICE, seed=12)
    code = ACTIVATION_CODES["gelu"]
    _, h = adapter_forward(p.x, p.down_weight, p.down_bias, p.up_weight, p.up_bias, code, 1.0, save_h=True)
    launches.clear()
    adapter_backward(p.grad, p.x, h, p.down_weight, p.up_weight, code, 1.0, row_groups=4, **ALL)
    assert launches.names == ["project_kernel", "expand_kernel", "weight_grad_kernel"]


def test_saved_h_is_the_pre_activation() -> None:
    p = make_problem((10,), 40, 16, torch.float32, DEVICE)
    _, h = adapter_forward(p.x, p.down_weight, p.down_bias, p.up_weight, p.up_bias, ACTIVATION_CODES["relu"], 1.0, True)
    want = p.x.double() @ p.down_weight.double().T + p.down_bias.double()  # type: ignore[union-attr]
    assert h is not None and (h.double() - want).abs().max().item() < 1e-5
    assert (h < 0).any(), "h must be stored before the activation"


def test_inference_does_not_store_h(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((10,), 40, 16, torch.float32, DEVICE)
    y, h = adapter_forward(p.x, p.down_weight, p.down_bias, p.up_weight, p.up_bias, ACTIVATION_CODES["relu"], 1.0, False)
    assert h is None and len(launches) == 1


@pytest.mark.parametrize("layout", ["transposed", "strided-rows", "offset"])
def test_saved_h_in_any_layout_gives_the_same_gradients(layout: str) -> None:
    """The launchers take the saved h (M, R) in any layout: the same gradients, bit for bit."""
    p = make_problem((19,), 40, 24, torch.float32, DEVICE, seed=14)
    code = ACTIVATION_CODES["gelu"]
    _, h = adapter_forward(p.x, p.down_weight, p.down_bias, p.up_weight, p.up_bias, code, 0.8, save_h=True)
    assert h is not None
    if layout == "transposed":
        other = h.t().contiguous().t()
    elif layout == "strided-rows":
        other = torch.zeros(19, 3 * 24, device=DEVICE)[:, ::3]
        other.copy_(h)
    else:
        other = torch.zeros(19 * 24 + 5, device=DEVICE)[5:].view(19, 24)
        other.copy_(h)
    assert torch.equal(other, h) and (other.stride() != h.stride() or other.storage_offset() != 0)
    want = adapter_backward(p.grad, p.x, h, p.down_weight, p.up_weight, code, 0.8, **ALL)
    got = adapter_backward(p.grad, p.x, other, p.down_weight, p.up_weight, code, 0.8, **ALL)
    for a, b in zip(got, want):
        assert a is not None and b is not None and torch.equal(a, b)
