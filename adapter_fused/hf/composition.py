"""Several adapters at once, with AdapterHub's composition semantics: ``Stack``, ``Parallel``,
``Average`` and ``BatchSplit``.

    set_active_adapters(model, Stack("lang", "task"))                 # MAD-X: task on top of language
    set_active_adapters(model, Stack("lang", Average("t1", "t2", weights=[0.7, 0.3])))
    set_active_adapters(model, Parallel("a", "b"))                    # batch B in, batch 2B out
    set_active_adapters(model, BatchSplit("a", "b", batch_sizes=[3, 5]))

At each site, with sub-block output ``h`` (the layer then computes ``LN(h' + x)``), block residual
``x`` and each adapter's placement deciding its input ``z`` and residual ``r`` (see ``Placement``):

- ``Stack(c1, c2, ...)``: the children one after another, each reading the previous one's output as
  its ``h`` (an adapter absent at a site is skipped). One launch per adapter.
- ``Average(c1, ..., cn, weights=w)``: with ``z``, ``r`` from the shared placement, the output is
  ``(1/n) * sum_i w_i * (r + s_i f_i(z))``, which is what AdapterHub 1.3 computes (its mean over the
  weighted outputs: with the default weights 1/n the residual gets the factor 1/n). Weights are
  normalized to sum 1 unless ``normalize_weights=False``. Adapters sharing an activation run as one
  adapter of the summed width: down-projections stacked, ``w_i s_i / n`` folded into the
  up-projection columns and bias, one ``fused_adapter`` launch per site.
- ``Parallel(c1, ..., cn)``: every batch-first input of the base model is repeated n times, so the
  outputs have batch n*B, copy i running child i. ``BatchSplit(c1, ..., batch_sizes=[b1, ...])``:
  rows ``b1 + ... + b(i-1)`` onwards (``bi`` of them) run child i. Both take one
  ``fused_adapter_grouped`` launch per site when their children are adapters sharing an activation.

Adapters under one Average, Parallel or BatchSplit must share their placement at each site. With
parallel-placement adapters (``"parallel"``) the adapter outputs are added to ``h``: a Stack may then
hold only one of them per site (AdapterHub keeps only the last one's output). Nesting follows
AdapterHub's rules; a child that reruns the placement's input step (a Stack, Average or BatchSplit
under Average, Parallel or BatchSplit) rereads it from its parent's adapter input, as AdapterHub
does. A child of Parallel or BatchSplit with no adapter at a site leaves its rows unchanged there.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..grouped import fused_adapter_grouped
from ..layer import FusedAdapter
from ..ops import fused_adapter
from .config import AdapterConfig, Placement


class Composition:
    """Base of the composition blocks: an ordered tuple of children (adapter names or blocks)."""

    def __init__(self, *children: str | Composition | Sequence[Any]) -> None:
        kind = type(self).__name__
        if not children:
            raise ValueError(f"adapter_fused: {kind}() needs at least one adapter")
        self.children: tuple[str | Composition, ...] = tuple(_child(c, kind) for c in children)

    def flatten(self) -> list[str]:
        """The adapter names in the block, each once, in order of appearance."""
        names: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.flatten():
                if name not in names:
                    names.append(name)
        return names

    def first(self) -> str:
        """The first adapter name (depth first)."""
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    @property
    def parallel_channels(self) -> int:
        """How many copies of the batch the block runs on (1 without a Parallel block)."""
        return max(c.parallel_channels if isinstance(c, Composition) else 1 for c in self.children)

    def _options(self) -> tuple[Any, ...]:
        return ()

    def _extra_repr(self) -> str:
        return ""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self.children == other.children  # type: ignore[attr-defined]
                and self._options() == other._options())  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children, self._options()))

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children]
        extra = self._extra_repr()
        return f"{type(self).__name__}({', '.join(parts + ([extra] if extra else []))})"


class Stack(Composition):
    """The children one after another at every site (AdapterHub's ``Stack``)."""


class Parallel(Composition):
    """Each child on its own copy of the batch: batch B in, ``len(children) * B`` out, copy i
    (rows ``i*B`` to ``(i+1)*B``) running child i (AdapterHub's ``Parallel``)."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Average(Composition):
    """The weighted mean of the children's outputs, ``(1/n) * sum_i w_i * out_i``, as AdapterHub's
    ``Average`` computes it. ``weights`` default to 1/n each; given weights are divided by their sum
    unless ``normalize_weights=False``."""

    def __init__(self, *children: str | Composition | Sequence[Any], weights: Sequence[float] | None = None,
                 normalize_weights: bool = True) -> None:
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            values = [1.0 / n] * n
        else:
            values = list(weights)
            if len(values) != n or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                           and math.isfinite(w) for w in values):
                raise ValueError(f"adapter_fused: Average of {n} adapters needs {n} finite weights, got {weights!r}")
            if normalize_weights:
                total = sum(values)
                if total == 0:
                    raise ValueError(f"adapter_fused: Average weights {weights!r} sum to 0 and cannot be normalized")
                values = [w / total for w in values]
        self.weights: tuple[float, ...] = tuple(float(w) for w in values)

    def _options(self) -> tuple[Any, ...]:
        return self.weights

    def _extra_repr(self) -> str:
        return f"weights={list(self.weights)}"


class BatchSplit(Composition):
    """Consecutive slices of the batch, ``batch_sizes[i]`` rows each, through child i
    (AdapterHub's ``BatchSplit``); an int gives every child that many rows."""

    def __init__(self, *children: str | Composition | Sequence[Any], batch_sizes: int | Sequence[int]) -> None:
        super().__init__(*children)
        n = len(self.children)
        sizes = [batch_sizes] * n if isinstance(batch_sizes, int) else list(batch_sizes)
        if len(sizes) != n or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in sizes):
            raise ValueError(f"adapter_fused: BatchSplit of {n} adapters needs {n} non-negative batch sizes, "
                             f"got {batch_sizes!r}")
        self.batch_sizes: tuple[int, ...] = tuple(sizes)

    def _options(self) -> tuple[Any, ...]:
        return self.batch_sizes

    def _extra_repr(self) -> str:
        return f"batch_sizes={list(self.batch_sizes)}"


# What AdapterHub lets each block hold (bottleneck adapters; Fuse, Split and MultiTask are not offered here).
_ALLOWED: dict[type, tuple[type, ...]] = {
    Stack: (str, Parallel, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, BatchSplit, Average),
    Average: (str, Stack, BatchSplit),
}


def _child(child: object, parent: str) -> str | Composition:
    if isinstance(child, str):
        if not child:
            raise ValueError(f"adapter_fused: {parent}() got an empty adapter name")
        return child
    if isinstance(child, Composition):
        return child
    converted = _from_adapterhub(child)
    if converted is not None:
        return converted
    if isinstance(child, (list, tuple)):
        return Stack(*child)
    raise TypeError(f"adapter_fused: {parent}() takes adapter names and composition blocks, got "
                    f"{type(child).__name__}")


def _from_adapterhub(block: object) -> Composition | None:
    """Our block equal to an ``adapters.composition`` block; None for anything else; ValueError for
    the AdapterHub blocks the fused adapters do not offer."""
    if not type(block).__module__.startswith("adapters.") or not isinstance(getattr(block, "children", None), list):
        return None
    kind = type(block).__name__
    children = block.children  # type: ignore[attr-defined]
    if kind == "Stack":
        return Stack(*children)
    if kind == "Parallel":
        return Parallel(*children)
    if kind == "Average":  # AdapterHub normalized the weights when the block was made
        return Average(*children, weights=list(block.weights), normalize_weights=False)  # type: ignore[attr-defined]
    if kind == "BatchSplit":
        return BatchSplit(*children, batch_sizes=list(block.batch_sizes))  # type: ignore[attr-defined]
    raise ValueError(f"adapter_fused: the composition {block!r} is not supported: {kind} blocks do not run on the "
                     f"fused adapters (supported: Stack, Parallel, Average, BatchSplit)")


def parse_setup(setup: object) -> str | Composition | None:
    """What ``set_active_adapters`` was given, as None, one adapter name or a checked composition.

    A list or tuple of names is a Stack (as in AdapterHub); a Stack of one name is that adapter.
    Raises ValueError naming the composition for blocks or nestings that are not supported."""
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, (list, tuple)) and not setup:
        raise ValueError("adapter_fused: set_active_adapters got an empty list; pass an adapter name, a "
                         "composition, or None to run no adapter")
    if isinstance(setup, (list, tuple)):
        setup = Stack(*setup)
    converted = _from_adapterhub(setup)
    if converted is not None:
        setup = converted
    if not isinstance(setup, Composition):
        raise TypeError(f"adapter_fused: set_active_adapters expects an adapter name, a composition (Stack, "
                        f"Parallel, Average, BatchSplit), a list of names or None, got {type(setup).__name__}")
    _check_nesting(setup, setup, 0)
    parallels = _count(setup, Parallel)
    if parallels > 1:
        raise ValueError(f"adapter_fused: composition {setup!r} holds {parallels} Parallel blocks; one is supported")
    if type(setup) is Stack and len(setup.children) == 1 and isinstance(setup.children[0], str):
        return setup.children[0]
    return setup


