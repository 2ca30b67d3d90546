"""One batch, many tasks: each sample of a batch runs its own adapter, through the grouped kernel.

    with per_sample_adapters(model, ["sst2", "mnli", None, "sst2"]):
        out = model(**batch)        # sample 0 and 3 use "sst2", sample 1 "mnli", sample 2 the base model

At every adapter site the adapters used by the batch run as one ``fused_adapter_grouped`` call with
a per-sequence index, so a mixed batch takes the launches of a single-adapter batch. Their
parameters are stacked when the block is entered (differentiably: gradients reach each adapter's
own parameters), so enter the block for each batch, as the names change with the batch anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..grouped import fused_adapter_grouped
from .config import Placement
from .model import model_state, require_adapter
from .sites import MODULE_NAME


class GroupedSite:
    """The adapters of one site, stacked: called on hidden states (B, ..., d) with sample b using
    bank entry ``index[b]`` (-1: no adapter)."""

    def __init__(self, index: torch.Tensor, parameters: list[torch.Tensor], activation: str, scale: float) -> None:
        self.index = index
        self.parameters = parameters  # down.weight (n, r, d), down.bias (n, r), up.weight (n, d, r), up.bias (n, d)
        self.activation = activation
        self.scale = scale

    def __call__(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() < 2 or z.shape[0] != self.index.shape[0]:
            raise ValueError(f"per_sample_adapters: {self.index.shape[0]} adapter names were given but the hidden "
                             f"states at this site have shape {tuple(z.shape)} (batch first expected)")
        down_w, down_b, up_w, up_b = self.parameters
        return fused_adapter_grouped(z, self.index, down_w, down_b, up_w, up_b, self.activation, self.scale,
                                     check_index=False, residual=residual)


@dataclass
class PerSampleBatch:
    """The grouped sites of one batch, keyed (layer index, site name)."""

    placement: Placement
    sites: dict[tuple[str, str], GroupedSite]


@contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, sample i of a batch uses adapter ``names[i]`` (None: the base model).

    The adapters named must share a placement (and ``cross_adapter``), bottleneck widths, layers,
    activation and scale, and use none of the options beyond the plain bottleneck (layer norms,
    gating, dropout, a learned scale: ValueError naming the adapter and option). The batch must have
    ``len(names)`` samples along its first dimension. Outputs equal running each sample alone
    with its adapter active. Restores the previous state (active adapter) on exit.

    The block holds for the calls made in the thread that entered it: other threads calling the
    same model meanwhile run as if it were not there. Activation checkpointing that recomputes the
    forward in another thread (the autograd engine's device threads on CUDA) does not see it either.
    """
    names = list(names)
    used: list[str] = []
    for name in names:
        if name is not None:
            require_adapter(model, name)
            if name not in used:
                used.append(name)
    state = model_state(model)
    if state is None:
        raise KeyError(f"adapter_fused: this model has no adapters (add some with add_adapter; see {MODULE_NAME})")
    batch = PerSampleBatch(placement=state.configs[used[0]].layout if used else Placement(attention=True, ffn=True),
                           sites={})
    if used:
        first = state.configs[used[0]]
        for name in used[1:]:
            other = state.configs[name]
            if (other.layout, other.cross_adapter, other.resolved_activation, other.scale) != (
                    first.layout, first.cross_adapter, first.resolved_activation, first.scale):
                raise ValueError(f"per_sample_adapters: adapters {used[0]!r} and {name!r} differ in placement "
                                 "(cross_adapter included), activation or scale; one batch can only mix adapters that "
                                 "share them")
        for name in used:
            config = state.configs[name]
            if not config.plain:
                options = ", ".join([*config.unfused_options, *(["learned scale"] if config.learned_scale else [])])
                raise ValueError(f"per_sample_adapters: adapter {name!r} uses {options}, which the grouped kernel does "
                                 "not compute; run it alone with set_active_adapters")
            if not config.layout.original_ln_after and None in names:
                raise ValueError(f"per_sample_adapters: adapter {name!r} skips the layer's own norm "
                                 "(original_ln_after=False), so it cannot share a batch with samples without adapter")
        banks = [state.modules[name] for name in used]
        for name, bank in zip(used[1:], banks[1:]):
            if list(bank) != list(banks[0]):
                raise ValueError(f"per_sample_adapters: adapters {used[0]!r} and {name!r} sit on different layers "
                                 f"({list(banks[0])} and {list(bank)}, see leave_out)")
        device = next(banks[0].parameters()).device
        position = {name: i for i, name in enumerate(used)}
        index = torch.tensor([position[n] if n is not None else -1 for n in names], dtype=torch.long, device=device)
        for layer, sites in banks[0].items():
            for site in sites:
                adapters = [bank[layer][site] for bank in banks]  # type: ignore[index]
                shapes = {tuple(a.down.weight.shape) for a in adapters}
                if len(shapes) != 1:
                    raise ValueError(f"per_sample_adapters: adapters {used} have different bottlenecks "
                                     f"({sorted(shapes)}) at layer {layer}")
                parameters = [torch.stack([getattr(getattr(a, part), kind) for a in adapters])
                              for part, kind in (("down", "weight"), ("down", "bias"), ("up", "weight"), ("up", "bias"))]
                batch.sites[(layer, site)] = GroupedSite(index.to(parameters[0].device), parameters,
                                                         first.resolved_activation, first.scale)
    call = state.call
    previous = call.batch
    call.batch = batch
    with state.lock:
        state.per_sample_blocks += 1
    try:
        yield
    finally:
        call.batch = previous
        with state.lock:
            state.per_sample_blocks -= 1
