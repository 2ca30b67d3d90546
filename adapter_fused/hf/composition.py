"""Several adapters at once, with AdapterHub's composition semantics: ``Stack``, ``Parallel``,
``Average``, ``BatchSplit``, ``Split``, ``MultiTask`` and ``Fuse``.

    set_active_adapters(model, Stack("lang", "task"))                 # MAD-X: task on top of language
    set_active_adapters(model, Stack("lang", Average("t1", "t2", weights=[0.7, 0.3])))
    set_active_adapters(model, Parallel("a", "b"))                    # batch B in, batch 2B out
    set_active_adapters(model, BatchSplit("a", None, batch_sizes=[3, 5]))   # None: the base model
    set_active_adapters(model, Split("a", "b", splits=[4, 12]))       # positions 0-3 and 4-15
    set_active_adapters(model, MultiTask("a", "b"))                   # model(..., task_ids=[1, 0, ...])
    set_active_adapters(model, Fuse("a", "b"))                        # after add_adapter_fusion (``fusion``)

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
  rows ``b1 + ... + b(i-1)`` onwards (``bi`` of them) run child i. ``MultiTask(c1, ...)``: the rows
  whose task id (given with the call) is i run child i. ``Split(c1, ..., splits=[s1, ...])``: the
  positions ``s1 + ... + s(i-1)`` onwards (``si`` of them) run child i. Each takes one
  ``fused_adapter_grouped`` launch per site when its children are adapters sharing an activation.
- ``Fuse(c1, ...)``: the children's outputs combined by a fusion layer (AdapterFusion, see ``fusion``).

What each block computes at a site is ``compose``'s. Adapters under one block other than Stack must
share their placement at each site. With parallel-placement adapters (``"parallel"``) the adapter
outputs are added to ``h``: a Stack may then hold only one of them per site (AdapterHub keeps only the
last one's output). Nesting follows AdapterHub's rules; a child that reruns the placement's input step
(a Stack, Average, BatchSplit or Split under another block) rereads it from its parent's adapter
input, as AdapterHub does. A None child of Parallel or BatchSplit (the base model), or a child with no
adapter at a site, leaves its rows unchanged there.

This module holds the blocks, the parsing of what ``set_active_adapters`` is given (``parse_setup``)
and the checks a setup passes before it runs (``SetupAtSite``, ``check_setup``); ``compose.CompositionSite``
runs a setup at a site.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .adapterhub.convert import block_from_adapterhub
from .config import AdapterConfig, Placement

FUSION_KEY = "fusion"
"""The entry of a model's ``fused_adapters`` that holds its fusion layers (``{fusion name: {layer:
{site: fusion layer}}}``, see ``fusion``); no adapter may take this name."""


class Composition:
    """Base of the composition blocks: an ordered tuple of children (adapter names or blocks; None,
    the base model, where the block allows it)."""

    allows_none = False

    def __init__(self, *children: str | Composition | Sequence[Any] | None) -> None:
        kind = type(self).__name__
        if not children:
            raise ValueError(f"adapter_fused: {kind}() needs at least one adapter")
        self.children: tuple[str | Composition | None, ...] = tuple(_child(c, kind, self.allows_none)
                                                                    for c in children)
        if all(c is None for c in self.children):
            raise ValueError(f"adapter_fused: {kind}() needs at least one adapter besides None (the base model)")

    def flatten(self) -> list[str]:
        """The adapter names in the block, each once, in order of appearance."""
        names: list[str] = []
        for child in self.children:
            for name in [] if child is None else [child] if isinstance(child, str) else child.flatten():
                if name not in names:
                    names.append(name)
        return names

    def first(self) -> str:
        """The first adapter name (depth first)."""
        child = next(c for c in self.children if c is not None)
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        """The last adapter name (depth first, from the end)."""
        child = next(c for c in reversed(self.children) if c is not None)
        return child if isinstance(child, str) else child.last()

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
    (rows ``i*B`` to ``(i+1)*B``) running child i (AdapterHub's ``Parallel``); a None child's copy
    runs the base model."""

    allows_none = True

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


class _Slices(Composition):
    """A block whose children take consecutive slices of one dimension; the attribute (and keyword)
    ``option`` holds their sizes."""

    option = ""

    def _set_sizes(self, given: int | Sequence[int]) -> None:
        n, kind, what = len(self.children), type(self).__name__, self.option.replace("_", " ")
        sizes = [given] * n if isinstance(given, int) and not isinstance(given, bool) else list(given)  # type: ignore[arg-type]
        if len(sizes) != n or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in sizes):
            raise ValueError(f"adapter_fused: {kind} of {n} adapters needs {n} non-negative {what}, got {given!r}")
        setattr(self, self.option, tuple(sizes))

    def _options(self) -> tuple[Any, ...]:
        return getattr(self, self.option)  # type: ignore[no-any-return]

    def _extra_repr(self) -> str:
        return f"{self.option}={list(self._options())}"


class BatchSplit(_Slices):
    """Consecutive slices of the batch, ``batch_sizes[i]`` rows each, through child i
    (AdapterHub's ``BatchSplit``); an int gives every child that many rows. A None child's rows run
    the base model."""

    allows_none = True
    option = "batch_sizes"
    batch_sizes: tuple[int, ...]

    def __init__(self, *children: str | Composition | Sequence[Any] | None, batch_sizes: int | Sequence[int]) -> None:
        super().__init__(*children)
        self._set_sizes(batch_sizes)