def _check_nesting(block: Composition, root: Composition, level: int) -> None:
    for child in block.children:
        if not isinstance(child, _ALLOWED[type(block)]):
            raise ValueError(f"adapter_fused: composition {root!r}: {type(child).__name__} cannot be nested in "  # noqa: TRY004
                             f"{type(block).__name__} (it holds {', '.join(t.__name__ for t in _ALLOWED[type(block)])})")
        if isinstance(child, Composition):
            if level + 1 > 1 and not isinstance(child, Stack) or isinstance(block, Stack) and level >= 1:
                raise ValueError(f"adapter_fused: composition {root!r} is nested too deeply: {child!r} at level "
                                 f"{level + 1} (below the first level only Stacks of adapter names are allowed)")
            _check_nesting(child, root, level + 1)


def _count(block: Composition, kind: type) -> int:
    return int(isinstance(block, kind)) + sum(_count(c, kind) for c in block.children if isinstance(c, Composition))


def active_names(active: object) -> list[str]:
    """The adapter names an active setup (None, a name or a composition) runs."""
    if active is None:
        return []
    return [active] if isinstance(active, str) else active.flatten()  # type: ignore[union-attr]


def _behaviour(placement: Placement) -> Placement:
    """The part of a placement that decides what an adapter reads and adds (not where it sits)."""
    return dataclasses.replace(placement, attention=True, ffn=True)


