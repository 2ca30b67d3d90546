"""One batch, many tasks: each sample of a batch runs its own adapter, through the grouped kernel.

    with per_sample_adapters(model, ["sst2", "mnli", None, "sst2"]):
        out = model(**batch)        # sample 0 and 3 use "sst2", sample 1 "mnli", sample 2 the base model

    out = model(**batch, adapter_names=["sst2", "mnli", None, "sst2"])   # the same, for one call

What runs at each site is ``rows``'s: the adapters may differ in placement, width, activation, scale
and layers, and every site takes one grouped launch per activation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .model import model_state
from .rows import enter_rows, leave_rows


@contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, sample i of a batch uses adapter ``names[i]`` (None or ``"__base__"``: the base
    model).

    The adapters may differ in placement, bottleneck width, activation, scale and layers; they must use
    none of the options beyond the plain bottleneck (layer norms, gating, dropout, a learned scale:
    ValueError naming the adapter and option), and an adapter that skips the layer's own norm
    (``original_ln_after=False``) runs only in a batch of its own. The batch must have ``len(names)``
    samples along its first dimension, or a multiple of it with each sample's rows consecutive (as
    ``generate`` expands prompts for beams). Outputs equal running each sample alone with its adapter
    active. Restores the previous state on exit. The model's forward takes the same per call as
    ``adapter_names=[...]``.

    The block holds for the calls made in the thread that entered it: other threads calling the
    same model meanwhile run as if it were not there. Activation checkpointing that recomputes the
    forward in another thread (the autograd engine's device threads on CUDA) does not see it either.
    """
    state = model_state(model)
    if state is None:
        raise KeyError("adapter_fused: this model has no adapters (add some with add_adapter)")
    entered = enter_rows(state, names)
    try:
        yield
    finally:
        leave_rows(state, entered)
