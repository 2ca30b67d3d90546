"""How a composition runs at one site (``CompositionSite``, made by ``composition_site``), with
AdapterHub's semantics for every block of ``composition``, and the task ids a ``MultiTask`` reads
(``given_task_ids``).

At a site with sub-block output ``h`` and block residual ``x``, each adapter's placement gives its input
``z`` and residual ``r`` (``CompositionSite._pre``); with sequential placements the site returns the new
``h'`` (the layer then computes ``LN(h' + x)``), with parallel placements ``h`` plus what the block adds.

- ``Stack``: the children in turn, each reading the previous one's output.
- ``Average``: one launch of an adapter of the summed width where the children allow it (see
  ``composition``), else each child and the weighted mean.
- ``Parallel``, ``BatchSplit``, ``MultiTask`` (rows of the batch: copies, consecutive slices, or the rows
  whose task id names the child) and ``Split`` (consecutive positions of the sequence): one grouped
  launch (per row or per token) when the children are adapters sharing an activation and width, else
  each child on its part. A None child (the base model) or a child without an adapter at the site
  leaves its part as ``h``. ``MultiTask`` reruns the placement's input step before its children, as
  AdapterHub 1.3 does (its ``MultiTask`` applies it twice; this matters only for placements that
  read ``LN(h + x)``, such as ``pfeiffer``).
- ``Fuse``: every child reads the same ``z`` (from the placement of the block), each adapter's
  ``s * f(z)`` is computed by the fused kernel without its residual (a Stack child: its adapters in
  turn, the last one's term), and the block's fusion layer (``fusion.FusionLayer``, looked up in
  ``fused_adapters["fusion"]``) attends over them in PyTorch: ``h' = fusion(q, terms, r)`` with the
  query ``q`` = z (``h`` with ``query_before_ln``). With parallel placements, as in AdapterHub,
  ``h' = h + fusion(x, terms, x)``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..grouped import fused_adapter_grouped
from ..layer import FusedAdapter
from ..ops import fused_adapter
from .composition import (
    Average,
    BatchSplit,
    Composition,
    Fuse,
    MultiTask,
    Parallel,
    SetupAtSite,
    Split,
    Stack,
)
from .config import AdapterConfig, Placement


class CallStack(threading.local):
    """Values given to the calls running in this thread, innermost last (each thread has its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[Any] = []

    @contextmanager
    def pushed(self, value: Any) -> Iterator[None]:
        """``value`` is the innermost item within the block."""
        self.items.append(value)
        try:
            yield
        finally:
            self.items.pop()


_TASK_IDS = CallStack()


def given_task_ids(task_ids: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``MultiTask`` sites in this thread read ``task_ids`` (a (batch,) integer
    tensor of child positions, or a sequence of the children's names or positions)."""
    return _TASK_IDS.pushed(task_ids)


Part = slice | torch.Tensor
"""The rows (or positions) of one child: a slice of consecutive ones, or their indices."""


class CompositionSite(SetupAtSite):
    """A composition at one site of one layer, called as ``site(x, residual=h)`` -> h' (see
    ``sites.RAW``); reads the adapters of ``modules`` (``{name: {layer: {site: module}}}``) at call
    time. What it checks before it runs is ``composition.SetupAtSite``'s."""

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = residual if residual is not None else x
        names = [n for n in self.setup.flatten() if self.module(n) is not None]
        if self.configs[names[0]].layout.parallel:
            return self._parallel(self.setup, x, h)
        return self._sequential(self.setup, h, x)

    # -- sequential placements: (h, x) -> h', following AdapterHub's pre-forward / forward steps --

    def _pre(self, placement: Placement, hidden: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter input z and residual r for ``hidden`` under ``placement``."""
        before = placement.residual_before_ln
        z = residual = hidden
        if placement.original_ln_before:
            total = hidden + x
            z = self.norm(total) if self.norm is not None else total
            residual = hidden if before is True else (z if before is False else total)
        return z, residual

    def _run(self, name: str, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        module = self.module(name)
        assert module is not None
        return module(z) if residual is z else module(z, residual=residual)

    def _common(self, node: Composition) -> Placement:
        return self.placement(next(n for n in node.flatten() if self.module(n) is not None))

    def _sequential(self, node: Composition, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(node, Stack):
            for child in node.children:
                if isinstance(child, str):
                    if self.module(child) is not None:
                        hidden = self._run(child, *self._pre(self.placement(child), hidden, x))
                elif self.present(child):
                    hidden = self._sequential(child, hidden, x)  # type: ignore[arg-type]
            return hidden
        if not self.present(node):
            return hidden
        z, residual = self._pre(self._common(node), hidden, x)
        if isinstance(node, Fuse):
            fusion = self.fusion(node)
            terms = [self._term(child, z, x) for child in node.children if child is not None and self.present(child)]
            return fusion(hidden if fusion.query_before_ln else z, torch.stack(terms, dim=-2), residual)  # type: ignore[misc,union-attr]
        if isinstance(node, Average):
            n = len(node.children)
            fused = self._fusable(node)
            if fused is not None:
                c = sum(node.weights) / n
                r = residual if c == 1.0 else residual * c
                return _averaged(fused, [w / n for w in node.weights], z, None if r is z else r)
            out = None
            for child, w in zip(node.children, node.weights):
                y = self._run(child, z, residual) if isinstance(child, str) else self._sequential(child, z, x)  # type: ignore[arg-type]
                out = y * (w / n) if out is None else out + y * (w / n)
            assert out is not None
            return out
        if isinstance(node, MultiTask):  # AdapterHub runs the input step once more for the split it makes
            z, residual = self._pre(self._common(node), z, x)
        parts, positions, dim = self._layout(node, hidden)
        fused = self._fusable(node)
        if fused is not None and (residual is hidden or all(m is not None for _, m in fused)):
            return _grouped(fused, positions, z, None if residual is z else residual)
        pieces = []
        for child, part in zip(node.children, parts):
            if not self.present(child):
                pieces.append(_take(hidden, part, dim))
            elif isinstance(child, str):
                pieces.append(self._run(child, _take(z, part, dim), _take(residual, part, dim)))
            else:
                pieces.append(self._sequential(child, _take(z, part, dim), _take(x, part, dim)))  # type: ignore[arg-type]
        return _assemble(pieces, parts, dim)

    def _term(self, child: str | Composition, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``s * f(z)`` of a child of a Fuse, without its residual. A Stack child runs its adapters in
        turn, each rerunning its placement's input step (as AdapterHub does), and gives the last
        one's term."""
        if isinstance(child, str):
            return _term(self.module(child), z)  # type: ignore[arg-type]
        names = [n for n in child.flatten() if self.module(n) is not None]
        if self.placement(names[0]).parallel:  # a Stack holds one parallel-placement adapter per site
            return _term(self.module(names[-1]), x)  # type: ignore[arg-type]
        hidden = z
        for name in names[:-1]:
            hidden = self._run(name, *self._pre(self.placement(name), hidden, x))
        return _term(self.module(names[-1]), self._pre(self.placement(names[-1]), hidden, x)[0])  # type: ignore[arg-type]

    # -- parallel placement: h' = h + the composed adapter outputs on x --

    def _parallel(self, node: str | Composition | None, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base`` plus what ``node`` adds at this site, reading ``x``."""
        if node is None:
            return base
        if isinstance(node, str):
            return self._run(node, x, base) if self.module(node) is not None else base
        if isinstance(node, Stack):
            child = next((c for c in node.children if self.present(c)), None)
            return base if child is None else self._parallel(child, x, base)
        if not self.present(node):
            return base
        if isinstance(node, Fuse):
            terms = [self._term(child, x, x) for child in node.children if child is not None and self.present(child)]
            return base + self.fusion(node)(x, torch.stack(terms, dim=-2), x)  # type: ignore[misc]
        fused = self._fusable(node)
        if isinstance(node, Average):
            n = len(node.children)
            if fused is not None:
                return _averaged(fused, [w / n for w in node.weights], x, base)
            out = base * (1.0 - sum(node.weights) / n)
            for child, w in zip(node.children, node.weights):
                out = out + self._parallel(child, x, base) * (w / n)
            return out
        parts, positions, dim = self._layout(node, x)
        if fused is not None:
            return _grouped(fused, positions, x, base)
        pieces = [self._parallel(child, _take(x, part, dim), _take(base, part, dim))
                  for child, part in zip(node.children, parts)]
        return _assemble(pieces, parts, dim)

    # -- which rows or positions each child takes --

    def _layout(self, node: Composition, hidden: torch.Tensor) -> tuple[list[Part], torch.Tensor, int]:
        """For a Parallel, BatchSplit, MultiTask or Split block: each child's part of ``hidden``, the
        child position of every row (shape (batch,)) or token (shape (batch, length), for Split), and
        the dimension the parts are taken along."""
        device = hidden.device
        if isinstance(node, MultiTask):
            ids = self._task_ids(node, hidden.shape[0], device)
            return [torch.nonzero(ids == i).flatten() for i in range(len(node.children))], ids, 0
        if isinstance(node, Split):
            if hidden.dim() < 3 or sum(node.splits) != hidden.shape[1]:
                raise ValueError(f"adapter_fused: {node!r} splits {sum(node.splits)} positions but the hidden states "
                                 f"at layer {self.layer} {self.site} have shape {tuple(hidden.shape)} (batch, length, "
                                 f"d) expected, with length {sum(node.splits)}")
            sizes, dim = list(node.splits), 1
        else:
            sizes, dim = _row_sizes(node, hidden.shape[0]), 0
        positions = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                            torch.tensor(sizes, device=device))
        if dim == 1:
            positions = positions.expand(hidden.shape[0], -1)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [slice(start, start + size) for start, size in zip(starts, sizes)], positions, dim

    def _task_ids(self, node: MultiTask, batch: int, device: torch.device) -> torch.Tensor:
        """The task id (child position) of every row, from the ``task_ids`` of this call."""
        given = _TASK_IDS.items[-1] if _TASK_IDS.items else None
        n = len(node.children)
        if given is None:
            raise ValueError(f"adapter_fused: {node!r} needs the task of each sample: call the model with task_ids= "
                             f"(one child position or name per sample) on a model given the methods "
                             f"(adapter_fused.init or AutoAdapterModel)")
        if not isinstance(given, torch.Tensor):
            given = [node.children.index(t) if isinstance(t, str) and t in node.children else t for t in given]
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in given):
                raise ValueError(f"adapter_fused: task_ids for {node!r} must be child positions or the names of its "
                                 f"adapter children, got {given!r}")
            given = torch.tensor(given, dtype=torch.long)
        ids = given.to(device=device, dtype=torch.long).flatten()
        if ids.shape[0] != batch or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n)):
            raise ValueError(f"adapter_fused: task_ids {given.tolist()} for {node!r} must give each of the {batch} "
                             f"samples a child position in [0, {n})")
        return ids

    def _fusable(self, node: Composition) -> list[tuple[str | None, FusedAdapter | None]] | None:
        """Per child, its name and module here (None where absent, or for a None child) when every
        child is an adapter name or None and those present are plain FusedAdapters sharing an
        activation and width d (one launch runs them all); else None."""
        if not all(c is None or isinstance(c, str) for c in node.children):
            return None
        found: list[tuple[str | None, FusedAdapter | None]] = []
        for name in node.children:
            module = None if name is None else self.module(name)  # type: ignore[arg-type]
            if module is not None and type(module) is not FusedAdapter:
                return None
            found.append((name, module))  # type: ignore[arg-type]
        present = [m for _, m in found if m is not None]
        if len({m.activation for m in present}) != 1 or len({m.d_model for m in present}) != 1:
            return None
        return found


def _row_sizes(node: Composition, batch: int) -> list[int]:
    if isinstance(node, Parallel):
        n = len(node.children)
        if batch % n:
            raise ValueError(f"adapter_fused: {node!r} needs a batch of {n} equal copies, but the hidden states at "
                             f"this site have {batch} rows (call the model itself, whose inputs are replicated)")
        return [batch // n] * n
    assert isinstance(node, BatchSplit)
    if sum(node.batch_sizes) != batch:
        raise ValueError(f"adapter_fused: {node!r} splits {sum(node.batch_sizes)} rows but the batch has {batch}")
    return list(node.batch_sizes)


def _take(t: torch.Tensor, part: Part, dim: int) -> torch.Tensor:
    if isinstance(part, slice):
        return t[part] if dim == 0 else t[:, part]
    return t.index_select(dim, part)


def _assemble(pieces: list[torch.Tensor], parts: list[Part], dim: int) -> torch.Tensor:
    """The children's outputs put back where their parts came from."""
    out = torch.cat(pieces, dim=dim)
    if parts and not isinstance(parts[0], slice):
        order = torch.cat(parts)  # type: ignore[arg-type]
        out = out.index_select(dim, torch.argsort(order))
    return out


def _params(module: FusedAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return module.down.weight, module.down.bias, module.up.weight, module.up.bias


def _term(module: FusedAdapter, z: torch.Tensor) -> torch.Tensor:
    """``s * f(z)`` of a site adapter, without the residual (what AdapterHub's Fuse reads: its up
    projection, scaled, before dropout or a gate): the adapter's own layer norm before the bottleneck
    and a learned scale are applied, the kernel adds a residual of zeros that is never materialised."""
    norm = getattr(module, "norm_before", None)
    a = norm(z) if norm is not None else z
    down_w, down_b, up_w, up_b = _params(module)
    scale, scaling = module.scale, getattr(module, "scaling", None)
    if scaling is not None:
        s = scaling.to(up_w.dtype)
        up_w, up_b, scale = s[:, None] * up_w, s * up_b, 1.0
    return fused_adapter(a, down_w, down_b, up_w, up_b, module.activation, scale,
                         residual=a.new_zeros(()).expand_as(a))


def _averaged(adapters: list[tuple[str | None, FusedAdapter | None]], coefs: list[float], z: torch.Tensor,
              residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + sum_i coef_i s_i f_i(z)`` as one adapter of the summed width (one launch):
    W_down stacked by rows, W_up' = [c_1 s_1 W_up_1, ...] by columns, b_up' = sum_i c_i s_i b_up_i.
    Built from the parameters on every call, so gradients reach each adapter's own parameters."""
    downs, down_biases, ups, up_bias = [], [], [], None
    for (_, module), coef in zip(adapters, coefs):
        assert module is not None
        dw, db, uw, ub = _params(module)
        k = coef * module.scale
        downs.append(dw)
        down_biases.append(db)
        ups.append(uw * k)
        up_bias = ub * k if up_bias is None else up_bias + ub * k
    activation = adapters[0][1].activation  # type: ignore[union-attr]
    return fused_adapter(z, torch.cat(downs), torch.cat(down_biases), torch.cat(ups, dim=1), up_bias, activation,
                         1.0, residual=residual)


def _grouped(adapters: list[tuple[str | None, FusedAdapter | None]], positions: torch.Tensor, z: torch.Tensor,
             residual: torch.Tensor | None) -> torch.Tensor:
    """Rows (or tokens) of ``z`` through the children, row m through child ``positions[m]``, in one
    grouped launch; each adapter's scale folded into its up-projection, narrower adapters padded with
    zero rows and columns (which add nothing), rows of absent or None children left as their residual."""
    bank: dict[str, FusedAdapter] = {}
    for name, module in adapters:
        if module is not None:
            bank.setdefault(name, module)  # type: ignore[arg-type]
    names = list(bank)
    width = max(m.bottleneck for m in bank.values())
    stacks: list[list[torch.Tensor]] = [[], [], [], []]
    for module in bank.values():
        dw, db, uw, ub = _params(module)
        pad, s = width - module.bottleneck, module.scale
        for bucket, tensor in zip(stacks, (F.pad(dw, (0, 0, 0, pad)), F.pad(db, (0, pad)), F.pad(uw * s, (0, pad)),
                                           ub * s)):
            bucket.append(tensor)
    lookup = torch.tensor([names.index(name) if module is not None else -1 for name, module in adapters],  # type: ignore[arg-type]
                          dtype=torch.long, device=z.device)
    down_w, down_b, up_w, up_b = (torch.stack(b) for b in stacks)
    return fused_adapter_grouped(z, lookup[positions], down_w, down_b, up_w, up_b, next(iter(bank.values())).activation,
                                 1.0, check_index=False, residual=residual)


def composition_site(setup: Composition, modules: nn.ModuleDict, configs: dict[str, AdapterConfig], layer: str,
                     site: str, norm: nn.Module | None) -> CompositionSite | None:
    """What runs ``setup`` at one site (called with the ``sites.RAW`` placement), or None where none
    of its adapters has a module there."""
    found = CompositionSite(setup, modules, configs, layer, site, norm)
    return found if found.check() else None
