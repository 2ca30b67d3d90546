"""CUDA graph capture of the fused op: forward (inference) and forward + backward, replayed on new
data and checked against eager runs and float64 truth; make_graphed_callables; and
torch.compile(mode="reduce-overhead"), which captures through CUDA graph trees. GPU only.

Capture needs the launcher to be free of host syncs and of allocations whose size changes between
calls: the warm-up runs before capture compile the kernels and settle the autotuner for the
captured shapes, after which a launch is host-side work plus the kernel itself."""

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from adapter_fused import FusedAdapter
from tests.cases import Problem, float64_truth
from tests.tolerances import TOLERANCE, relative_error

pytestmark = pytest.mark.gpu

D, ROWS = 256, 96


def make_model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(41)
    model = nn.Sequential(FusedAdapter(D, 32, "gelu", 0.5), FusedAdapter(D, 16, "silu", 2.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    return model.to("cuda", dtype)


def warm_up(step: Callable[[], None], times: int = 3) -> None:
    """Run ``step`` on a side stream (as capture requires of autograd's first runs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(side)


def new_data(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2, ROWS // 2, D, device="cuda", dtype=dtype, generator=gen)
    grad = torch.randn(2, ROWS // 2, D, device="cuda", dtype=dtype, generator=gen)
    return x, grad


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Same kernels and configuration as eager: equal up to a rounding step of the dtype."""
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} against eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capture_and_replay_forward(dtype: torch.dtype) -> None:
    adapter = FusedAdapter(D, 32, "gelu", 0.5).to("cuda", dtype)
    static_x, _ = new_data(0, dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        warm_up(lambda: adapter(static_x))
        with torch.cuda.graph(graph):
            static_y = adapter(static_x)
        before = torch.cuda.memory_allocated()
        for seed in (1, 2, 3):
            x, _ = new_data(seed, dtype)
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == before, "replay allocated memory"
            assert_near(static_y, adapter(x), dtype, f"y, data {seed}")
            p = Problem(x, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias, x)
            y_true, _ = float64_truth(p, "gelu", 0.5)
            err = relative_error(static_y, y_true)
            assert err <= TOLERANCE[dtype], f"y against float64 truth: {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capture_and_replay_forward_and_backward(dtype: torch.dtype) -> None:
    model = make_model(dtype)
    eager = copy.deepcopy(model)
    x0, g0 = new_data(10, dtype)
    static_x = x0.clone().requires_grad_()
    static_grad = g0.clone()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        static_x.grad = None
        model(static_x).backward(static_grad)

    warm_up(step)
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.backward(static_grad)
    grads = [static_x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)

    for seed in (11, 12, 13):
        x, grad = new_data(seed, dtype)
        with torch.no_grad():
            static_x.copy_(x)
        static_grad.copy_(grad)
        graph.replay()
        torch.cuda.synchronize()

        leaf = x.clone().requires_grad_()
        eager.zero_grad(set_to_none=True)
        y = eager(leaf)
        y.backward(grad)
        assert_near(static_y.detach(), y.detach(), dtype, f"y, data {seed}")
        want = [leaf.grad] + [p.grad for p in eager.parameters()]
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        for name, got, expected in zip(names, grads, want):
            assert_near(got, expected, dtype, f"d{name}, data {seed}")  # type: ignore[arg-type]


def test_make_graphed_callables_trains_like_eager() -> None:
    dtype = torch.float32
    model = make_model(dtype)
    eager = copy.deepcopy(model)
    sample = new_data(20, dtype)[0].requires_grad_()
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    opt_graphed = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    for seed in (21, 22, 23):
        x, target = new_data(seed, dtype)
        for module, opt in ((graphed, opt_graphed), (eager, opt_eager)):
            opt.zero_grad(set_to_none=True)
            (module(x.clone().requires_grad_()) - target).square().mean().backward()
            opt.step()
        for (name, a), b in zip(model.named_parameters(), eager.parameters()):
            assert_near(a.grad, b.grad, dtype, f"d{name}, step {seed}")  # type: ignore[arg-type]
            assert_near(a.detach(), b.detach(), dtype, f"{name}, step {seed}")


def test_compile_reduce_overhead_matches_eager() -> None:
    dtype = torch.float32
    model = make_model(dtype)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seed in range(30, 35):  # the first calls record, later ones replay the CUDA graph
        x, grad = new_data(seed, dtype)
        outputs = []
        for module, params in ((compiled, model), (eager, eager)):
            params.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            y = module(leaf)
            y.backward(grad)
            outputs.append((y.detach().clone(), leaf.grad, [p.grad.clone() for p in params.parameters()]))
        (y_c, dx_c, g_c), (y_e, dx_e, g_e) = outputs
        assert_near(y_c, y_e, dtype, f"y, call {seed}")
        assert_near(dx_c, dx_e, dtype, f"dx, call {seed}")  # type: ignore[arg-type]
        for a, b in zip(g_c, g_e):
            assert_near(a, b, dtype, f"parameter grad, call {seed}")
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0, "inductor did not use CUDA graphs"
