"""Activation checkpointing recomputes the fused forward and gives the gradients of a plain run:
torch.utils.checkpoint (both implementations) and transformers' gradient_checkpointing_enable()
on a tiny BertModel with a FusedAdapter inserted after each layer's output projection."""

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapter_fused import FusedAdapter
from tests.conftest import DEVICE
from tests.tolerances import relative_error

# Recomputation runs the same kernels on the same inputs; allow a last-bit difference on the GPU.
TOL = 1e-6


class Block(nn.Module):
    """Linear -> adapter -> adapter, optionally checkpointed as one segment: (..., d) -> (..., d)."""

    def __init__(self, d: int, r: int, use_reentrant: bool | None) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.first = FusedAdapter(d, r, "gelu", 0.5)
        self.second = FusedAdapter(d, r, "silu", 2.0)
        self.use_reentrant = use_reentrant
        with torch.no_grad():
            gen = torch.Generator().manual_seed(21)
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(torch.tanh(self.proj(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reentrant is None:
            return self.segment(x)
        return checkpoint(self.segment, x, use_reentrant=self.use_reentrant)


def gradients(model: nn.Module, loss: Callable[[], torch.Tensor], extra: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for t in extra:
        t.grad = None
    loss().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}  # type: ignore[union-attr]
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(extra)})  # type: ignore[union-attr]
    return grads


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = relative_error(got[name], want[name])
        assert err <= TOL, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_gives_the_same_gradients(use_reentrant: bool, launches) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(3, 10, 48, generator=gen).to(DEVICE).requires_grad_()
    target = torch.randn(3, 10, 48, generator=gen).to(DEVICE)
    plain = Block(48, 16, use_reentrant=None).to(DEVICE)
    checkpointed = Block(48, 16, use_reentrant=use_reentrant).to(DEVICE)
    checkpointed.load_state_dict(plain.state_dict())

    def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: (model(x) - target).square().mean()

    want = gradients(plain, loss_of(plain), [x])
    launches.clear()
    got = gradients(checkpointed, loss_of(checkpointed), [x])
    # Forward twice (once under no_grad, once recomputed in backward), then the two backwards:
    # 2 adapters x (1 + 1) forward launches + 2 adapters x 1 input-gradient launch.
    assert launches.names.count("fused_rows_kernel") == 6, launches.names
    assert_same_gradients(got, want)
    assert len(want) == 1 + 2 + 2 * 4  # x, the projection and both adapters


class AdapterAfter(nn.Module):
    """Wraps a projection: (..., in) -> adapter(projection(...)) (..., out)."""

    def __init__(self, projection: nn.Linear, adapter: FusedAdapter) -> None:
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(hidden))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_transformers_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"

    def build() -> nn.Module:
        torch.manual_seed(23)
        model = transformers.BertModel(config, add_pooling_layer=False)
        for layer in model.encoder.layer:
            adapter = FusedAdapter(32, 8, "gelu", 1.0)
            with torch.no_grad():  # visible adapter output, so its gradients matter
                adapter.up.weight.normal_(std=0.2)
            layer.output.dense = AdapterAfter(layer.output.dense, adapter)
        return model.to(DEVICE).train()

    plain, checkpointed = build(), build()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing

    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        for layer in model.encoder.layer:
            layer.output.dense.adapter.register_forward_hook(
                lambda *_, key=name: calls.__setitem__(key, calls[key] + 1))

    gen = torch.Generator().manual_seed(24)
    ids = torch.randint(0, 64, (2, 12), generator=gen).to(DEVICE)
    weights = torch.randn(2, 12, 32, generator=gen).to(DEVICE)

    def loss_of(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: (model(input_ids=ids).last_hidden_state * weights).sum()

    want = gradients(plain, loss_of(plain), [])
    got = gradients(checkpointed, loss_of(checkpointed), [])
    assert calls == {"plain": 2, "checkpointed": 4}, "checkpointing did not recompute the adapters"
    assert any("adapter.down.weight" in name for name in want)
    assert_same_gradients(got, want)
    adapter_grad = want["encoder.layer.0.output.dense.adapter.down.weight"]
    assert adapter_grad.abs().max() > 0
