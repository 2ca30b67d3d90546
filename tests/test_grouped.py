"""fused_adapter_grouped: a different adapter per row, against a per-adapter loop in float64."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adapter_fused import fused_adapter_grouped
from adapter_fused.reference import reference_adapter_grouped
from tests.conftest import DEVICE
from tests.tolerances import assert_matches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["x", "down_weight", "down_bias", "up_weight", "up_bias"]


def make_bank(n: int, lead: tuple[int, ...], d: int, r: int, dtype: torch.dtype, bias: bool = True,
              seed: int = 0) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    return [rand(*lead, d), rand(n, r, d, std=d**-0.5), rand(n, r, std=0.1) if bias else None,
            rand(n, d, r, std=r**-0.5), rand(n, d, std=0.1) if bias else None]


def run(fn, inputs, index, grad, activation, scale):  # type: ignore[no-untyped-def]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(leaves[0], index, *leaves[1:], activation, scale)
    y.backward(grad)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def check(inputs, index, activation: str, scale: float, dtype: torch.dtype, seed: int = 0) -> list:  # type: ignore[no-untyped-def,type-arg]
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    y, grads = run(fused_adapter_grouped, inputs, index, grad, activation, scale)
    inputs64 = [None if t is None else t.double() for t in inputs]
    y64, grads64 = run(reference_adapter_grouped, inputs64, index, grad.double(), activation, scale)
    assert_matches(y, y64, dtype, "y")
    for name, g, t in zip(NAMES, grads, grads64):
        if t is not None:
            assert g is not None, name
            assert_matches(g, t, dtype, f"d{name}")
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per", ["token", "sequence"])
def test_matches_a_per_adapter_loop(per: str, dtype: torch.dtype) -> None:
    n = 5
    inputs = make_bank(n, (6, 7), 72, 24, dtype, seed=1)
    if per == "token":
        index = torch.tensor([0, 1, 3, -1, 1, 0, 3] * 6, device=DEVICE).view(6, 7)
    else:
        index = torch.tensor([3, -1, 0, 0, 1, 3], device=DEVICE)
    grads = check(inputs, index, "gelu", 0.8, dtype)
    unused = 2  # no row uses adapter 2 (nor 4): its gradients are exactly zero
    for g in grads[1:]:
        assert g is not None and torch.count_nonzero(g[unused]) == 0 and torch.count_nonzero(g[4]) == 0
    x_rows = inputs[0].reshape(-1, 72)  # type: ignore[union-attr]
    y = fused_adapter_grouped(inputs[0], index, *inputs[1:], "gelu", 0.8)  # type: ignore[arg-type]
    passthrough = (index.reshape(-1) if per == "token" else index.repeat_interleave(7)) == -1
    assert torch.equal(y.reshape(-1, 72)[passthrough], x_rows[passthrough])


@pytest.mark.parametrize("case", ["wide-r", "no-bias-int32-index", "one-adapter", "all-skipped", "zero-rows"])
def test_edge_cases(case: str) -> None:
    if case == "wide-r":
        inputs = make_bank(3, (10,), 32, 264, torch.float32, seed=2)
        index = torch.tensor([2, 0, -1, 2, 2, 1, 0, -1, 1, 2], device=DEVICE)
    elif case == "no-bias-int32-index":
        inputs = make_bank(4, (2, 9), 40, 8, torch.float32, bias=False, seed=3)
        index = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    elif case == "one-adapter":
        inputs = make_bank(1, (19,), 40, 16, torch.bfloat16, seed=4)
        index = torch.zeros(19, dtype=torch.long, device=DEVICE)
    elif case == "all-skipped":
        inputs = make_bank(2, (5,), 40, 16, torch.float32, seed=5)
        index = torch.full((5,), -1, device=DEVICE)
    else:
        inputs = make_bank(2, (0, 4), 40, 16, torch.float32, seed=6)
        index = torch.zeros(0, dtype=torch.long, device=DEVICE)
    dtype = inputs[1].dtype  # type: ignore[union-attr]
    check(inputs, index, "silu", 1.1, dtype)


def test_one_launch_forward_whatever_the_mix(launches) -> None:  # type: ignore[no-untyped-def]
    inputs = make_bank(8, (64,), 48, 16, torch.float32, seed=7)
    index = torch.arange(64, device=DEVICE) % 9 - 1  # all 8 adapters and -1, interleaved
    leaves = [t.detach().clone().requires_grad_() for t in inputs]  # type: ignore[union-attr]
    y = fused_adapter_grouped(leaves[0], index, *leaves[1:], "relu")
    assert launches.names == ["fused_rows_kernel"]
    launches.clear()
    y.sum().backward()
    assert launches.names == ["fused_rows_kernel", "weight_grad_kernel"]


BAD = [
    (lambda idx: idx + 10, ValueError, "[-1, 3)"),
    (lambda idx: idx - 2, ValueError, "min -3"),
    (lambda idx: idx.float(), TypeError, "integer"),
    (lambda idx: idx.bool(), TypeError, "integer"),
    (lambda idx: idx[:-1], ValueError, "x.shape[:-1]"),
    (lambda idx: idx.to("meta"), ValueError, "meta"),
    (lambda idx: idx.tolist(), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_index_is_refused_before_launch(case: int, launches) -> None:  # type: ignore[no-untyped-def]
    change, error, words = BAD[case]
    inputs = make_bank(3, (6,), 32, 8, torch.float32)
    index = torch.tensor([0, 1, 2, -1, 0, 1], device=DEVICE)
    with pytest.raises(error) as info:
        fused_adapter_grouped(inputs[0], change(index), *inputs[1:])  # type: ignore[arg-type]
    assert words in str(info.value), str(info.value)
    assert len(launches) == 0


def test_stacked_shapes_are_checked() -> None:
    inputs = make_bank(3, (6,), 32, 8, torch.float32)
    index = torch.zeros(6, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"down_weight must be 3-D \(n, r, d\)"):
        fused_adapter_grouped(inputs[0], index, inputs[1][0], *inputs[2:])  # type: ignore[index,arg-type]
    with pytest.raises(ValueError, match=r"up_bias must have shape \(n, d\) = \(3, 32\)"):
        fused_adapter_grouped(inputs[0], index, *inputs[1:4], inputs[4][:2])  # type: ignore[index,arg-type]


@pytest.mark.usefixtures("deterministic")
def test_deterministic_repeat() -> None:
    inputs = make_bank(4, (33,), 40, 16, torch.bfloat16, seed=8)
    index = torch.randint(-1, 4, (33,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grad = torch.randn(33, 40, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEVICE)
    first = run(fused_adapter_grouped, inputs, index, grad, "tanh", 1.0)
    again = run(fused_adapter_grouped, inputs, index, grad, "tanh", 1.0)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1]))  # type: ignore[arg-type]


@given(
    n=st.integers(1, 5), rows=st.integers(0, 30), d=st.integers(1, 48), r=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES), activation=st.sampled_from(["relu", "gelu_tanh", "sigmoid", "identity"]),
    seed=st.integers(0, 1000),
)
def test_random_banks(n: int, rows: int, d: int, r: int, dtype: torch.dtype, activation: str, seed: int) -> None:
    inputs = make_bank(n, (rows,), d, r, dtype, seed=seed)
    index = torch.randint(-1, n, (rows,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    check(inputs, index, activation, 0.9, dtype, seed=seed)


def test_separate_residual_and_skipped_rows() -> None:
    inputs = make_bank(3, (4, 5), 40, 16, torch.float32, seed=9)
    index = torch.tensor([2, -1, 0, 2], device=DEVICE)
    residual = torch.randn(4, 5, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad = torch.randn(4, 5, 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (*inputs, residual)]  # type: ignore[union-attr]
    y = fused_adapter_grouped(leaves[0], index, *leaves[1:5], "silu", 0.6, residual=leaves[5])
    y.backward(grad)
    truth = [t.detach().double().requires_grad_() for t in (*inputs, residual)]  # type: ignore[union-attr]
    y64 = reference_adapter_grouped(truth[0], index, *truth[1:5], "silu", 0.6, residual=truth[5])
    y64.backward(grad.double())
    assert torch.equal(y[1], residual[1])  # no adapter: the residual passes through
    assert_matches(y.detach(), y64.detach(), torch.float32, "y")
    for name, a, b in zip([*NAMES, "residual"], leaves, truth):
        assert_matches(a.grad, b.grad, torch.float32, f"d{name}")  # type: ignore[arg-type]
