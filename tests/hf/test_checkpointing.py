"""Activation (gradient) checkpointing with adapters: transformers' ``gradient_checkpointing_enable``,
reentrant and not, in training mode (dropout on), gives the adapters the gradients of the run without
checkpointing, for one adapter, per-row adapters (``per_sample_adapters``) and compositions.

The loss is a fixed random projection of the last hidden states. Each layer's forward must run twice
with checkpointing (once more in the backward pass) and once without, so the comparison is between a
checkpointed run and a plain one."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused import Average, Parallel, Stack
from adapter_fused.hf import add_adapter, per_sample_adapters, train_adapter

from ..convergence.training import one_thread  # noqa: F401 (autouse fixture)
from ..tolerances import relative_error
from .models import make_inputs, make_model, randomize

transformers = pytest.importorskip("transformers")

SETUPS = ("one", "per_sample", "stack", "parallel", "average")


def build(arch: str, setup: str) -> nn.Module:
    """A tiny base model in training mode with houlsby adapters "a" (and "b"), random adapter weights,
    every adapter of the setup training."""
    model = make_model(arch)
    names = ["a"] if setup == "one" else ["a", "b"]
    for name in names:
        add_adapter(model, name, "houlsby")
    torch.manual_seed(5)
    randomize([p for n, p in model.named_parameters() if "fused_adapters." in n], std=0.1)
    setups: dict[str, Any] = {"one": "a", "per_sample": Stack("a", "b"), "stack": Stack("a", "b"),
                              "parallel": Parallel("a", "b"), "average": Average("a", "b")}
    train_adapter(model, setups[setup])
    assert model.training
    return model


@contextlib.contextmanager
def count_calls(module: nn.Module) -> Iterator[list[int]]:
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def step(model: Any, setup: str) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], int]:
    """One forward and backward pass (dropout masks fixed by a seed); returns the loss, the adapter
    gradients by name and how often a module of the first layer ran."""
    inputs: dict[str, Any] = dict(make_inputs(batch=2, length=5))
    if model.config.model_type == "gpt2":
        inputs["use_cache"] = False  # what checkpointing forces anyway: both runs alike
    model.zero_grad(set_to_none=True)
    per_sample = per_sample_adapters(model, ["a", "b"]) if setup == "per_sample" else contextlib.nullcontext()
    # The first module of the first layer: transformers 5 checkpoints a layer's forward (the layer's own
    # hooks run once), transformers 4 its __call__; either way the recomputation starts with this module
    # (and may stop early, once it has what the backward pass needs).
    inner = model.h[0].ln_1 if hasattr(model, "h") else model.encoder.layer[0].attention
    torch.manual_seed(11)
    with count_calls(inner) as calls, per_sample:
        out = model(**inputs).last_hidden_state
        projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        loss = (out * projection).sum()
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls[0]


def enable_checkpointing(model: Any, reentrant: bool) -> None:
    with warnings.catch_warnings():  # transformers 5 deprecates the name in favour of activation_checkpointing_enable
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_checkpointed_gradients_equal_plain_ones(arch: str, reentrant: bool, setup: str,
                                                 launches) -> None:  # type: ignore[no-untyped-def]
    plain = build(arch, setup)
    loss, grads, calls = step(plain, setup)
    assert calls == 1
    assert len(launches) > 0
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().max() == 0]
    names = {"a", "b"} if setup != "one" else {"a"}
    assert {n.split("fused_adapters.")[1].split(".")[0] for n in grads} == names

    checkpointed = build(arch, setup)
    enable_checkpointing(checkpointed, reentrant)
    launches.clear()
    ck_loss, ck_grads, ck_calls = step(checkpointed, setup)
    assert ck_calls == 2, "the layers were not checkpointed"
    assert len(launches) > 0
    assert relative_error(ck_loss, loss) <= 1e-6
    missing = [n for n, g in ck_grads.items() if g is None]
    assert not missing, f"no gradient with checkpointing: {missing}"
    for name, grad in grads.items():
        ck_grad = ck_grads[name]
        assert grad is not None and ck_grad is not None
        err = relative_error(ck_grad, grad)
        assert err <= 1e-6, f"{name}: gradient with checkpointing differs by {err:.2e}"


def test_default_checkpointing_trains_the_adapters_with_a_task_head() -> None:
    """The setup of ``Trainer(gradient_checkpointing=True)``: a task model whose head trains with the
    adapter, checkpointing enabled with transformers' defaults."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=97, max_position_embeddings=64)
    model: Any = transformers.BertForSequenceClassification(config)
    add_adapter(model, "a", "houlsby")
    train_adapter(model, "a")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
        warnings.filterwarnings("error", "None of the inputs have requires_grad", UserWarning)  # torch's reentrant
        # checkpoint warns so when no input of a checkpointed layer requires grad
        model.gradient_checkpointing_enable()
        inputs = make_inputs(batch=2, length=5)
        model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    assert model.classifier.weight.grad is not None
    missing = [n for n, p in model.named_parameters() if "fused_adapters." in n and p.grad is None]
    assert not missing, f"{len(missing)} adapter parameters got no gradient: {missing[:2]}..."
