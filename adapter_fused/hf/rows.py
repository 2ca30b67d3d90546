"""One adapter per row of a batch: what ``per_sample_adapters`` and the ``adapter_names=`` keyword run.

The adapters of one batch may differ in placement, bottleneck width, activation, scale and layers. At
every site the rows' adapters run in one ``fused_adapter_grouped`` launch per activation: their
weights are stacked into one bank, narrower bottlenecks padded with zero rows and columns (which add
nothing) and differing scales folded into the up-projections; a row whose adapter has no adapter at a
site (another placement's site, a layer left out) or that names none (None or ``"__base__"``) runs the
base model there. Rows whose adapters read different inputs (Houlsby's sub-block output, Pfeiffer's
normalized sum, the parallel adapter's block input) get theirs row by row before the one launch.

Without autograd recording the banks are built once per model (every plain adapter, whatever the
batch names) and kept until an adapter is added or removed; a site checks, on each call, that the
parameters of the adapters it runs are the tensors it stacked, unchanged (version counters and data
pointers), and restacks them when not. With autograd recording the used adapters are stacked when the
batch is entered, so gradients reach each adapter's own parameters. A batch naming one adapter for
every row runs that adapter's own plan, as if it were active.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..grouped import fused_adapter_grouped
from .. import ops
from ..ops import KERNEL_DTYPES, run_kernels
from ..reference import RowWeights, gather_rows, rows_math
from .config import AdapterConfig, Placement
from .sites import RAW, HookKey, ModelState, Site, SitePlan, site_plan

BASE = "__base__"
"""A row name meaning the base model (as None does)."""

_PARAMETERS = (("down", "weight"), ("down", "bias"), ("up", "weight"), ("up", "bias"))


def _parameters(module: nn.Module) -> list[torch.Tensor]:
    return [getattr(getattr(module, part), kind) for part, kind in _PARAMETERS]


def _stamp(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Version counter and data pointer of each tensor: equal stamps, same values in the same place."""
    return (*(t._version for t in tensors), *(t.data_ptr() for t in tensors))


class _Group:
    """The adapters of one activation at one site, stacked: ``params`` (down (n, r, d), down bias
    (n, r), up (n, d, r), up bias (n, d)), r the widest, scales folded into the up-projection unless
    every adapter has the same ``scale``; ``slots``: adapter name -> its index in the stack."""

    def __init__(self, activation: str, names: list[str], modules: list[nn.Module]) -> None:
        self.activation = activation
        self.names = names
        self.modules = modules
        self.slots = {name: i for i, name in enumerate(names)}
        scales = {m.scale for m in modules}
        self.scale = scales.pop() if len(scales) == 1 else 1.0
        self.folded = len({m.scale for m in modules}) > 1
        self.params = self.stack()
        self.stamps = [_stamp(_parameters(m)) for m in modules]

    def stack(self) -> list[torch.Tensor]:
        """The stacked (padded, scale-folded) parameters, differentiable in the adapters' own."""
        width = max(m.bottleneck for m in self.modules)
        stacks: list[list[torch.Tensor]] = [[], [], [], []]
        for module in self.modules:
            dw, db, uw, ub = _parameters(module)
            pad = width - module.bottleneck
            if self.folded:
                uw, ub = uw * module.scale, ub * module.scale
            for bucket, t in zip(stacks, (F.pad(dw, (0, 0, 0, pad)), F.pad(db, (0, pad)), F.pad(uw, (0, pad)), ub)):
                bucket.append(t)
        return [torch.stack(bucket) for bucket in stacks]

    def check(self, slots: Sequence[int]) -> None:
        """Restack when a parameter of an adapter in ``slots`` changed since it was stacked (in value,
        place, dtype or device)."""
        for slot in slots:
            if _stamp(_parameters(self.modules[slot])) != self.stamps[slot]:
                with torch.no_grad():
                    self.params = self.stack()
                self.stamps = [_stamp(_parameters(m)) for m in self.modules]
                return