RAW = Placement(attention=True, ffn=True, parallel=True)
"""The placement ``_Site`` hands a composition with: ``site_forward`` then calls it as
``site(x, residual=h)`` with the block residual x and the sub-block output h, untouched."""


class CompositionSite:
    """A composition at one site of one layer, called as ``site(x, residual=h)`` -> h' (see ``RAW``);
    reads the adapters of ``modules`` (``{name: {layer: {site: module}}}``) at call time."""

    def __init__(self, setup: Composition, modules: nn.ModuleDict, configs: dict[str, AdapterConfig], layer: str,
                 site: str, norm: nn.Module | None) -> None:
        self.setup = setup
        self.modules = modules
        self.configs = configs
        self.layer = layer
        self.site = site
        self.norm = norm

    def module(self, name: str) -> nn.Module | None:
        """Adapter ``name`` at this site, or None where it has none."""
        if name not in self.modules:
            raise KeyError(f"adapter_fused: composition {self.setup!r} names adapter {name!r}, which this model "
                           "no longer has")
        layers = self.modules[name]
        block = layers[self.layer] if self.layer in layers else None  # type: ignore[operator,index]  # noqa: SIM401
        return block[self.site] if block is not None and self.site in block else None  # type: ignore[operator,index]

    def present(self, node: str | Composition) -> bool:
        """Whether any adapter of ``node`` has a module at this site."""
        names = [node] if isinstance(node, str) else node.flatten()
        return any(self.module(n) is not None for n in names)

    def placement(self, name: str) -> Placement:
        return _behaviour(self.configs[name].layout)

    def check(self) -> bool:
        """Whether the composition has adapters here (False: the site runs as without adapters);
        ValueError for placements or gaps that cannot be composed."""
        names = [n for n in self.setup.flatten() if self.module(n) is not None]
        if not names:
            return False
        for name in names:
            p = self.placement(name)
            known = Placement(attention=True, ffn=True, original_ln_before=p.original_ln_before,
                              residual_before_ln=p.residual_before_ln, parallel=p.parallel)
            if p != known:
                raise ValueError(f"adapter_fused: composition {self.setup!r}: the placement of adapter {name!r} "
                                 f"({self.configs[name].layout}) has options compositions do not run")
        kinds = {self.placement(n).parallel for n in names}
        if len(kinds) > 1:
            raise ValueError(f"adapter_fused: composition {self.setup!r} mixes parallel-placement and sequential "
                             f"adapters at layer {self.layer} {self.site}; they cannot be composed")
        self._check_node(self.setup, kinds.pop())
        return True

    def _check_node(self, node: Composition, parallel: bool) -> None:
        where = f"at layer {self.layer} {self.site}"
        if not isinstance(node, Stack):
            names = [n for n in node.flatten() if self.module(n) is not None]
            if len({self.placement(n) for n in names}) > 1:
                raise ValueError(f"adapter_fused: the adapters of {node!r} differ in placement {where} "
                                 f"({', '.join(names)}); {type(node).__name__} needs one placement")
        if isinstance(node, Average):
            flags = [self.present(c) for c in node.children]
            if any(flags) and not all(flags):
                missing = [repr(c) for c, f in zip(node.children, flags) if not f]
                raise ValueError(f"adapter_fused: {node!r} cannot average {where}: {', '.join(missing)} "
                                 "has no adapter there while the others have")
        if isinstance(node, Stack) and parallel and sum(self.present(c) for c in node.children) > 1:
            raise ValueError(f"adapter_fused: {node!r} stacks several parallel-placement adapters {where}; "
                             "each reads the block input, so only the last one's output would count")
        for child in node.children:
            if isinstance(child, Composition):
                self._check_node(child, parallel)

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
                    hidden = self._sequential(child, hidden, x)
            return hidden
        if not self.present(node):
            return hidden
        z, residual = self._pre(self._common(node), hidden, x)
        if isinstance(node, Average):
            n = len(node.children)
            fused = self._fusable(node)
            if fused is not None:
                c = sum(node.weights) / n
                r = residual if c == 1.0 else residual * c
                return _averaged(fused, [w / n for w in node.weights], z, None if r is z else r)
            out = None
            for child, w in zip(node.children, node.weights):
                y = self._run(child, z, residual) if isinstance(child, str) else self._sequential(child, z, x)
                out = y * (w / n) if out is None else out + y * (w / n)
            assert out is not None
            return out
        sizes = _row_sizes(node, hidden.shape[0])
        fused = self._fusable(node)
        if fused is not None and (residual is hidden or all(m is not None for _, m in fused)):
            return _grouped(fused, sizes, z, None if residual is z else residual)
        pieces, start = [], 0
        for child, size in zip(node.children, sizes):
            rows = slice(start, start + size)
            start += size
            if not self.present(child):
                pieces.append(hidden[rows])
            elif isinstance(child, str):
                pieces.append(self._run(child, z[rows], residual[rows]))
            else:
                pieces.append(self._sequential(child, z[rows], x[rows]))
        return torch.cat(pieces, dim=0)

    # -- parallel placement: h' = h + the composed adapter outputs on x --

    def _parallel(self, node: str | Composition, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base`` plus what ``node`` adds at this site, reading ``x``."""
        if isinstance(node, str):
            return self._run(node, x, base) if self.module(node) is not None else base
        if isinstance(node, Stack):
            child = next((c for c in node.children if self.present(c)), None)
            return base if child is None else self._parallel(child, x, base)
        if not self.present(node):
            return base
        fused = self._fusable(node)
        if isinstance(node, Average):
            n = len(node.children)
            if fused is not None:
                return _averaged(fused, [w / n for w in node.weights], x, base)
            out = base * (1.0 - sum(node.weights) / n)
            for child, w in zip(node.children, node.weights):
                out = out + self._parallel(child, x, base) * (w / n)
            return out
        sizes = _row_sizes(node, x.shape[0])
        if fused is not None:
            return _grouped(fused, sizes, x, base)
        pieces, start = [], 0
        for child, size in zip(node.children, sizes):
            rows = slice(start, start + size)
            start += size
            pieces.append(self._parallel(child, x[rows], base[rows]))
        return torch.cat(pieces, dim=0)

    def _fusable(self, node: Composition) -> list[tuple[str, FusedAdapter | None]] | None:
        """Per child, its name and module here (None where absent) when every child is an adapter
        name and those present are plain FusedAdapters sharing an activation and width d (one
        launch runs them all); else None."""
        if not all(isinstance(c, str) for c in node.children):
            return None
        found: list[tuple[str, FusedAdapter | None]] = []
        for name in node.children:
            module = self.module(name)  # type: ignore[arg-type]
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


def _params(module: FusedAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return module.down.weight, module.down.bias, module.up.weight, module.up.bias


def _averaged(adapters: list[tuple[str, FusedAdapter | None]], coefs: list[float], z: torch.Tensor,
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


def _grouped(adapters: list[tuple[str, FusedAdapter | None]], sizes: list[int], z: torch.Tensor,
             residual: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``z`` through the children (consecutive slices of ``sizes`` rows) in one grouped
    launch; each adapter's scale folded into its up-projection, narrower adapters padded with zero
    rows and columns (which add nothing), rows of absent children left as their residual."""
    bank: dict[str, FusedAdapter] = {}
    for name, module in adapters:
        if module is not None:
            bank.setdefault(name, module)
    names = list(bank)
    width = max(m.bottleneck for m in bank.values())
    stacks: list[list[torch.Tensor]] = [[], [], [], []]
    for module in bank.values():
        dw, db, uw, ub = _params(module)
        pad, s = width - module.bottleneck, module.scale
        for bucket, tensor in zip(stacks, (F.pad(dw, (0, 0, 0, pad)), F.pad(db, (0, pad)), F.pad(uw * s, (0, pad)),
                                           ub * s)):
            bucket.append(tensor)
    index = [names.index(name) if module is not None else -1
             for (name, module), size in zip(adapters, sizes) for _ in range(size)]
    rows = torch.tensor(index, dtype=torch.long, device=z.device)
    return fused_adapter_grouped(z, rows, *(torch.stack(b) for b in stacks), next(iter(bank.values())).activation,
                                 1.0, check_index=False, residual=residual)


# -- Parallel: the batch replicated at the base model's input --

BATCH_FIRST = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids",
               "encoder_hidden_states", "encoder_attention_mask", "decoder_input_ids", "decoder_inputs_embeds",
               "decoder_attention_mask", "decoder_position_ids", "input_features", "pixel_values")
