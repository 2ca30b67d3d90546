"""Training runs with the fused kernels match the library's plain-PyTorch reference path, step by step.

Each test builds the same tiny model with the same adapter weights twice and trains it for 32 AdamW
steps on the fixed task of ``training``: once on the Triton kernels (the interpreter on CPU), once on
the reference path. Every step's loss and the trained model's log-probabilities must agree within
1e-5 (relative) in float32, the trained parameters within 1e-4, and the loss must go down.

Why 1e-4 for the parameters: 32 AdamW steps amplify rounding. Adam divides each gradient element by
its running RMS, so an element whose gradient is near zero moves by up to lr from rounding-level
differences, and later steps start from there. The reference path's own float32 run ends up to
7e-6 (relative, worst tensor) from the float64 run of the same training here, and up to 1.9e-5 on
AdapterHub's weights (see test_adapterhub_training); two float32 runs that round differently can
part by as much. Measured fused against reference, worst tensor over the 3 x 3 matrix: 4.2e-6
(losses 2.9e-7, log-probabilities 3.7e-7); with AdamW's eps at 1e-6 instead of 1e-8, one case
(Llama, houlsby, AdapterHub's initial weights) reached 2.8e-5, with both runs 5e-5 from float64.

One case per architecture and placement runs by default (each architecture and each placement
once); the rest of the 3 x 3 matrix is marked ``slow``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapter_fused import AdapterConfig, AutoAdapterModel

from .training import (
    LABELS,
    LAYERS,
    PLACEMENTS,
    REDUCTION_FACTOR,
    SITES_PER_LAYER,
    STEPS,
    adapted_model,
    assert_learns,
    assert_same_run,
    bert_config,
    kernel_calls,
    make_batch,
    reference_path,
    task_kind,
    train,
)

FP32_RTOL = 1e-5
PARAMS_RTOL = 1e-4
DEFAULT_CASES = {("bert", "pfeiffer"), ("gpt2", "houlsby"), ("llama", "parallel")}
CASES = [pytest.param(arch, placement, marks=() if (arch, placement) in DEFAULT_CASES else pytest.mark.slow)
         for arch in ("bert", "gpt2", "llama") for placement in PLACEMENTS]


def check_launches(names: list[str], adapters: int) -> None:
    """The fused run launched the kernels at every adapter, every step: one weight-gradient launch
    per adapter and step, and at least one forward launch per adapter and forward pass."""
    counts = kernel_calls(names)
    assert counts.get("weight_grad_kernel", 0) == adapters * STEPS, counts
    assert counts.get("fused_rows_kernel", 0) >= adapters * (STEPS + 1), counts


@pytest.mark.parametrize("arch, placement", CASES)
def test_training_matches_the_reference_path(arch: str, placement: str, monkeypatch: pytest.MonkeyPatch,
                                             launches) -> None:  # type: ignore[no-untyped-def]
    with reference_path(monkeypatch):
        reference = train(adapted_model(arch, placement), task_kind(arch))
    assert len(launches) == 0, f"the reference run launched kernels: {kernel_calls(launches.names)}"
    assert_learns(reference)

    fused = train(adapted_model(arch, placement), task_kind(arch))
    check_launches(launches.names, LAYERS * SITES_PER_LAYER[placement])
    assert_same_run(fused, reference, FP32_RTOL, PARAMS_RTOL, f"{arch} {placement} float32")


def classifier() -> Any:
    """An AutoAdapterModel BERT with adapter and classification head "a", both training."""
    torch.manual_seed(0)
    model: Any = AutoAdapterModel.from_config(bert_config())
    model.add_adapter("a", config=AdapterConfig("houlsby", reduction_factor=REDUCTION_FACTOR))
    model.add_classification_head("a", num_labels=LABELS)
    model.train_adapter("a")
    return model


def test_training_with_a_prediction_head_matches_the_reference_path(monkeypatch: pytest.MonkeyPatch,
                                                                    launches) -> None:  # type: ignore[no-untyped-def]
    with reference_path(monkeypatch):
        model = classifier()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(n.startswith("heads.a.") for n in trained) and any("fused_adapters.a." in n for n in trained)
        assert all(n.startswith("heads.a.") or "fused_adapters.a." in n for n in trained), sorted(trained)
        reference = train(model, "classify")
    assert len(launches) == 0, f"the reference run launched kernels: {kernel_calls(launches.names)}"
    assert_learns(reference)
    assert reference.logprobs.shape == (make_batch("classify", 0)["input_ids"].shape[0], LABELS)

    fused = train(classifier(), "classify")
    check_launches(launches.names, LAYERS * SITES_PER_LAYER["houlsby"])
    assert_same_run(fused, reference, FP32_RTOL, PARAMS_RTOL, "bert houlsby + classification head, float32")
