"""fused_adapter against float64 truth: every activation, dtype and awkward shape; gradients;
launch counts; determinism; bad input; autocast; NaN/Inf."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adapter_fused import ACTIVATIONS, fused_adapter, reference_adapter
from adapter_fused import ops as ops_module
from tests.cases import Problem, float64_truth, make_problem, run_with_grads
from tests.conftest import DEVICE, RecordAtenOps
from tests.tolerances import assert_matches, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CANONICAL = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu", "identity"]
NAMES = ["x", "down_weight", "down_bias", "up_weight", "up_bias"]


def check_parity(p: Problem, activation: str, scale: float, dtype: torch.dtype,
                 requires: tuple[bool, ...] = (True,) * 5) -> None:
    y, grads = run_with_grads(fused_adapter, p, activation, scale, requires)
    y_true, grads_true = float64_truth(p, activation, scale)
    assert y.shape == p.x.shape
    assert_matches(y, y_true, dtype, "y")
    for name, req, g, g_true in zip(NAMES, requires, grads, grads_true):
        if g_true is None:
            continue
        if req:
            assert g is not None, f"{name}: no gradient"
            assert_matches(g, g_true, dtype, f"d{name}")
        else:
            assert g is None, f"{name}: gradient computed although not requested"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", CANONICAL)
def test_every_activation_and_dtype(activation: str, dtype: torch.dtype) -> None:
    p = make_problem((37,), 200, 24, dtype, DEVICE, seed=1)
    check_parity(p, activation, 0.7, dtype)


SHAPES = {
    # name: (leading dims, d, r, activation, bias)
    "one-row": ((1,), 64, 16, "relu", True),
    "zero-rows": ((0,), 64, 16, "silu", True),
    "3d-r48-d768": ((2, 3), 768, 48, "gelu", True),
    "r8-padded": ((20,), 40, 8, "tanh", True),
    "odd-d-prime-rows": ((31,), 200, 24, "leaky_relu", True),
    "no-bias": ((17,), 72, 16, "sigmoid", False),
    "wide-r264": ((9,), 40, 264, "gelu_tanh", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_awkward_shapes(shape: str, dtype: torch.dtype) -> None:
    lead, d, r, activation, bias = SHAPES[shape]
    p = make_problem(lead, d, r, dtype, DEVICE, bias=bias, seed=2)
    check_parity(p, activation, 1.3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided-columns", "transposed-3d"])
def test_non_contiguous_input(layout: str, dtype: torch.dtype) -> None:
    p = make_problem((6, 5), 48, 16, dtype, DEVICE, seed=3)
    if layout == "strided-columns":
        wide = torch.zeros(6, 5, 96, dtype=dtype, device=DEVICE)
        wide[..., ::2] = p.x
        p.x = wide[..., ::2]
    else:
        p.x = p.x.transpose(0, 1).contiguous().transpose(0, 1)
        p.grad = p.grad.transpose(0, 1).contiguous().transpose(0, 1)
    assert not p.x.is_contiguous()
    check_parity(p, "gelu", 0.5, dtype)


def test_aliases_give_the_same_numbers() -> None:
    p = make_problem((9,), 32, 16, torch.float32, DEVICE)
    for alias, name in [("swish", "silu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                        ("linear", "identity"), ("ReLU", "relu")]:
        assert torch.equal(fused_adapter(*p.inputs, alias), fused_adapter(*p.inputs, name)), alias


REQUIRES = {
    "frozen-adapter": (True, False, False, False, False),
    "x-without-grad": (False, True, True, True, True),
    "only-up": (False, False, False, True, True),
    "only-biases": (False, False, True, False, True),
    "x-and-down-weight": (True, True, False, False, False),
}
# Triton launches the backward needs for each case (one-pass path, one row group).
BACKWARD_LAUNCHES = {"frozen-adapter": 1, "x-without-grad": 2, "only-up": 1, "only-biases": 2, "x-and-down-weight": 2}


@pytest.mark.parametrize("case", list(REQUIRES))
def test_only_requested_gradients(case: str, launches) -> None:  # type: ignore[no-untyped-def]
    requires = REQUIRES[case]
    p = make_problem((21,), 40, 16, torch.float32, DEVICE, seed=4)
    check_parity(p, "silu", 0.9, torch.float32, requires)

    leaves = [t.detach().clone().requires_grad_(req) for t, req in zip(p.inputs, requires)]  # type: ignore[union-attr]
    y = fused_adapter(*leaves, "silu", 0.9)
    launches.clear()
    y.backward(p.grad)
    assert len(launches) == BACKWARD_LAUNCHES[case], launches.names


def test_no_grad_anywhere_returns_plain_tensor() -> None:
    p = make_problem((4,), 32, 16, torch.float32, DEVICE)
    y = fused_adapter(*p.inputs)
    assert not y.requires_grad


def test_forward_is_one_launch_and_nothing_else(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((2, 9), 64, 16, torch.float32, DEVICE)
    for t in p.inputs:
        t.requires_grad_()  # type: ignore[union-attr]
    with RecordAtenOps(launches) as ops:
        fused_adapter(*p.inputs, "gelu", 2.0)
    assert len(launches) == 1, launches.names
    assert launches.names == ["fused_rows_kernel"]
    assert ops.compute_ops() == [], f"eager compute ops ran beside the kernel: {ops.compute_ops()}"


def test_wide_bottleneck_forward_is_two_launches(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((5,), 32, 300, torch.float32, DEVICE)
    fused_adapter(*p.inputs, "relu")
    assert launches.names == ["project_kernel", "expand_kernel"]


def test_backward_runs_no_torch_math(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((13,), 48, 16, torch.float32, DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in p.inputs]  # type: ignore[union-attr]
    y = fused_adapter(*leaves, "tanh", 1.0)
    with RecordAtenOps(launches) as ops:
        y.backward(p.grad)
    assert ops.compute_ops() == [], f"eager ops in the backward: {ops.compute_ops()}"
    assert all(t.grad is not None for t in leaves)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_gradients_are_bitwise_repeatable(dtype: torch.dtype) -> None:
    p = make_problem((45,), 72, 24, dtype, DEVICE, seed=5)
    first = run_with_grads(fused_adapter, p, "gelu", 0.8)
    for _ in range(2):
        again = run_with_grads(fused_adapter, p, "gelu", 0.8)
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert a is not None and b is not None and torch.equal(a, b)


@given(
    rows=st.integers(0, 40),
    d=st.integers(1, 80),
    r=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(CANONICAL),
    scale=st.floats(-4, 4).filter(lambda s: s == 0 or abs(s) > 1e-3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows: int, d: int, r: int, dtype: torch.dtype, activation: str, scale: float,
                       bias: bool, seed: int) -> None:
    p = make_problem((rows,), d, r, dtype, DEVICE, bias=bias, seed=seed)
    check_parity(p, activation, scale, dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_propagate_as_in_the_reference() -> None:
    p = make_problem((8,), 40, 16, torch.float32, DEVICE, seed=6)
    p.x[1, 3] = float("nan")
    p.x[4, 0] = float("inf")
    p.x[6, 7] = -float("inf")
    for activation in ("relu", "gelu", "sigmoid"):
        got = fused_adapter(*p.inputs, activation)
        want = reference_adapter(*p.inputs, activation)
        assert torch.equal(got.isnan(), want.isnan()), activation
        assert torch.equal(got.isinf(), want.isinf()), activation
        finite = want.isfinite()
        assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
        assert relative_error(got[finite], want[finite].double()) <= 1e-5
        assert got[0].isfinite().all() and got[2].isfinite().all(), "NaN leaked into clean rows"


BAD_INPUTS = [
    # (what to change, exception, words the message must contain)
    (dict(x=lambda p: p.x[..., :-1]), ValueError, ["x.shape[-1]", "39"]),
    (dict(down_weight=lambda p: p.down_weight[:, :-1]), ValueError, ["x.shape[-1]"]),
    (dict(down_weight=lambda p: p.down_weight[0]), ValueError, ["down_weight", "2-D"]),
    (dict(up_weight=lambda p: p.up_weight[:, :-1]), ValueError, ["up_weight", "(40, 8)", "(40, 7)"]),
    (dict(up_weight=lambda p: p.up_weight.T), ValueError, ["up_weight", "(d, r)"]),
    (dict(down_bias=lambda p: p.down_bias[:-1]), ValueError, ["down_bias", "(8,)", "(7,)"]),
    (dict(up_bias=lambda p: p.up_bias[:-2]), ValueError, ["up_bias", "(40,)", "(38,)"]),
    (dict(up_bias=lambda p: p.up_bias.to("meta")), ValueError, ["up_bias", "meta"]),
    (dict(up_weight=lambda p: p.up_weight.double()), TypeError, ["up_weight", "float64", "float32"]),
    (dict(x=lambda p: p.x.half()), TypeError, ["down_weight", "float16"]),
    (dict(x=lambda p: p.x.to(torch.int32)), TypeError, ["x", "floating-point", "int32"]),
    (dict(down_bias=lambda p: [0.0] * 8), TypeError, ["down_bias", "Tensor", "list"]),
    (dict(activation=lambda p: "softplus"), ValueError, ["activation", "softplus", "relu"]),
    (dict(activation=lambda p: None), TypeError, ["activation"]),
    (dict(scale=lambda p: float("nan")), ValueError, ["scale", "finite"]),
    (dict(scale=lambda p: float("inf")), ValueError, ["scale", "finite"]),
    (dict(scale=lambda p: torch.tensor(1.0)), TypeError, ["scale", "real number"]),
]


@pytest.mark.parametrize("fn", [fused_adapter, reference_adapter], ids=["fused", "reference"])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_is_refused_before_launch(fn, case: int, launches) -> None:  # type: ignore[no-untyped-def]
    change, error, words = BAD_INPUTS[case]
    p = make_problem((3,), 40, 8, torch.float32, DEVICE)
    args = dict(x=p.x, down_weight=p.down_weight, down_bias=p.down_bias, up_weight=p.up_weight,
                up_bias=p.up_bias, activation="relu", scale=1.0)
    for key, make in change.items():
        args[key] = make(p)
    with pytest.raises(error) as info:
        fn(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert len(launches) == 0


def test_autocast_behaves_like_linear() -> None:
    device_type = DEVICE.type
    p = make_problem((2, 11), 64, 16, torch.float32, DEVICE, seed=7)
    fused_leaves = [t.detach().clone().requires_grad_() for t in p.inputs]  # type: ignore[union-attr]
    eager_leaves = [t.detach().clone().requires_grad_() for t in p.inputs]  # type: ignore[union-attr]
    with torch.autocast(device_type, dtype=torch.bfloat16):
        got = fused_adapter(*fused_leaves, "gelu", 0.5)
        want = reference_adapter(*eager_leaves, "gelu", 0.5)
    assert got.dtype == want.dtype == torch.float32
    y_true, grads_true = float64_truth(p, "gelu", 0.5)
    # bf16 projections: both land within the bf16 tolerance of the fp32 truth, and close to each other.
    assert relative_error(got, y_true) <= 3e-2
    assert relative_error(got, want.double()) <= 3e-2
    got.backward(p.grad)
    want.backward(p.grad)
    for name, a, b, t in zip(NAMES, fused_leaves, eager_leaves, grads_true):
        assert a.grad is not None and a.grad.dtype == torch.float32, name
        assert relative_error(a.grad, t) <= 3e-2, name  # type: ignore[arg-type]
        assert relative_error(b.grad, t) <= 3e-2, name  # type: ignore[arg-type]


def test_float64_runs_the_reference_and_passes_gradcheck() -> None:
    p = make_problem((3,), 6, 4, torch.float64, DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in p.inputs]  # type: ignore[union-attr]
    assert torch.autograd.gradcheck(lambda *a: fused_adapter(*a, "gelu", 0.5), tuple(leaves))


def test_without_kernels_the_reference_runs(monkeypatch: pytest.MonkeyPatch, launches) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ops_module, "load_kernels", lambda: None)
    p = make_problem((5,), 32, 8, torch.float32, DEVICE)
    assert torch.equal(fused_adapter(*p.inputs, "silu", 2.0), reference_adapter(*p.inputs, "silu", 2.0))
    assert len(launches) == 0


def test_scale_zero_and_negative() -> None:
    p = make_problem((7,), 32, 8, torch.float32, DEVICE)
    assert torch.equal(fused_adapter(*p.inputs, "relu", 0.0), p.x)
    check_parity(p, "relu", -2.5, torch.float32)


def test_tolerance_check_catches_a_wrong_activation() -> None:
    """The parity check can fail: gelu output against relu truth is far outside tolerance."""
    p = make_problem((16,), 48, 16, torch.float32, DEVICE)
    y = fused_adapter(*p.inputs, "gelu")
    y_relu, _ = float64_truth(p, "relu", 1.0)
    assert relative_error(y, y_relu) > 100 * 1e-5


def test_activation_table_is_complete() -> None:
    assert set(CANONICAL) <= set(ACTIVATIONS)
    assert math.isclose(ACTIVATIONS["leaky_relu"](torch.tensor([-1.0])).item(), -0.01, rel_tol=1e-6)


# ---- GPU-only: big shapes, past 2**31 elements, TF32 -------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_shape(dtype: torch.dtype) -> None:
    p = make_problem((16384,), 4096, 64, dtype, DEVICE, seed=8)
    check_parity(p, "gelu", 1.0, dtype)


@pytest.mark.gpu
def test_gpu_past_2_31_elements() -> None:
    d, r = 1024, 64
    rows = 2**31 // d + 300
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    p = make_problem((1,), d, r, torch.bfloat16, DEVICE, seed=9)
    x.requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in p.params]  # type: ignore[union-attr]
    y = fused_adapter(x, *params, "relu", 1.0)
    tail = slice(rows - 512, rows)
    sub = Problem(x[tail].detach(), *p.params, grad=torch.ones_like(x[tail]))  # type: ignore[arg-type]
    y_true, _ = float64_truth(sub, "relu", 1.0)
    assert_matches(y[tail].detach(), y_true.to(y.device), torch.bfloat16, "y tail rows")
    grad = torch.zeros_like(y)
    grad[tail] = 1
    y.backward(grad)
    _, grads_true = float64_truth(sub, "relu", 1.0)
    assert x.grad is not None
    assert_matches(x.grad[tail], grads_true[0].to("cuda"), torch.bfloat16, "dx tail rows")  # type: ignore[arg-type]
    assert_matches(params[2].grad, grads_true[3].to("cuda"), torch.bfloat16, "dW_up")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_gpu_fp32_is_ieee_unless_tf32_allowed() -> None:
    p = make_problem((4096,), 1024, 64, torch.float32, DEVICE, seed=10)
    y_true, _ = float64_truth(p, "relu", 1.0)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = fused_adapter(*p.inputs)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = fused_adapter(*p.inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert relative_error(ieee, y_true) <= 1e-5
    assert relative_error(tf32, y_true) <= 5e-3
    assert not torch.equal(ieee, tf32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [24, 264], ids=["one-pass", "wide"])
def test_separate_residual(r: int, dtype: torch.dtype, launches) -> None:  # type: ignore[no-untyped-def]
    """y = residual + scale * f(x) in the same launches; the residual's gradient is the upstream one."""
    p = make_problem((3, 7), 40, r, dtype, DEVICE, seed=13)
    residual = torch.randn(p.x.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (*p.inputs, residual)]  # type: ignore[union-attr]
    launches.clear()
    y = fused_adapter(*leaves[:5], "gelu", 0.7, residual=leaves[5])
    assert len(launches) == (1 if r == 24 else 2)
    y.backward(p.grad)
    truth = [t.detach().double().requires_grad_() for t in (*p.inputs, residual)]  # type: ignore[union-attr]
    y64 = reference_adapter(*truth[:5], "gelu", 0.7, residual=truth[5])
    y64.backward(p.grad.double())
    assert_matches(y.detach(), y64.detach(), dtype, "y")
    for name, a, b in zip([*NAMES, "residual"], leaves, truth):
        assert_matches(a.grad, b.grad, dtype, f"d{name}")  # type: ignore[arg-type]