class _Launch(NamedTuple):
    """One grouped launch at the sites of a signature: the position of the group in each site's bank, the
    row index into its stack (-1: not this group's), and the slots it uses (checked before a cached bank
    runs)."""

    group: int
    index: torch.Tensor
    slots: tuple[int, ...]


class RowsAtSites(NamedTuple):
    """What one batch runs at the sites sharing a signature: the launches, and, where the rows' adapters
    differ in placement, each placement's (B, 1) bool mask of its rows."""

    launches: tuple[_Launch, ...]
    masks: tuple[tuple[Placement, torch.Tensor], ...]


class PerSampleBatch(NamedTuple):
    """What a block runs at each site (``plans``, keyed (layer, site)), the hooks those read, and the
    rows of each signature (see ``SiteBank``)."""

    plans: dict[tuple[str, str], SitePlan]
    hook_keys: set[HookKey]
    rows: dict[int, RowsAtSites]


Pattern = tuple[tuple[Placement, ...], bool]
"""The placements of the adapters a batch runs at a site, and whether every row has one there."""


class SiteBank:
    """The stacked adapters of one site (a ``_Group`` per activation), called like one adapter,
    ``bank(z, residual=None)`` with z (B, ..., d): row b runs its adapter, as the current thread's batch
    says (its ``rows`` under this bank's ``signature``; one launch per activation; rows of no adapter
    keep the residual). What it runs does not depend on the batch's names, so a new mix of names costs
    an index per signature, not a plan per site. ``check``: a cached bank, whose used slots are checked
    on each call; traced by torch.compile, the bank stacks the parameters in the graph instead.

    A call whose input matches the stacks (a plain tensor in their dtype and device, of width d, no
    autocast) goes straight to the kernels (or, where they do not run, to the rows' own weights,
    gathered once per stack and index); any other input takes ``fused_adapter_grouped``, which
    validates it."""

    def __init__(self, state: ModelState, site: Site, groups: list[_Group], signature: int, check: bool) -> None:
        self.state = state
        self.site = site
        self.groups = groups
        self.signature = signature
        self.check = check
        first = groups[0].params[0]
        self.dtype, self.device, self.d = first.dtype, first.device, first.shape[-1]
        self.kernels = first.dtype in KERNEL_DTYPES and ops.kernels_available(first.device)
        self.gathered: dict[tuple[int, int], tuple[list[torch.Tensor], torch.Tensor, RowWeights]] = {}
        self.plans: dict[Pattern, SitePlan] = {}

    def plan(self, pattern: Pattern) -> SitePlan:
        """The plan of a batch whose adapters here have ``pattern``."""
        found = self.plans.get(pattern)
        if found is None:
            kinds, every_row = pattern
            site = self.site
            if len(kinds) == 1 and (every_row or _residual_is_h(kinds[0])):
                found = site_plan(self, kinds[0], site.spec, site.norm is not None)
            else:
                found = site_plan(MixedRows(self), RAW, site.spec, site.norm is not None)
            self.plans[pattern] = found
        return found

    def __call__(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fast = (type(z) is torch.Tensor and z.dtype is self.dtype and z.device == self.device and z.dim() >= 2
                and z.shape[-1] == self.d and not torch.is_autocast_enabled(z.device.type)
                and (residual is None or residual.shape == z.shape and residual.dtype is self.dtype))
        out = residual
        compiling = torch.compiler.is_compiling()
        for position, index, slots in self.state.call.batch.rows[self.signature].launches:
            group = self.groups[position]
            if z.shape[0] != index.shape[0]:
                index = _rows(index, z)
            if compiling:  # traced: the stacking joins the graph, which reads the parameters on every run
                params = group.stack()
            else:
                if self.check:
                    group.check(slots)
                params = group.params
            if not fast:
                out = fused_adapter_grouped(z, index, *params, group.activation, group.scale, check_index=False,
                                            residual=out)
            elif self.kernels:
                out = run_kernels(z, params, group.activation, group.scale, index, math.prod(z.shape[1:-1]), out)
            else:
                out = self._rows_math(position, group, index, z, out)
        assert out is not None
        return out

    def _rows_math(self, position: int, group: _Group, index: torch.Tensor, z: torch.Tensor,
                   residual: torch.Tensor | None) -> torch.Tensor:
        """The grouped adapter in plain PyTorch with each row's weights gathered (kept per stack and index
        without autograd; per call while autograd records): two batched matmuls whatever the mix."""
        key = (position, id(index))
        found = self.gathered.get(key)
        if found is None or found[0] is not group.params or found[1] is not index or torch.is_grad_enabled():
            found = (group.params, index, gather_rows(index, *group.params))
            if not torch.is_grad_enabled():
                if len(self.gathered) >= 64:
                    self.gathered.clear()
                self.gathered[key] = found
        x3 = z.reshape(z.shape[0], -1, self.d)
        res3 = None if residual is None else residual.reshape(x3.shape)
        return rows_math(x3, found[2], group.activation, group.scale, res3).view(z.shape)


def _rows(index: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``index`` for the batch of ``z``: as is, or each row repeated when generation expanded the batch
    (beams, several sequences per prompt: each prompt's rows are consecutive)."""
    rows = z.shape[0] if z.dim() >= 2 else -1
    if rows < 1 or rows % index.shape[0]:
        raise ValueError(f"per_sample_adapters: {index.shape[0]} adapter names were given but the hidden states at "
                         f"this site have shape {tuple(z.shape)} (batch first expected)")
    return index.repeat_interleave(rows // index.shape[0])


class MixedRows:
    """A bank's rows whose adapters differ in placement, called as ``site(x, residual=h)`` (see
    ``sites.RAW``): each row's adapter input and residual as its placement says (the batch's masks),
    then the bank's launches."""

    def __init__(self, bank: SiteBank) -> None:
        self.bank = bank

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bank = self.bank
        norm = bank.site.norm
        h = residual if residual is not None else x
        z, r = h, h
        for placement, mask in bank.state.call.batch.rows[bank.signature].masks:
            if mask.shape[0] != h.shape[0]:
                mask = _rows(mask.squeeze(-1), h).unsqueeze(-1)
            mask = mask.view(mask.shape[0], *([1] * (h.dim() - 1)))
            if placement.parallel:
                z_p, r_p = x, h
            elif placement.original_ln_before:
                total = h + x
                z_p = norm(total) if norm is not None else total
                before = placement.residual_before_ln
                r_p = h if before is True else (z_p if before is False else total)
            else:
                z_p, r_p = h, h
            z = torch.where(mask, z_p, z) if z_p is not h else z
            r = torch.where(mask, r_p, r) if r_p is not h else r
        return bank(z, residual=r)


class _Bank:
    """The stacked adapters of every site of a model (``sites``: (layer, site) -> ``SiteBank``). Sites whose
    groups hold the same adapters in the same slots share a signature (``structures[signature]``: per
    group, adapter name -> slot), so a batch's rows are worked out once per signature."""

    def __init__(self, state: ModelState, names: Sequence[str], stacked: bool) -> None:
        self.sites: dict[tuple[str, str], SiteBank] = {}
        self.structures: list[list[dict[str, int]]] = []
        self.hook_keys: dict[tuple[Any, ...], set[HookKey]] = {}
        signatures: dict[tuple[Any, ...], int] = {}
        for site in state.sites:
            found: dict[str, list[tuple[str, nn.Module]]] = {}
            for name in names:
                layer = state.modules[name]._modules.get(site.layer)
                module = layer._modules.get(site.name) if layer is not None else None
                if module is not None:
                    found.setdefault(module.activation, []).append((name, module))  # type: ignore[union-attr]
            if not found:
                continue
            with torch.enable_grad() if stacked else torch.no_grad():
                groups = [_Group(act, [n for n, _ in pairs], [m for _, m in pairs]) for act, pairs in found.items()]
            structure = tuple(tuple(group.names) for group in groups)
            if structure not in signatures:
                signatures[structure] = len(self.structures)
                self.structures.append([group.slots for group in groups])
            self.sites[site.key] = SiteBank(state, site, groups, signatures[structure], check=not stacked)


def _check(state: ModelState, names: list[str | None]) -> tuple[list[str], dict[str, AdapterConfig]]:
    """The distinct adapters ``names`` uses, in order, checked to run in one batch."""
    used = list(dict.fromkeys(n for n in names if n is not None))
    configs = {name: state.configs[name] for name in used}
    for name, config in configs.items():
        if not config.plain:
            options = ", ".join([*config.unfused_options, *(["learned scale"] if config.learned_scale else [])])
            raise ValueError(f"per_sample_adapters: adapter {name!r} uses {options}, which the grouped kernel does "
                             "not compute; run it alone with set_active_adapters")
    after = {name for name, config in configs.items() if not config.layout.original_ln_after}
    if after and (len(used) > 1 or None in names):
        name = next(iter(after))
        raise ValueError(f"per_sample_adapters: adapter {name!r} skips the layer's own norm (original_ln_after=False), "
                         "so it cannot share a batch with samples of other adapters or without adapter")
    return used, configs


def _batch(state: ModelState, names: list[str | None]) -> PerSampleBatch:
    """The plans of a block running ``names`` (cached per names until the model's adapters change)."""
    cache = state.__dict__.setdefault("per_sample_cache", {})
    grad = torch.is_grad_enabled()
    key = (tuple(names), grad)
    found = cache.get(key) if not grad else None
    if found is not None and found[0] == state.generation:
        return found[1]
    used, configs = _check(state, names)
    if len(used) == 1 and None not in names:  # one adapter for every row: its own plan
        plans = {site.key: plan for site in state.sites
                 if (plan := site.resolve(used[0], state.modules, state.configs, site.norm)) is not None}
        batch = PerSampleBatch(plans, state.hook_keys((site, plans.get(site.key)) for site in state.sites), {})
    else:
        batch = _grouped_batch(state, _bank(state, used, grad), names, used, configs)
    if not grad:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = (state.generation, batch)
    return batch


def _bank(state: ModelState, used: list[str], grad: bool) -> _Bank:
    """With autograd recording, the ``used`` adapters stacked now; without, every plain adapter of the
    model stacked once (kept until the model's adapters change)."""
    if grad:
        return _Bank(state, used, stacked=True)
    found = state.__dict__.get("per_sample_bank")
    if found is None or found[0] != state.generation or not set(used) <= found[2]:
        plain = [name for name, config in state.configs.items() if config.plain]
        found = (state.generation, _Bank(state, plain, stacked=False), set(plain))
        state.__dict__["per_sample_bank"] = found
    return found[1]


def _grouped_batch(state: ModelState, bank: _Bank, names: list[str | None], used: list[str],
                   configs: dict[str, AdapterConfig]) -> PerSampleBatch:
    """The batch of ``names`` on ``bank``: per signature, the launches' indices (and masks of a mix of
    placements); per site, the bank's plan for its pattern."""
    device = next(iter(bank.sites.values())).device if bank.sites else torch.device("cpu")
    tensors: dict[tuple[int, ...], torch.Tensor] = {}

    def tensor(values: tuple[int, ...]) -> torch.Tensor:
        if values not in tensors:
            tensors[values] = torch.tensor(values, dtype=torch.long, device=device)
        return tensors[values]

    placements = {name: config.layout for name, config in configs.items()}
    rows: dict[int, RowsAtSites] = {}
    patterns: dict[int, Pattern] = {}
    for signature, structure in enumerate(bank.structures):
        launches, present = [], []
        for position, slot_of in enumerate(structure):
            slots = tuple(slot_of.get(n, -1) if n is not None else -1 for n in names)
            if any(s >= 0 for s in slots):
                launches.append(_Launch(position, tensor(slots), tuple(sorted({s for s in slots if s >= 0}))))
                present += [n for n in used if n in slot_of]
        if not launches:
            continue
        kinds = tuple(dict.fromkeys(placements[n] for n in present))
        every_row = all(n in present for n in names)
        masks = ()
        if not (len(kinds) == 1 and (every_row or _residual_is_h(kinds[0]))):
            masks = tuple((p, tensor(tuple(int(n in present and placements[n] == p) for n in names)).bool()
                           .unsqueeze(-1)) for p in kinds)
        rows[signature] = RowsAtSites(tuple(launches), masks)
        patterns[signature] = (kinds, every_row)
    plans = {key: site_bank.plan(patterns[site_bank.signature]) for key, site_bank in bank.sites.items()
             if site_bank.signature in patterns}
    hook_key = tuple(sorted(patterns.items(), key=lambda item: item[0]))
    hooks = bank.hook_keys.get(hook_key)
    if hooks is None:
        hooks = bank.hook_keys[hook_key] = state.hook_keys((site, plans.get(site.key)) for site in state.sites)
    return PerSampleBatch(plans, hooks, rows)


def _residual_is_h(placement: Placement) -> bool:
    """Whether a row the grouped launch skips (index -1, output = its residual) keeps the sub-block
    output ``h``, as a row without an adapter must."""
    return placement.parallel or not placement.original_ln_before or placement.residual_before_ln is True


_tokens = itertools.count()


def check_names(state: ModelState, names: Sequence[str | None]) -> list[str | None]:
    """``names`` with ``"__base__"`` as None, every other name checked to be one of the model's
    adapters (KeyError naming them otherwise)."""
    rows: list[str | None] = []
    for name in names:
        if name is None or name == BASE:
            rows.append(None)
        elif name in state.configs:
            rows.append(name)
        else:
            known = ", ".join(state.configs) or "none"
            raise KeyError(f"adapter_fused: no adapter named {name!r} on this model (adapters: {known})")
    return rows


def enter_rows(state: ModelState, names: Sequence[str | None]) -> tuple[int, Any]:
    """Make this thread's calls of the model run ``names`` row by row; returns what ``leave_rows``
    needs to undo it (blocks nest)."""
    batch = _batch(state, check_names(state, names))
    token = next(_tokens)
    call = state.call
    previous = call.batch
    with state.lock:
        state.per_sample_blocks += 1
        state.batches[token] = batch
    checked = state.__dict__.get("rows_hooks_checked")  # (batch, plan_version) whose hooks were installed
    if checked is None or checked[0] is not batch or checked[1] != state.plan_version:
        if not batch.hook_keys <= state.installed.keys():
            state.sync_hooks()
        state.__dict__["rows_hooks_checked"] = (batch, state.plan_version)  # hooks change: plan_version moves
    call.batch = batch
    return token, previous


def leave_rows(state: ModelState, entered: tuple[int, Any]) -> None:
    """Undo ``enter_rows``."""
    token, previous = entered
    state.call.batch = previous
    with state.lock:
        state.per_sample_blocks -= 1
        del state.batches[token]


class AdapterNames:
    """Forward pre-hook (with kwargs) and hook of a model: a call given ``adapter_names=[...]`` (one
    name per row; None or ``"__base__"``: the base model) runs it row by row, as ``per_sample_adapters``
    does; the keyword is taken out before the model's own forward sees it."""

    def __init__(self, state: ModelState) -> None:
        self.state = state

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "adapter_names" not in kwargs:
            return None
        names = kwargs.pop("adapter_names")
        stack = self.state.call.__dict__.setdefault("named", [])
        stack.append((module, enter_rows(self.state, names) if names is not None else None))
        return args, kwargs

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self.state.call.__dict__.get("named")
        if stack and stack[-1][0] is module:
            entered = stack.pop()[1]
            if entered is not None:
                leave_rows(self.state, entered)


def hook_adapter_names(model: nn.Module, state: ModelState) -> None:
    """Let ``model`` (and its base model) take ``adapter_names=`` (once per module)."""
    hooked = state.__dict__.setdefault("names_hooked", [])
    hook = AdapterNames(state)
    for module in dict.fromkeys((model, state.base)):
        if any(m is module for m in hooked):
            continue
        state.handles.append(module.register_forward_pre_hook(hook.enter, with_kwargs=True))
        state.handles.append(module.register_forward_hook(hook.leave, always_call=True))
        hooked.append(module)
