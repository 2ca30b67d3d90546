"""reference_adapter: the ground truth itself, checked against the formula and by gradcheck."""

import torch
import torch.nn.functional as F

from adapter_fused import reference_adapter
from tests.cases import make_problem


def test_matches_the_formula_in_float64() -> None:
    p = make_problem((4, 3), 12, 5, torch.float64, torch.device("cpu"))
    hidden = torch.tanh(p.x @ p.down_weight.T + p.down_bias)
    want = p.x + 0.25 * (hidden @ p.up_weight.T + p.up_bias)
    got = reference_adapter(*p.inputs, activation="tanh", scale=0.25)
    assert (got - want).abs().max().item() < 1e-14


def test_gradcheck_float64() -> None:
    p = make_problem((3, 2), 7, 4, torch.float64, torch.device("cpu"))
    leaves = tuple(t.detach().clone().requires_grad_() for t in p.inputs)  # type: ignore[union-attr]
    for activation in ("gelu", "gelu_tanh", "silu", "sigmoid", "leaky_relu", "identity"):
        assert torch.autograd.gradcheck(lambda *a, act=activation: reference_adapter(*a, act, 1.5), leaves)
        assert torch.autograd.gradgradcheck(lambda *a, act=activation: reference_adapter(*a, act, 1.5), leaves)


def test_without_biases_equals_an_eager_sequential() -> None:
    p = make_problem((6,), 10, 3, torch.float64, torch.device("cpu"), bias=False)
    want = p.x + F.linear(F.silu(F.linear(p.x, p.down_weight)), p.up_weight)
    assert torch.equal(reference_adapter(p.x, p.down_weight, None, p.up_weight, None, "swish"), want)
