"""The hook ``train_adapter`` puts on the input embeddings so that reentrant activation checkpointing
(transformers 4.57's default) trains the adapters: the embeddings' output requires grad only while
checkpointing is on in training mode with the adapters' training setup in place; the hook goes with
the last adapter, and copies of the model carry their own. tests/hf/test_checkpointing.py compares the
checkpointed gradients with plain ones."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused.hf import add_adapter, delete_adapter, train_adapter
from adapter_fused.hf.model import InputsRequireGrad

from .models import make_inputs, make_model

transformers = pytest.importorskip("transformers")


NO_INPUT_GRAD = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
"""torch's reentrant checkpoint warns when no input of a layer requires grad, as meant in some checks here."""


def enable_checkpointing(model: Any, reentrant: bool = True) -> None:
    """Checkpointing as transformers enables it, less the input-grad hook transformers 5 adds with it
    (``enable_input_require_grads``), so that what is seen here is the library's hook alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        model.disable_input_require_grads()
    except AttributeError:  # transformers 4.57: none was added
        pass
    assert len(model.get_input_embeddings()._forward_hooks) == len(our_hooks(model))


def disable_checkpointing(model: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing_disable` is deprecated", FutureWarning)
        model.gradient_checkpointing_disable()


def our_hooks(model: nn.Module) -> list[InputsRequireGrad]:
    embeddings = model.get_input_embeddings()
    return [h for h in embeddings._forward_hooks.values() if isinstance(h, InputsRequireGrad)]


@contextmanager
def embedding_output(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Records the input embeddings' output as the rest of the model sees it (after every hook)."""
    seen: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    layer = model.encoder.layer[0] if hasattr(model, "encoder") else model.h[0]
    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def input_requires_grad(model: nn.Module) -> bool:
    with embedding_output(model) as seen:
        model(**make_inputs(batch=2, length=5))
    return bool(seen["x"].requires_grad)


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    out = model(**make_inputs(batch=2, length=5)).last_hidden_state
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * projection).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if "fused_adapters." in n and p.requires_grad}


@NO_INPUT_GRAD
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_inputs_require_grad_only_while_checkpointing_trains(arch: str) -> None:
    model = make_model(arch)
    add_adapter(model, "a", "houlsby")
    assert our_hooks(model) == []
    enable_checkpointing(model)  # before train_adapter
    train_adapter(model, "a")
    assert len(our_hooks(model)) == 1
    assert input_requires_grad(model)
    with torch.no_grad():
        assert not input_requires_grad(model)
    model.eval()  # transformers does not checkpoint in eval mode
    assert not input_requires_grad(model)
    model.train()
    disable_checkpointing(model)  # without checkpointing no backward pass runs below the first adapter
    assert not input_requires_grad(model)
    enable_checkpointing(model)
    train_adapter(model, "a")  # a second train_adapter adds no second hook
    assert len(our_hooks(model)) == 1 and input_requires_grad(model)


@NO_INPUT_GRAD
def test_the_hook_is_inert_without_a_training_setup_and_goes_with_the_last_adapter() -> None:
    model = make_model("bert")
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", "houlsby")
    train_adapter(model, "a")
    enable_checkpointing(model)
    assert input_requires_grad(model)
    delete_adapter(model, "a")  # the trained adapter: no training setup is left
    assert len(our_hooks(model)) == 1 and not input_requires_grad(model)
    train_adapter(model, "b")
    assert input_requires_grad(model)
    delete_adapter(model, "b")
    assert our_hooks(model) == [] and not input_requires_grad(model)


def test_a_copy_carries_its_own_hook() -> None:
    model = make_model("gpt2")
    add_adapter(model, "a", "pfeiffer")
    train_adapter(model, "a")
    enable_checkpointing(model)
    twin = copy.deepcopy(model)
    (hook,) = our_hooks(twin)
    assert hook.state is not our_hooks(model)[0].state
    grads = adapter_grads(twin)
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())
    delete_adapter(model, "a")  # the original's adapters and hook go; the copy's stay
    assert our_hooks(model) == [] and len(our_hooks(twin)) == 1
    assert all(g is not None for g in adapter_grads(twin).values())