"""Base-model inputs repeated for ``Parallel`` (those whose first dimension is the batch size)."""
_LEADS = ("input_ids", "inputs_embeds", "input_features", "pixel_values", "decoder_input_ids")
"""The inputs whose first dimension gives the batch size, in the order they are looked for."""


class ReplicateInputs:
    """Forward pre-hook (with kwargs) of the base model: while a composition with a Parallel block
    of n children is active, repeat the batch-first inputs n times (copy-major, as AdapterHub
    repeats the hidden states), so every layer sees the n*B rows the Parallel block splits."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = self.state
        active = state.active
        if not isinstance(active, Composition) or active.parallel_channels == 1 or state.call.batch is not None:
            return None
        n = active.parallel_channels
        if getattr(module, "_is_replica", False):
            raise RuntimeError(f"adapter_fused: {active!r} replicates the batch inside the model, which "
                               "nn.DataParallel replicas cannot do; call the model itself")
        names = list(inspect.signature(module.forward).parameters)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        cache = bound.get("past_key_values")
        if cache is not None and (cache.get_seq_length() > 0 if hasattr(cache, "get_seq_length") else len(cache) > 0):
            raise ValueError(f"adapter_fused: {active!r} replicates the batch at the model's input and cannot "
                             "continue from a filled key/value cache; run it without one")
        lead = next((bound[k] for k in _LEADS if isinstance(bound.get(k), torch.Tensor)), None)
        if lead is None:
            raise ValueError(f"adapter_fused: {active!r} needs one of {', '.join(_LEADS)} to replicate the batch")
        batch = lead.shape[0]

        def repeat(name: str, value: Any) -> Any:
            if name in BATCH_FIRST and isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                return value.repeat(n, *([1] * (value.dim() - 1)))
            return value

        new_args = tuple(repeat(name, value) for name, value in zip(names, args))
        new_kwargs = {name: repeat(name, value) for name, value in kwargs.items()}
        return new_args, new_kwargs


def install_replication(state: Any) -> None:
    """Register ``ReplicateInputs`` on the base model once (its handle joins the state's hooks)."""
    if state.__dict__.get("replicates_inputs"):
        return
    state.handles.append(state.base.register_forward_pre_hook(ReplicateInputs(state), with_kwargs=True))
    state.replicates_inputs = True


def composition_site(setup: Composition, modules: nn.ModuleDict, configs: dict[str, AdapterConfig], layer: str,
                     site: str, norm: nn.Module | None) -> CompositionSite | None:
    """What runs ``setup`` at one site (called with the ``RAW`` placement), or None where none of
    its adapters has a module there."""
    found = CompositionSite(setup, modules, configs, layer, site, norm)
    return found if found.check() else None


def check_setup(setup: Composition, modules: nn.ModuleDict, configs: dict[str, AdapterConfig], layers: int,
                sites: Sequence[str]) -> None:
    """ValueError, before anything changes, if ``setup`` cannot run at some site of the model."""
    for layer in range(layers):
        for site in sites:
            CompositionSite(setup, modules, configs, str(layer), site, None).check()
