"""pytest-benchmark tests on tiny shapes, through the shared harness (CPU: Triton interpreter).

Run with ``python -m pytest benchmarks -q``; the main test run (``tests/``) does not collect them.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks.harness import (
    SMOKE_TIMING,
    Case,
    Inputs,
    Skip,
    bench_case,
    build_provider,
    make_adapter,
    make_inputs,
    minimal_bytes,
    op_runner,
    provider_unavailable,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = Case(M=16, d=64, r=16, dtype=torch.float32)
TRAIN_OPS = ("forward", "forward_train", "backward", "forward_backward")


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so wall-clock timing covers the kernels."""
    if DEVICE.type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out
    return run


def _setup(provider: str) -> tuple[torch.nn.Module, Inputs]:
    reason = provider_unavailable(provider, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    source = make_adapter("eager", CASE.d, CASE.r)
    try:
        module = build_provider(provider, source, DEVICE, CASE.dtype)  # type: ignore[arg-type]
    except Exception as exc:  # e.g. no C compiler for inductor
        pytest.skip(f"{provider} cannot be built here: {exc}")
    return module, make_inputs(CASE, DEVICE)


@pytest.mark.parametrize("op", TRAIN_OPS)
@pytest.mark.parametrize("provider", ["fused", "eager", "adapterhub"])
def test_adapter_op(benchmark: Any, provider: str, op: str) -> None:
    """Each op of each provider runs under pytest-benchmark and returns the eager result."""
    module, inputs = _setup(provider)
    fn, leaves = op_runner(op, module, inputs)

    def reset() -> None:
        for t in leaves:
            t.grad = None

    benchmark.extra_info.update(op=op, provider=provider, M=CASE.M, d=CASE.d, r=CASE.r, dtype=CASE.dtype_name,
                                minimal_bytes=minimal_bytes(op, CASE.M, CASE.d, CASE.r, CASE.dtype.itemsize))
    benchmark.pedantic(_synced(fn), setup=reset, rounds=3, warmup_rounds=1)

    eager, eager_inputs = _setup("eager")
    with torch.no_grad():
        expected = eager(eager_inputs.x)
        got = module(inputs.x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if op in ("backward", "forward_backward"):
        eager(eager_inputs.x_train).backward(eager_inputs.grad)
        assert inputs.x_train.grad is not None
        torch.testing.assert_close(inputs.x_train.grad, eager_inputs.x_train.grad, rtol=1e-4, atol=1e-4)


def test_compile_forward(benchmark: Any) -> None:
    """torch.compile of the eager module runs through the harness (skipped where inductor cannot build)."""
    module, inputs = _setup("compile")
    fn, _ = op_runner("forward", module, inputs)
    try:
        fn()
    except Exception as exc:
        pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: {exc}")
    benchmark.pedantic(_synced(fn), rounds=3, warmup_rounds=1)


def test_compile_backward_replays() -> None:
    """Every op of torch.compile's module is measured, the backward-only op too: it replays one
    compiled graph's backward, which AOTAutograd refuses when it donated the graph's buffers (seen
    with the smoke run's cases in order, on one thread)."""
    reason = provider_unavailable("compile", DEVICE)
    if reason is not None:
        pytest.skip(reason)
    skips: list[Skip] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in (1, 16, 64):
            case = Case(M=rows, d=CASE.d, r=CASE.r, dtype=CASE.dtype)
            records = bench_case(case, ["compile"], TRAIN_OPS, DEVICE, 1.0, SMOKE_TIMING, skips=skips)
            assert len(records) == len(TRAIN_OPS)
    finally:
        torch.set_num_threads(threads)
    if any("build failed" in s.reason for s in skips):
        pytest.skip(f"torch.compile cannot be built here: {skips[0].reason}")
    assert [s.reason for s in skips] == []
