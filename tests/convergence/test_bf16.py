"""bfloat16 training runs with the fused kernels stay as close to the float32 run as the reference path's.

bf16 runs part from one another within a few steps: AdamW's first steps are close to ±lr per weight
whatever the gradient's size, so a gradient element whose sign flips between two roundings moves the
weight by 2·lr, and every later step starts from different weights. A bf16 run of the fused kernels
therefore cannot match the reference path's bf16 run the way float32 runs do. What it must do: take
the same loss curve within Liger-Kernel's bf16 tolerances (atol 1e-2, rtol 5e-2), and end no further
from the float32 run of the same model than the reference path's bf16 run ends (within a factor 2.5),
for the trained weights (distance relative to how far training moved them) and for the
log-probabilities (relative L2 distance). Measured on the cases below: the fused run's distance is
0.94 to 1.19 times the reference's for the weights, 0.91 to 1.45 times for the log-probabilities;
the two bf16 runs' losses differ by at most 0.034 (losses 2 to 4).

Two precisions: bf16 weights (``model.to(torch.bfloat16)``, as Liger-Kernel's convergence tests run
their models) and float32 weights under ``torch.autocast(dtype=torch.bfloat16)`` (mixed precision, as
``Trainer(bf16=True)`` runs).
"""

from __future__ import annotations

import pytest
import torch

from .training import (
    LAYERS,
    SITES_PER_LAYER,
    STEPS,
    Run,
    adapted_model,
    assert_learns,
    kernel_calls,
    reference_path,
    task_kind,
    train,
    trainable,
)

FACTOR = 2.5


def weight_distance(run: Run, truth: Run, start: dict[str, torch.Tensor]) -> float:
    """‖θ_run - θ_truth‖ / ‖θ_truth - θ_start‖ over all trained parameters."""
    diff = torch.cat([(run.params[n] - truth.params[n]).flatten() for n in truth.params])
    moved = torch.cat([(truth.params[n] - start[n]).flatten() for n in truth.params])
    return (diff.norm() / moved.norm()).item()


def logprob_distance(run: Run, truth: Run) -> float:
    return ((run.logprobs - truth.logprobs).norm() / truth.logprobs.norm()).item()


def compare(arch: str, placement: str, dtype: torch.dtype, autocast: torch.dtype | None,
            monkeypatch: pytest.MonkeyPatch, launches) -> None:  # type: ignore[no-untyped-def]
    """Train the reference path in float32 and in the given precision, then the fused kernels in it."""
    kind = task_kind(arch)
    with reference_path(monkeypatch):
        truth = train(adapted_model(arch, placement), kind)
        start = trainable(adapted_model(arch, placement))
        eager = train(adapted_model(arch, placement, dtype), kind, autocast=autocast)
    assert len(launches) == 0, f"the reference runs launched kernels: {kernel_calls(launches.names)}"
    assert_learns(eager)
    model = adapted_model(arch, placement, dtype)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}
    fused = train(model, kind, autocast=autocast)
    assert kernel_calls(launches.names).get("weight_grad_kernel", 0) == LAYERS * SITES_PER_LAYER[placement] * STEPS

    what = f"{arch} {placement} {'bf16 autocast' if autocast else dtype}"
    torch.testing.assert_close(fused.losses, eager.losses, atol=1e-2, rtol=5e-2, msg=lambda m: f"{what} losses: {m}")
    fused_w, eager_w = weight_distance(fused, truth, start), weight_distance(eager, truth, start)
    fused_lp, eager_lp = logprob_distance(fused, truth), logprob_distance(eager, truth)
    print(f"{what}: weights {fused_w:.4f} vs {eager_w:.4f}; log-probabilities {fused_lp:.4f} vs {eager_lp:.4f}; "
          f"fused-eager loss max {(fused.losses - eager.losses).abs().max():.4f} "
          f"weights {weight_distance(fused, eager, start):.4f}")
    assert fused_w <= FACTOR * eager_w, (f"{what}: trained weights {fused_w:.4f} from the float32 run, the reference "
                                         f"path's {eager_w:.4f}")
    assert fused_lp <= FACTOR * eager_lp, (f"{what}: log-probabilities {fused_lp:.4f} from the float32 run, the "
                                           f"reference path's {eager_lp:.4f}")


@pytest.mark.parametrize("arch, placement", [("bert", "parallel"), ("gpt2", "pfeiffer"), ("llama", "houlsby")])
def test_bf16_training_tracks_the_reference_path(arch: str, placement: str, monkeypatch: pytest.MonkeyPatch,
                                                 launches) -> None:  # type: ignore[no-untyped-def]
    compare(arch, placement, torch.bfloat16, None, monkeypatch, launches)


@pytest.mark.parametrize("arch, placement", [
    ("bert", "houlsby"),
    ("gpt2", "pfeiffer"),
])
def test_autocast_training_tracks_the_reference_path(arch: str, placement: str, monkeypatch: pytest.MonkeyPatch,
                                                     launches) -> None:  # type: ignore[no-untyped-def]
    compare(arch, placement, torch.float32, torch.bfloat16, monkeypatch, launches)
