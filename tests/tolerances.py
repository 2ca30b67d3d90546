"""Per-dtype tolerances, in one place, and the comparison every parity test uses.

A result matches when its largest error against float64 truth, divided by the largest magnitude
of the truth, is at most the dtype's tolerance. The tolerances sit a few roundings above the
dtype's unit roundoff (fp32 2^-24, fp16 2^-11, bf16 2^-9): the fused op rounds its output once and
its r-wide hidden once, as eager PyTorch does at each of its steps.
"""

import torch

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| / max |truth| (plain max error when the truth is all zero)."""
    assert actual.shape == truth.shape, f"shape {tuple(actual.shape)} != truth shape {tuple(truth.shape)}"
    if truth.numel() == 0:
        return 0.0
    err = (actual.detach().double().cpu() - truth.detach().double().cpu()).abs().max().item()
    scale = truth.detach().abs().max().item()
    return err / scale if scale > 0 else err


def assert_matches(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Fail with the measured error when ``actual`` is further from ``truth`` than dtype allows."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    err = relative_error(actual, truth)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"