def test_residual_alone_needs_no_backward_launch(launches) -> None:  # type: ignore[no-untyped-def]
    p = make_problem((5,), 32, 8, torch.float32, DEVICE)
    residual = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    y = fused_adapter(*p.inputs, "relu", 1.0, residual=residual)
    launches.clear()
    y.backward(p.grad)
    assert len(launches) == 0 and torch.equal(residual.grad, p.grad)  # type: ignore[arg-type]


def test_bad_residual() -> None:
    p = make_problem((5,), 32, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(5, 32\)"):
        fused_adapter(*p.inputs, residual=p.x[:4])
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        fused_adapter(*p.inputs, residual=p.x.half())


@pytest.mark.parametrize("path", ["one-kernel", "two-kernel", "grouped"])
def test_strided_biases_are_read_through_their_strides(path: str) -> None:
    """Biases that are strided views (every second element) give the numbers of the same biases made
    contiguous, forward and backward, on every kernel path; their gradients keep the views' shapes."""
    from adapter_fused import fused_adapter_grouped
    from adapter_fused.reference import reference_adapter_grouped

    gen = torch.Generator().manual_seed(41)
    r = 300 if path == "two-kernel" else 16
    lead = (2,) if path == "grouped" else ()
    x = torch.randn(8, 32, generator=gen).to(DEVICE)
    down_w = (torch.randn(*lead, r, 32, generator=gen) * 0.2).to(DEVICE)
    up_w = (torch.randn(*lead, 32, r, generator=gen) * 0.2).to(DEVICE)
    down_b = torch.randn(*lead, 2 * r, generator=gen).to(DEVICE)[..., ::2]
    up_b = torch.randn(*lead, 64, generator=gen).to(DEVICE)[..., ::2]
    grad = torch.randn(8, 32, generator=gen).to(DEVICE)
    index = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], device=DEVICE)

    def run(fn, *tensors):  # type: ignore[no-untyped-def]
        leaves = [t.detach().requires_grad_() for t in tensors]  # strides kept
        if path == "grouped":
            y = fn(leaves[0], index, *leaves[1:], "relu", 1.0)
        else:
            y = fn(*leaves, "relu", 1.0)
        y.backward(grad)
        return y.detach(), [t.grad for t in leaves]

    fused_fn, reference_fn = ((fused_adapter_grouped, reference_adapter_grouped) if path == "grouped"
                              else (fused_adapter, reference_adapter))
    y, grads = run(fused_fn, x, down_w, down_b, up_w, up_b)
    want_y, want_grads = run(reference_fn, *(t.contiguous().double() for t in (x, down_w, down_b, up_w, up_b)))
    assert_matches(y, want_y, torch.float32, "y")
    for name, g, w, arg in zip(NAMES, grads, want_grads, (x, down_w, down_b, up_w, up_b)):
        assert g is not None and g.shape == arg.shape, name
        assert_matches(g, w, torch.float32, f"d{name}")  # type: ignore[arg-type]


