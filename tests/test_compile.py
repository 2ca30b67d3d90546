"""torch.compile(fullgraph=True) over models holding FusedAdapter: no graph break, forward and
backward, the registered ops in the traced graphs, eager numbers; the op registration itself
checked with torch.library.opcheck."""

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from adapter_fused import FusedAdapter, fused_adapter
from adapter_fused import ops as ops_module
from adapter_fused.library import adapter_backward, adapter_forward
from tests.cases import float64_truth, make_problem
from tests.conftest import DEVICE
from tests.tolerances import relative_error

FORWARD_OP = torch.ops.adapter_fused.adapter_forward.default
BACKWARD_OP = torch.ops.adapter_fused.adapter_backward.default
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.linear.default}


class AdapterStack(nn.Module):
    """Two adapters with an eager op between them: x (..., d) -> (..., d)."""

    def __init__(self, d: int, r: int, between: bool = True) -> None:
        super().__init__()
        self.first = FusedAdapter(d, r, "gelu", 0.5)
        self.second = FusedAdapter(d, r + 8, "silu", 1.5, init="houlsby")
        self.between = between
        with torch.no_grad():  # order-one values at every stage (the inits are ~1e-2)
            gen = torch.Generator().manual_seed(11)
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.between:
            h = torch.tanh(h)
        return self.second(h)


class GraphRecorder:
    """A torch.compile backend that runs AOTAutograd's forward and backward graphs eagerly and
    keeps them (``fw`` and ``bw``), counting how many graphs dynamo handed over."""

    def __init__(self) -> None:
        self.fw: list[torch.fx.GraphModule] = []
        self.bw: list[torch.fx.GraphModule] = []
        self.dynamo_graphs = 0

        def keep(store: list[torch.fx.GraphModule]) -> Callable:
            def compiler(gm: torch.fx.GraphModule, _inputs: list) -> Callable:
                store.append(gm)
                return make_boxed_func(gm.forward)
            return compiler

        self._aot = aot_autograd(fw_compiler=keep(self.fw), bw_compiler=keep(self.bw))

    def __call__(self, gm: torch.fx.GraphModule, inputs: list) -> Callable:
        self.dynamo_graphs += 1
        return self._aot(gm, inputs)


