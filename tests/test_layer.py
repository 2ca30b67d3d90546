"""FusedAdapter: the module contract users rely on."""

import pytest
import torch
from torch import nn

from adapter_fused import ACTIVATIONS, FusedAdapter, reference_adapter
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