# ---- the host path: what a call costs besides the math -----------------------------------------------

class _Counts:
    """Counts the argument checks (ops and reference), the kernels-availability questions and the
    autocast contexts entered during a block."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kernels: bool | None = None) -> None:
        from adapter_fused import reference

        self.checks = 0
        self.available = 0
        self.autocasts = 0
        counts = self

        def counted(real):  # type: ignore[no-untyped-def]
            def check(*args, **kwargs):  # type: ignore[no-untyped-def]
                counts.checks += 1
                return real(*args, **kwargs)
            return check

        monkeypatch.setattr(ops_module, "check_adapter_args", counted(ops_module.check_adapter_args))
        monkeypatch.setattr(reference, "check_adapter_args", counted(reference.check_adapter_args))
        real_available = ops_module.kernels_available

        def available(device: torch.device) -> bool:
            counts.available += 1
            return real_available(device) if kernels is None else kernels

        monkeypatch.setattr(ops_module, "kernels_available", available)

        class Autocast(torch.autocast):
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                counts.autocasts += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(torch, "autocast", Autocast)

    def take(self) -> tuple[int, int, int]:
        """(checks, availability questions, autocast contexts) since the last take."""
        taken = (self.checks, self.available, self.autocasts)
        self.checks = self.available = self.autocasts = 0
        return taken


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_one_check_per_call(monkeypatch: pytest.MonkeyPatch, kernels: bool, with_residual: bool) -> None:
    """A fused_adapter call checks its arguments once, asks once whether the kernels run it and enters no
    autocast context while autocast is off, on the kernel path and on the reference path alike."""
    p = make_problem((2, 3), 32, 8, torch.float32, DEVICE, seed=5)
    residual = torch.randn(p.x.shape, device=DEVICE) if with_residual else None
    counts = _Counts(monkeypatch, kernels=None if kernels else False)
    params = (p.down_weight, p.down_bias, p.up_weight, p.up_bias)
    truth = [t.double() if t is not None else None for t in (p.x, *params, residual)]
    want = reference_adapter(truth[0], truth[1], truth[2], truth[3], truth[4], "silu", 0.5,  # type: ignore[arg-type]
                             residual=truth[5])
    counts.take()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = fused_adapter(p.x, *params, "silu", 0.5, residual=residual)
        assert counts.take() == (1, 1, 0), f"grad {grad}"
        assert_matches(got, want, torch.float32, "y")


def test_the_reference_path_under_autocast_follows_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernels do not run, a call under autocast runs the reference under autocast: the same
    numbers and dtype as reference_adapter there (F.linear casting the parameters), residual included."""
    from adapter_fused import fused_adapter_grouped
    from adapter_fused.reference import reference_adapter_grouped

    monkeypatch.setattr(ops_module, "kernels_available", lambda device: False)
    p = make_problem((2, 5), 32, 8, torch.float32, DEVICE, seed=6)
    assert p.down_bias is not None and p.up_bias is not None
    params = (p.down_weight, p.down_bias, p.up_weight, p.up_bias)
    residual = torch.randn(p.x.shape, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        for res in (None, residual):
            got = fused_adapter(p.x, *params, "gelu", 0.5, residual=res)
            want = reference_adapter(p.x, *params, "gelu", 0.5, residual=res)
            assert got.dtype == torch.float32 and torch.equal(got, want)
        bank = tuple(torch.stack([t, 2 * t]) for t in params)
        index = torch.tensor([0, 1], device=DEVICE)
        got = fused_adapter_grouped(p.x, index, bank[0], bank[1], bank[2], bank[3], "gelu", 0.5, residual=residual)
        want = reference_adapter_grouped(p.x, index, bank[0], bank[1], bank[2], bank[3], "gelu", 0.5,
                                         residual=residual)
        assert got.dtype == torch.float32 and torch.equal(got, want)
