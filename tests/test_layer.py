"""FusedAdapter: the module contract users rely on."""

import pytest
import torch
from torch import nn

from adapter_fused import ACTIVATIONS, FusedAdapter, fused_adapter, reference_adapter
from tests.conftest import DEVICE
from tests.tolerances import assert_matches


def test_state_dict_keys_and_parameter_count() -> None:
    layer = FusedAdapter(200, 24)
    assert list(layer.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]
    assert isinstance(layer.down, nn.Linear) and isinstance(layer.up, nn.Linear)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 200 * 24 + 24 + 200
    assert layer.d_model == 200 and layer.bottleneck == 24


def test_mam_init_is_exactly_the_identity() -> None:
    layer = FusedAdapter(48, 16, activation="gelu", init="mam").to(DEVICE)
    x = torch.randn(3, 5, 48, device=DEVICE)
    assert torch.equal(layer(x), x)
    assert layer.down.weight.abs().sum() > 0


def test_bert_and_houlsby_inits() -> None:
    torch.manual_seed(0)
    bert = FusedAdapter(512, 64, init="bert")
    assert abs(bert.down.weight.std().item() - 0.02) < 1e-3
    assert abs(bert.up.weight.std().item() - 0.02) < 1e-3
    houlsby = FusedAdapter(512, 64, init="houlsby")
    assert houlsby.down.weight.abs().max().item() <= 2e-2
    assert 0.005 < houlsby.up.weight.std().item() < 0.01  # a normal(0, 1e-2) cut at 2 sigma has std 8.8e-3
    for layer in (bert, houlsby):
        assert torch.count_nonzero(layer.down.bias) == 0 and torch.count_nonzero(layer.up.bias) == 0


@pytest.mark.parametrize("activation", ["relu", "swish", "gelu_new"])
def test_loads_an_eager_sequential_adapter(activation: str) -> None:
    torch.manual_seed(1)
    d, r = 64, 16
    eager = nn.Sequential(nn.Linear(d, r), _Act(activation), nn.Linear(r, d)).to(DEVICE)
    layer = FusedAdapter(d, r, activation=activation).to(DEVICE)
    state = {k.replace("0.", "down.").replace("2.", "up."): v for k, v in eager.state_dict().items()}
    layer.load_state_dict(state)
    x = torch.randn(4, 9, d, device=DEVICE, dtype=torch.float64).float()
    with torch.no_grad():
        truth = x.double() + eager.double()(x.double())
        assert_matches(layer(x), truth, torch.float32, "FusedAdapter vs eager adapter")


class _Act(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = ACTIVATIONS[name]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def test_forward_matches_reference_and_trains() -> None:
    layer = FusedAdapter(40, 8, activation="tanh", scale=0.5).to(DEVICE)
    x = torch.randn(7, 40, device=DEVICE)
    want = reference_adapter(x, layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias, "tanh", 0.5)
    assert_matches(layer(x), want.double(), torch.float32, "layer")
    layer(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_dtype_and_device_arguments() -> None:
    layer = FusedAdapter(32, 8, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert "activation='relu'" in repr(layer)


@pytest.mark.parametrize("kwargs, error", [
    (dict(d_model=0, bottleneck=8), ValueError),
    (dict(d_model=32, bottleneck=8.0), ValueError),
    (dict(d_model=32, bottleneck=8, activation="mish"), ValueError),
    (dict(d_model=32, bottleneck=8, init="xavier"), ValueError),
    (dict(d_model=32, bottleneck=8, scale=float("nan")), ValueError),
])
def test_bad_arguments(kwargs: dict, error: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(error):
        FusedAdapter(**kwargs)


def test_module_calls_skip_validation_and_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module call with its own, unchanged parameters validates nothing per call and does not go
    through the registered operator; outputs and gradients are those of the validated op path."""
    from adapter_fused import library, ops
    from tests.cases import make_problem

    layer = FusedAdapter(48, 16, activation="gelu", scale=0.7).to(DEVICE)
    with torch.no_grad():
        layer.up.weight.normal_(std=0.2)
    p = make_problem((3, 5), 48, 16, torch.float32, DEVICE, seed=31)
    params = [layer.down.weight, layer.down.bias, layer.up.weight, layer.up.bias]
    want = fused_adapter(p.x, *params, "gelu", 0.7)
    checks, dispatched = [], []
    real_check, real_op = ops.check_adapter_args, library.adapter_forward
    monkeypatch.setattr(ops, "check_adapter_args", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    monkeypatch.setattr(ops, "adapter_forward", lambda *a: dispatched.append(1) or real_op(*a))
    kernels = ops.kernels_available(DEVICE)
    with torch.no_grad():
        got = layer(p.x)
    assert torch.equal(got, want) and got.shape == p.x.shape
    assert dispatched == [] and checks == ([] if kernels else [1])

    x = p.x.clone().requires_grad_()
    layer(x).backward(p.grad)
    fast = [x.grad, *(t.grad for t in params)]
    if not kernels:
        return
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, *params)]
    y, _ = real_op(leaves[0].reshape(-1, 48), *leaves[1:], "gelu", 0.7, True, False, None, 1, None)
    y.backward(p.grad.reshape(-1, 48))
    for a, b in zip(fast, (t.grad for t in leaves)):
        assert a is not None and b is not None and torch.equal(a, b)


def test_module_attributes_are_checked_when_set() -> None:
    layer = FusedAdapter(16, 4)
    layer.activation = "swish"
    assert layer.activation == "silu"
    with pytest.raises(ValueError, match="unknown activation"):
        layer.activation = "softplus"
    with pytest.raises(ValueError, match="finite"):
        layer.scale = float("nan")
    layer.scale = 2
    assert layer.scale == 2.0 and isinstance(layer.scale, float)


def test_a_replaced_parameter_is_validated_again() -> None:
    layer = FusedAdapter(16, 4).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    layer.up.weight = torch.nn.Parameter(torch.randn(16, 5, device=DEVICE))
    with pytest.raises(ValueError, match="up_weight must have shape"):
        layer(x)
    layer.up.weight = torch.nn.Parameter(torch.randn(16, 4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="up_weight has dtype torch.float16"):
        layer(x)