class Split(_Slices):
    """Consecutive slices of the sequence, ``splits[i]`` positions each (along dim 1 of the hidden
    states), through child i (AdapterHub's ``Split``); an int gives every child that many positions.
    The splits must add up to the sequence length at every site."""

    option = "splits"
    splits: tuple[int, ...]

    def __init__(self, *children: str | Composition | Sequence[Any], splits: int | Sequence[int]) -> None:
        super().__init__(*children)
        self._set_sizes(splits)


class MultiTask(Composition):
    """Each sample through the child its task id names (AdapterHub's ``MultiTask``): the model is
    called with ``task_ids=`` (a (batch,) integer tensor of child positions, or a list of the
    children's names), given to a model with the methods (``init``, ``AutoAdapterModel``)."""


class Fuse(Composition):
    """AdapterFusion (AdapterHub's ``Fuse``): the children (adapters, or Stacks of them) read the
    same input, and a fusion layer added with ``add_adapter_fusion`` combines their outputs by
    attention (see ``fusion``). ``name`` names that fusion layer; it defaults to the children's
    (last) adapter names joined by commas, as in AdapterHub."""

    def __init__(self, *children: str | Composition | Sequence[Any], name: str | None = None) -> None:
        super().__init__(*children)
        if name is not None and (not isinstance(name, str) or not name or "." in name):
            raise ValueError(f"adapter_fused: Fuse name must be a non-empty string without dots, got {name!r}")
        self.fusion_name = name

    @property
    def name(self) -> str:
        """The name of the fusion layer this block runs."""
        if self.fusion_name is not None:
            return self.fusion_name
        return ",".join(c if isinstance(c, str) else c.last() for c in self.children)  # type: ignore[union-attr]

    def _options(self) -> tuple[Any, ...]:
        return (self.name,)

    def _extra_repr(self) -> str:
        return "" if self.fusion_name is None else f"name={self.fusion_name!r}"


# What AdapterHub lets each block hold (None: the base model, where this package allows it).
_NONE = type(None)
_ALLOWED: dict[type, tuple[type, ...]] = {
    Stack: (str, Fuse, Split, Parallel, BatchSplit, Average, MultiTask),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average, _NONE),
    MultiTask: (str, Stack, Average, Fuse),
    BatchSplit: (str, Stack, Split, BatchSplit, Average, _NONE),
    Average: (str, Stack, Split, BatchSplit),
}


BLOCKS: dict[str, type[Composition]] = {cls.__name__: cls for cls in _ALLOWED}
"""The composition blocks by name."""


def _child(child: object, parent: str, allows_none: bool) -> str | Composition | None:
    if child is None and allows_none:
        return None
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
    none = ", or None for the base model" if allows_none else ""
    raise TypeError(f"adapter_fused: {parent}() takes adapter names and composition blocks{none}, got "
                    f"{type(child).__name__}")


def _from_adapterhub(block: object) -> Composition | None:
    """Our block equal to an ``adapters.composition`` block (see ``adapterhub.convert.block_from_adapterhub``);
    None for anything else."""
    found = block_from_adapterhub(block)
    if found is None:
        return None
    kind, children, options = found
    return BLOCKS[kind](*children, **options)


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
        raise TypeError(f"adapter_fused: set_active_adapters expects an adapter name, a composition ("
                        f"{', '.join(BLOCKS)}), a list of names or None, got {type(setup).__name__}")
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
            held = ", ".join("None" if t is _NONE else t.__name__ for t in _ALLOWED[type(block)])
            raise ValueError(f"adapter_fused: composition {root!r}: {type(child).__name__} cannot be nested in "  # noqa: TRY004
                             f"{type(block).__name__} (it holds {held})")
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


class SetupAtSite:
    """A composition at one site of one layer: which of its adapters have a module there (read from
    ``modules``, ``{name: {layer: {site: module}}}``, at call time), their placements, and whether the
    composition can run there (``check``). ``norm`` is the site's layer norm, for running it
    (``sites.CompositionSite``); None when only checking."""

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

    def present(self, node: str | Composition | None) -> bool:
        """Whether any adapter of ``node`` has a module at this site (None, the base model: False)."""
        if node is None:
            return False
        names = [node] if isinstance(node, str) else node.flatten()
        return any(self.module(n) is not None for n in names)

    def fusion(self, node: Fuse) -> nn.Module | None:
        """The fusion layer ``node`` runs at this site, or None where it has none."""
        fusions = self.modules[FUSION_KEY] if FUSION_KEY in self.modules else None  # noqa: SIM401 - a ModuleDict
        block = fusions[node.name] if fusions is not None and node.name in fusions else None  # type: ignore[operator,index]
        layer = block[self.layer] if block is not None and self.layer in block else None  # type: ignore[operator,index]
        return layer[self.site] if layer is not None and self.site in layer else None  # type: ignore[operator,index]

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
        if isinstance(node, Fuse) and self.present(node) and self.fusion(node) is None:
            raise ValueError(f"adapter_fused: {node!r} has no fusion layer named {node.name!r} {where}; add it with "
                             f"add_adapter_fusion (or load_adapter_fusion) first")
        if isinstance(node, Stack) and parallel and sum(self.present(c) for c in node.children) > 1:
            raise ValueError(f"adapter_fused: {node!r} stacks several parallel-placement adapters {where}; "
                             "each reads the block input, so only the last one's output would count")
        for child in node.children:
            if isinstance(child, Composition):
                self._check_node(child, parallel)


def check_setup(setup: Composition, modules: nn.ModuleDict, configs: dict[str, AdapterConfig], layers: int,
                sites: Sequence[str]) -> None:
    """ValueError, before anything changes, if ``setup`` cannot run at some site of the model."""
    for layer in range(layers):
        for site in sites:
            SetupAtSite(setup, modules, configs, str(layer), site, None).check()
