"""copy.deepcopy of a model with fused adapters (added with add_adapter, or AdapterHub adapters
converted by accelerate) computes with the copy's own weights and follows the copy's own ``.to()``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from .models import hidden_states, make_inputs, make_model, randomize

from adapter_fused.hf import accelerate, add_adapter, delete_adapter, set_active_adapters  # noqa: E402
from adapter_fused.hf.model import STATE_NAME, adapter_modules  # noqa: E402
from adapter_fused.hf.sites import MODULE_NAME

CASES = [("bert", "houlsby"), ("bert", "pfeiffer"), ("llama", "houlsby"), ("llama", "pfeiffer")]


def scale_(parameters: object, factor: float) -> None:
    with torch.no_grad():
        for parameter in parameters:  # type: ignore[attr-defined]
            parameter.mul_(factor)


def assert_independent(model: nn.Module, adapter_parameters: object) -> None:
    """A deep copy of ``model`` follows its own weights (``adapter_parameters(copy)``) and dtype;
    the original is left as it was."""
    inputs = make_inputs()
    with torch.no_grad():
        before = hidden_states(model, inputs)
        twin = copy.deepcopy(model)
        assert torch.equal(hidden_states(twin, inputs), before)
        scale_(adapter_parameters(twin), 3.0)  # type: ignore[operator]
        changed = hidden_states(twin, inputs)
        assert (changed - before).abs().max().item() > 0.1  # the copy computes with its own weights
        assert torch.equal(hidden_states(model, inputs), before)  # and the original with its own
        low = copy.deepcopy(model).to(torch.bfloat16)
        out = hidden_states(low, inputs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - before).abs().max().item() <= 0.1 * before.abs().max().item()
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("arch", "placement"), CASES)
def test_deepcopy_of_added_adapters(arch: str, placement: str) -> None:
    model = make_model(arch)
    add_adapter(model, "task", placement)
    randomize(adapter_modules(model, "task").parameters())
    set_active_adapters(model, "task")
    assert_independent(model, lambda m: adapter_modules(m, "task").parameters())


def test_deepcopy_bookkeeping_points_at_the_copy() -> None:
    model = make_model("bert")
    add_adapter(model, "task", "pfeiffer")
    randomize(adapter_modules(model, "task").parameters())
    set_active_adapters(model, "task")
    twin = copy.deepcopy(model)
    state, twin_state = model.__dict__[STATE_NAME], twin.__dict__[STATE_NAME]
    assert twin_state is not state and twin_state.call is not state.call
    assert twin_state.modules is twin._modules[MODULE_NAME] and twin_state.layers is twin.encoder.layer
    assert twin_state.base is twin
    for hooks in (twin._forward_pre_hooks, twin.encoder.layer[0].output._forward_pre_hooks,
                  twin.encoder.layer[0].output.dropout._forward_hooks):
        owners = [hook.__self__ for hook in hooks.values()]  # the state itself, or one of its sites
        assert owners and all(getattr(owner, "state", owner) is twin_state for owner in owners)
    inputs = make_inputs()
    with torch.no_grad():
        expected = hidden_states(model, inputs)
        delete_adapter(twin, "task")  # removes the copy's hooks only
        assert torch.equal(hidden_states(model, inputs), expected)
        assert not torch.equal(hidden_states(twin, inputs), expected)
    assert not twin._forward_pre_hooks and model._forward_pre_hooks


def test_pickled_model_keeps_its_adapters() -> None:
    model = make_model("llama")
    add_adapter(model, "task", "pfeiffer")
    randomize(adapter_modules(model, "task").parameters())
    set_active_adapters(model, "task")
    inputs = make_inputs()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(hidden_states(loaded, inputs), hidden_states(model, inputs))
        scale_(adapter_modules(loaded, "task").parameters(), 3.0)
        assert not torch.equal(hidden_states(loaded, inputs), hidden_states(model, inputs))


@pytest.mark.adapterhub
@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_deepcopy_of_accelerated_adapterhub_model(arch: str, config: str) -> None:
    adapters = pytest.importorskip("adapters")
    model = make_model(arch)
    adapters.init(model)
    model.add_adapter("hub", config=config)
    randomize([p for n, p in model.named_parameters() if "adapters.hub." in n])
    model.set_active_adapters("hub")
    model.eval()
    assert accelerate(model).converted
    assert_independent(model, lambda m: [p for n, p in m.named_parameters() if "adapters.hub." in n])
    twin = copy.deepcopy(model)
    assert accelerate(twin).converted == ()  # the copy's adapters are converted already
    for name, module in twin.named_modules():
        if name.endswith("adapters.hub"):
            assert module.forward.__self__ is module