def calls(graphs: list[torch.fx.GraphModule], op: object) -> list[torch.fx.Node]:
    return [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target is op]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test traces anew (dispatch decisions are baked into a trace)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_model(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward, backward with ``grad``; returns y and [dx, *parameter grads] (then clears them)."""
    leaf = x.detach().clone().requires_grad_()
    y = model(leaf)
    y.backward(grad)
    grads = [leaf.grad] + [p.grad.clone() for p in model.parameters()]  # type: ignore[list-item]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads  # type: ignore[return-value]


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_inductor_fullgraph_matches_eager(path: str, monkeypatch: pytest.MonkeyPatch, launches) -> None:  # type: ignore[no-untyped-def]
    """The default backend, forward and backward, on the kernel path (interpreter on CPU) and on the
    reference path (kernels unavailable)."""
    if path == "reference":
        monkeypatch.setattr(ops_module, "load_kernels", lambda: None)
    model = AdapterStack(40, 16).to(DEVICE)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 7, 40, generator=gen).to(DEVICE)
    grad = torch.randn(3, 7, 40, generator=gen).to(DEVICE)
    y_eager, g_eager = run_model(model, x, grad)
    launches.clear()
    compiled = torch.compile(model, fullgraph=True)
    y_comp, g_comp = run_model(compiled, x, grad)
    if path == "kernels":
        # forward: one launch per adapter; backward: the input- and weight-gradient kernels per adapter
        assert launches.names.count("fused_rows_kernel") == 4, launches.names
        assert launches.names.count("weight_grad_kernel") == 2, launches.names
    else:
        assert len(launches) == 0
    assert_close_to(y_comp, y_eager, 1e-5, "y")
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g_comp, g_eager):
        assert_close_to(a, b, 1e-5, f"d{name}")


def test_traced_graphs_hold_the_fused_ops_and_give_eager_bits() -> None:
    """Forward graph: one adapter_forward per adapter and no matmul; backward graph: one
    adapter_backward per adapter and no matmul. aot_eager runs the same ops, so bits match eager."""
    model = AdapterStack(48, 16, between=False).to(DEVICE)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 9, 48, generator=gen).to(DEVICE)
    grad = torch.randn(2, 9, 48, generator=gen).to(DEVICE)
    y_eager, g_eager = run_model(model, x, grad)
    recorder = GraphRecorder()
    y_comp, g_comp = run_model(torch.compile(model, backend=recorder, fullgraph=True), x, grad)

    assert recorder.dynamo_graphs == 1
    assert len(calls(recorder.fw, FORWARD_OP)) == 2
    assert len(calls(recorder.bw, BACKWARD_OP)) == 2
    assert not [n for g in recorder.fw + recorder.bw for n in g.graph.nodes if n.target in MATMULS]
    assert torch.equal(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        assert torch.equal(a, b)


def test_compiled_inference_is_one_launch(launches) -> None:  # type: ignore[no-untyped-def]
    adapter = FusedAdapter(64, 16, "relu").to(DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    recorder = GraphRecorder()
    compiled = torch.compile(adapter, backend=recorder, fullgraph=True)
    with torch.no_grad():
        want = adapter(x)
        launches.clear()
        got = compiled(x)
    assert launches.names == ["fused_rows_kernel"]
    (node,) = calls(recorder.fw, FORWARD_OP)
    assert node.args[7] is False, "inference must not store h"
    assert torch.equal(got, want)


def test_only_requested_gradients_under_compile(launches) -> None:  # type: ignore[no-untyped-def]
    """A frozen adapter under compile: the backward op is asked for dx only and runs one launch."""
    adapter = FusedAdapter(40, 16, "tanh").to(DEVICE).requires_grad_(False)
    p = make_problem((21,), 40, 16, torch.float32, DEVICE, seed=14)
    with torch.no_grad():
        for param, value in zip((adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias),
                                p.params):
            param.copy_(value)  # type: ignore[arg-type]
    recorder = GraphRecorder()
    compiled = torch.compile(adapter, backend=recorder, fullgraph=True)
    x = p.x.detach().clone().requires_grad_()
    y = compiled(x)
    launches.clear()
    y.backward(p.grad)
    (node,) = calls(recorder.bw, BACKWARD_OP)
    assert node.args[7:12] == (True, False, False, False, False)
    assert launches.names == ["fused_rows_kernel"]
    _, truth = float64_truth(p, "tanh", 1.0)
    assert_close_to(x.grad, truth[0], 1e-5, "dx")  # type: ignore[arg-type]
    assert all(param.grad is None for param in adapter.parameters())


def test_dynamic_row_counts_share_one_graph() -> None:
    adapter = FusedAdapter(32, 8, "gelu_tanh", 0.7).to(DEVICE)
    recorder = GraphRecorder()
    compiled = torch.compile(adapter, backend=recorder, fullgraph=True, dynamic=True)
    for rows in (13, 40, 77):  # (a single row would be specialized: sizes 0 and 1 always are)
        x = torch.randn(rows, 32, device=DEVICE)
        grad = torch.randn(rows, 32, device=DEVICE)
        y_eager, g_eager = run_model(adapter, x, grad)
        y_comp, g_comp = run_model(compiled, x, grad)
        assert torch.equal(y_comp, y_eager), rows
        for a, b in zip(g_comp, g_eager):
            assert torch.equal(a, b), rows
    assert len(recorder.fw) == len(recorder.bw) == 1, "a row count recompiled"


def test_deterministic_mode_reaches_the_traced_ops() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = AdapterStack(32, 16, between=False).to(DEVICE)
        recorder = GraphRecorder()
        compiled = torch.compile(model, backend=recorder, fullgraph=True)
        x = torch.randn(25, 32, device=DEVICE)
        grad = torch.randn(25, 32, device=DEVICE)
        first = run_model(compiled, x, grad)
        again = run_model(compiled, x, grad)
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(n.args[8] is True for n in calls(recorder.fw, FORWARD_OP))
    assert all(n.args[12] is True for n in calls(recorder.bw, BACKWARD_OP))
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_autocast_under_compile_matches_eager_autocast() -> None:
    adapter = FusedAdapter(64, 16, "gelu", 0.5).to(DEVICE)
    x = torch.randn(2, 11, 64, device=DEVICE)
    grad = torch.randn(2, 11, 64, device=DEVICE)

    def step(module: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return run_model(module, x, grad)

    y_eager, g_eager = step(adapter)
    y_comp, g_comp = step(torch.compile(adapter, backend=GraphRecorder(), fullgraph=True))
    assert y_comp.dtype == y_eager.dtype == torch.float32
    assert torch.equal(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_float64_compiles_to_the_reference() -> None:
    p = make_problem((6,), 24, 8, torch.float64, DEVICE, seed=15)
    recorder = GraphRecorder()
    compiled = torch.compile(fused_adapter, backend=recorder, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in p.inputs]  # type: ignore[union-attr]
    y = compiled(*leaves, "silu", 0.5)
    y.backward(p.grad)
    y_true, grads_true = float64_truth(p, "silu", 0.5)
    assert not calls(recorder.fw, FORWARD_OP)
    assert relative_error(y, y_true) <= 1e-12
    for leaf, truth in zip(leaves, grads_true):
        assert relative_error(leaf.grad, truth) <= 1e-12  # type: ignore[arg-type]


def test_bad_input_is_refused_under_compile(launches) -> None:  # type: ignore[no-untyped-def]
    """The validation error surfaces from compiled code too: as itself where dynamo may fall back to
    eager, inside dynamo's error (message kept) under fullgraph=True."""
    p = make_problem((3,), 40, 8, torch.float32, DEVICE)
    bad = (p.x, p.down_weight, p.down_bias, p.up_weight[:, :-1], p.up_bias)
    message = r"up_weight must have shape \(d, r\) = \(40, 8\), got \(40, 7\)"
    with pytest.raises(ValueError, match=message):
        torch.compile(fused_adapter, backend=GraphRecorder())(*bad)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(fused_adapter, backend=GraphRecorder(), fullgraph=True)(*bad)
    assert len(launches) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(bias: bool) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes)."""
    p = make_problem((7,), 24, 16, torch.float32, DEVICE, bias=bias, seed=16)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in p.inputs]
    for save_h in (True, False):
        result = torch.library.opcheck(adapter_forward, (*leaves, "gelu", 0.5, save_h, False))
        assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_backward() -> None:
    p = make_problem((7,), 24, 16, torch.float32, DEVICE, seed=17)
    _, h = adapter_forward(*p.inputs, "silu", 0.5, True, False)  # type: ignore[arg-type]
    args = (p.grad, p.x, h, p.down_weight, p.up_weight, "silu", 0.5, True, True, True, True, True, False)
    result = torch.library.opcheck(adapter_backward, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_inductor_fullgraph_matches_eager(dtype: torch.dtype) -> None:
    model = AdapterStack(256, 32).to("cuda", dtype)
    x = torch.randn(4, 100, 256, device="cuda", dtype=dtype)
    grad = torch.randn(4, 100, 256, device="cuda", dtype=dtype)
    y_eager, g_eager = run_model(model, x, grad)
    y_comp, g_comp = run_model(torch.compile(model, fullgraph=True), x, grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close_to(y_comp, y_eager, tol, "y")
    for a, b in zip(g_comp, g_eager):
        assert a.dtype == dtype
        assert_close_to(a, b, tol, "grad")


def test_grouped_op_compiles_fullgraph_forward_and_backward() -> None:
    """The grouped adapter goes through the same registered ops: one graph, eager numbers."""
    from adapter_fused import fused_adapter_grouped

    gen = torch.Generator().manual_seed(5)
    n, d, r = 3, 40, 16
    x = torch.randn(4, 6, d, generator=gen).to(DEVICE)
    params = [(torch.randn(*shape, generator=gen) * 0.3).to(DEVICE)
              for shape in ((n, r, d), (n, r), (n, d, r), (n, d))]
    index = torch.tensor([2, -1, 0, 2], device=DEVICE)
    grad = torch.randn(x.shape, generator=gen).to(DEVICE)

    def step(fn: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[type-arg]
        leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
        y = fn(leaves[0], index, *leaves[1:])
        y.backward(grad)
        return y.detach(), [t.grad for t in leaves]  # type: ignore[misc]

    def grouped(x: torch.Tensor, index: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return torch.tanh(fused_adapter_grouped(x, index, *p, "gelu", 0.5, check_index=False))

    recorder = GraphRecorder()
    compiled = torch.compile(grouped, backend=recorder, fullgraph=True)
    want, want_grads = step(grouped)
    got, got_grads = step(compiled)
    assert recorder.dynamo_graphs == 1
    assert len(calls(recorder.fw, FORWARD_OP)) == 1 and len(calls(recorder.bw, BACKWARD_OP)) == 1
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)
