"""Many adapters in one batch: the grouped kernel (``fused_adapter_grouped``) against the ways a mixed-task
batch is served without it, all timed by the shared harness (``harness.measure``, ``harness.peak_memory``,
``harness.make_record``).

Providers, on the same rows, inputs and adapter weights:

- ``single``: one adapter on all rows (``fused_adapter``): the cost a mixed batch is judged against.
- ``grouped``: ``fused_adapter_grouped`` with the mixed index, one launch in the forward.
- ``separate``: the tasks as separate batches, one ``fused_adapter`` call per adapter on its own rows
  (each adapter's rows handed over already split into their own tensors, as separate batches arrive).
- ``eager_loop``: the eager reference looping over adapters (``reference_adapter_grouped``).
- ``adapterhub_batchsplit``: AdapterHub's bottleneck layer holding the n adapters, run with the
  ``BatchSplit`` composition on a batch ordered by adapter. BatchSplit assigns whole sequences, so it is
  recorded as skipped for a per-token index (and when the ``adapters`` library is missing).

The index gives every adapter an equal share of the rows (sequences, or tokens), shuffled with a fixed
seed. It is checked once before timing; the timed grouped call passes ``check_index=False`` (no device
sync), as a server that builds the index itself would. Ops: ``forward`` (inference, no autograd) and
``forward_backward`` (gradients of x and of every adapter's parameters). ``ratio_to_single`` is a
record's median time over the ``single`` median of the same op and shape. Minimal bytes count x, y
(and the backward traffic) once and the parameters of every adapter that has rows.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapter_fused import fused_adapter, fused_adapter_grouped
from adapter_fused.grouped import check_index_values
from adapter_fused.reference import reference_adapter_grouped

from .harness import (
    DTYPES,
    GRAPH_MAX_ROWS,
    Case,
    EagerAdapter,
    RankSpec,
    Skip,
    Timing,
    TimingSettings,
    _reset_grads,
    _short,
    adapterhub_available,
    make_adapter,
    make_record,
    measure,
    minimal_bytes,
    peak_memory,
    provider_unavailable,
    resolve_rank,
)

GROUPED_PROVIDERS: tuple[str, ...] = ("single", "grouped", "separate", "eager_loop", "adapterhub_batchsplit")
GROUPED_OPS: tuple[str, ...] = ("forward", "forward_backward")
INDEX_KINDS: tuple[str, ...] = ("sequence", "token")
GROUPED_RECORD_KEYS: tuple[str, ...] = (
    "op", "provider", "dtype", "M", "batch", "seq", "d", "r", "n_adapters", "adapters_used", "index",
    "ms_median", "ms_p20", "ms_p80", "ratio_to_single", "gbps", "pct_of_copy_bw", "peak_mem_bytes", "skipped",
)
TARGET_ADAPTERS = 8
TARGET_RATIO = 1.15
"""The GPU goal: a batch mixing ``TARGET_ADAPTERS`` adapters costs at most ``TARGET_RATIO`` × one adapter."""


@dataclass(frozen=True)
class GroupedSpec:
    """A grid of mixed-task batches: every (sequences, tokens per sequence) batch, width d, rank r and
    dtype, each with every adapter count and index kind."""

    batches: tuple[tuple[int, int], ...]
    d: tuple[int, ...]
    r: tuple[RankSpec, ...]
    dtypes: tuple[str, ...]
    n_adapters: tuple[int, ...]
    index_kinds: tuple[str, ...] = INDEX_KINDS


FULL_GROUPED = GroupedSpec(batches=((32, 1), (64, 128)), d=(1024, 4096), r=(64,), dtypes=("bfloat16",),
                           n_adapters=(1, 2, 8, 32))
QUICK_GROUPED = GroupedSpec(batches=((64, 128),), d=(4096,), r=(64,), dtypes=("bfloat16",), n_adapters=(1, 2, 8, 32))
SMOKE_GROUPED = GroupedSpec(batches=((4, 4),), d=(64,), r=(16,), dtypes=("float32",), n_adapters=(1, 2))


@dataclass(frozen=True)
class GroupedCase:
    """One mixed-task batch shape: x is (batch, seq, d), the bottleneck r, everything in ``dtype``."""

    batch: int
    seq: int
    d: int
    r: int
    dtype: torch.dtype

    @property
    def M(self) -> int:
        """Rows (tokens) in the batch."""
        return self.batch * self.seq

    @property
    def dtype_name(self) -> str:
        """The dtype spelled as in the results file (``bfloat16``)."""
        return str(self.dtype).removeprefix("torch.")

    def kernel_case(self) -> Case:
        """The same rows as a flat kernel ``Case`` (M = batch · seq)."""
        return Case(M=self.M, d=self.d, r=self.r, dtype=self.dtype)

    def __str__(self) -> str:
        return f"B={self.batch} S={self.seq} d={self.d} r={self.r} {self.dtype_name}"


def parse_batch(text: str) -> tuple[int, int]:
    """``"64x128"`` -> (64 sequences, 128 tokens each)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"batch {text!r}: expected SEQUENCESxTOKENS, e.g. 64x128")
    return int(parts[0]), int(parts[1])


def expand_grouped(spec: GroupedSpec) -> list[GroupedCase]:
    """Every batch shape of ``spec`` (adapter counts and index kinds are run inside each), in a stable order."""
    cases: list[GroupedCase] = []
    for dtype_name in spec.dtypes:
        if dtype_name not in DTYPES:
            raise ValueError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
        for d in spec.d:
            for r in sorted({resolve_rank(r, d) for r in spec.r}):
                for batch, seq in spec.batches:
                    cases.append(GroupedCase(batch=batch, seq=seq, d=d, r=r, dtype=DTYPES[dtype_name]))
    return cases


def grouped_steps(spec: GroupedSpec, providers: Sequence[str]) -> int:
    """Provider runs (progress steps) of ``spec``: ``single`` once per shape, the others per adapter
    count and index kind."""
    mixed = len([p for p in providers if p != "single"]) * len(spec.n_adapters) * len(spec.index_kinds)
    return len(expand_grouped(spec)) * (int("single" in providers) + mixed)


def grouped_minimal_bytes(op: str, M: int, d: int, r: int, n_used: int, elt: int) -> int:
    """``harness.minimal_bytes`` of ``op`` with the parameter traffic counted once per adapter in use
    (the index, 8 bytes or less per row, is not counted)."""
    rows_only = minimal_bytes(op, M, d, r, elt, weight_elt=0)
    per_adapter = minimal_bytes(op, 0, d, r, elt, weight_elt=elt)
    return rows_only + n_used * per_adapter


# ---------------------------------------------------------------- inputs


def make_index(kind: str, batch: int, seq: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """An index giving each of ``n`` adapters an equal share (±1) of the sequences (``kind="sequence"``,
    shape (batch,)) or tokens (``"token"``, shape (batch, seq)), shuffled with ``seed``."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    units = batch if kind == "sequence" else batch * seq
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = (torch.arange(units) % n)[torch.randperm(units, generator=gen)]
    return values.reshape((batch,) if kind == "sequence" else (batch, seq)).to(device)


@dataclass
class GroupedInputs:
    """The tensors of one mixed batch: x (batch, seq, d), its leaf copy that requires grad, the upstream
    gradient, the index, and the row layout by adapter (``order``: the units sorted by adapter, stably;
    ``counts``: units per adapter)."""

    x: torch.Tensor
    x_train: torch.Tensor
    grad: torch.Tensor
    index: torch.Tensor
    kind: str
    order: torch.Tensor
    counts: list[int]

    def by_adapter(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (batch, seq, d) with its units ordered by adapter: (batch, seq, d) per sequence,
        (batch · seq, d) per token."""
        if self.kind == "sequence":
            return t[self.order]
        return t.reshape(-1, t.shape[-1])[self.order]


def make_grouped_inputs(case: GroupedCase, kind: str, n: int, device: torch.device, seed: int = 0) -> GroupedInputs:
    """Random inputs for ``case`` with an ``n``-adapter index of ``kind`` (fixed seeds)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(case.batch, case.seq, case.d, generator=gen).to(device=device, dtype=case.dtype)
    grad = torch.randn(case.batch, case.seq, case.d, generator=gen).to(device=device, dtype=case.dtype)
    index = make_index(kind, case.batch, case.seq, n, device, seed)
    flat = index.reshape(-1).cpu()
    order = torch.argsort(flat, stable=True).to(device)
    counts = torch.bincount(flat, minlength=n).tolist()
    return GroupedInputs(x=x, x_train=x.detach().clone().requires_grad_(True), grad=grad, index=index, kind=kind,
                         order=order, counts=counts)


def make_bank(n: int, d: int, r: int, activation: str, scale: float, seed: int = 0) -> list[EagerAdapter]:
    """``n`` adapters with random weights drawn like every other benchmark's (``harness.make_adapter``)."""
    torch.manual_seed(seed)
    bank: list[EagerAdapter] = []
    for _ in range(n):
        adapter = make_adapter("eager", d, r, activation, scale)
        assert isinstance(adapter, EagerAdapter)
        bank.append(adapter)
    return bank


def _leaf(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)


Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(down weight, down bias, up weight, up bias), one adapter's or stacked over adapters."""


def _params(adapter: EagerAdapter, device: torch.device, dtype: torch.dtype) -> Params:
    """Leaf copies of one adapter's (down weight, down bias, up weight, up bias)."""
    return (_leaf(adapter.down.weight, device, dtype), _leaf(adapter.down.bias, device, dtype),
            _leaf(adapter.up.weight, device, dtype), _leaf(adapter.up.bias, device, dtype))


def _stacked(bank: Sequence[EagerAdapter], device: torch.device, dtype: torch.dtype) -> Params:
    """Leaf stacks (n, r, d), (n, r), (n, d, r), (n, d) of the bank's parameters."""
    parts = [_params(a, device, dtype) for a in bank]
    dw, db, uw, ub = (_leaf(torch.stack([p[i] for p in parts]), device, dtype) for i in range(4))
    return dw, db, uw, ub


# ---------------------------------------------------------------- providers


@dataclass
class GroupedWork:
    """What one provider computes: ``forward(train)`` returns its outputs (on ``x_train``-like leaves when
    ``train``), ``grads`` the upstream gradients matching them, ``leaves`` every tensor whose ``.grad`` is
    reset between calls."""

    forward: Callable[[bool], list[torch.Tensor]]
    grads: list[torch.Tensor]
    leaves: list[torch.Tensor]


class BatchSplitLayer(nn.Module):
    """AdapterHub's bottleneck layer (``adapters.methods.bottleneck.BottleneckLayer``) holding adapters
    ``a0 … a{n-1}``, set up from its own config classes and run with the ``BatchSplit`` composition.

    The adapters are sequential bottlenecks with the transformer's layer norms switched off
    (``original_ln_before``/``original_ln_after`` False) and the residual taken from the layer input, so
    ``layer(x)`` computes ``x + scale · up(act(down(x)))`` per adapter, the same math as the other providers.
    """

    def __init__(self, bank: Sequence[EagerAdapter], batch_sizes: Sequence[int]) -> None:
        super().__init__()
        from adapters import BatchSplit, SeqBnConfig
        from adapters.configuration import ModelAdaptersConfig
        from adapters.methods.bottleneck import BottleneckLayer

        first = bank[0]
        d, r = first.down.in_features, first.down.out_features
        config = SeqBnConfig(reduction_factor=d / r, non_linearity=first.activation, scaling=first.scale,
                             init_weights="bert", original_ln_before=False, original_ln_after=False,
                             residual_before_ln=True)
        self.adapters_config = ModelAdaptersConfig()
        self.layer = BottleneckLayer("output_adapter")
        self.layer.init_adapters(types.SimpleNamespace(hidden_size=d), self.adapters_config)
        names: list[str] = []
        sizes: list[int] = []
        for k, (adapter, size) in enumerate(zip(bank, batch_sizes)):
            if size == 0:  # an adapter without rows is not part of the split
                continue
            name = f"a{k}"
            self.adapters_config.add(name, config=config)
            if not self.layer.add_adapter(name, 0):
                raise RuntimeError(f"AdapterHub did not add adapter {name}")
            block = self.layer.adapters[name]
            down, up = block.adapter_down[0], block.adapter_up
            if down.out_features != r:
                raise ValueError(f"AdapterHub bottleneck {down.out_features} != r={r} (reduction factor {d / r})")
            with torch.no_grad():
                down.weight.copy_(adapter.down.weight)
                down.bias.copy_(adapter.down.bias)
                up.weight.copy_(adapter.up.weight)
                up.bias.copy_(adapter.up.bias)
            names.append(name)
            sizes.append(size)
        self.adapters_config.active_setup = BatchSplit(*names, batch_sizes=sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch ordered by adapter, ..., d) -> the same shape."""
        return self.layer(x, x, None)


def grouped_unavailable(provider: str, kind: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run a ``kind`` index on ``device`` (None when it can)."""
    if provider not in GROUPED_PROVIDERS:
        return f"unknown grouped provider {provider!r}"
    if provider in ("single", "grouped", "separate"):
        return provider_unavailable("fused", device)
    if provider == "adapterhub_batchsplit":
        if kind != "sequence":
            return "BatchSplit assigns whole sequences (the batch dimension) to adapters; no per-token index"
        return adapterhub_available()
    return None


def build_work(provider: str, bank: Sequence[EagerAdapter], inputs: GroupedInputs, device: torch.device,
               dtype: torch.dtype) -> GroupedWork:
    """The computation ``provider`` times on ``inputs`` with the adapters of ``bank`` (all copies of the
    same weights, on ``device`` in ``dtype``)."""
    first = bank[0]
    act, scale = first.activation, first.scale
    if provider == "single":
        dw, db, uw, ub = _params(first, device, dtype)

        def run_single(train: bool) -> list[torch.Tensor]:
            return [fused_adapter(inputs.x_train if train else inputs.x, dw, db, uw, ub, act, scale)]
        return GroupedWork(run_single, [inputs.grad], [inputs.x_train, dw, db, uw, ub])
    if provider == "grouped":
        sdw, sdb, suw, sub = _stacked(bank, device, dtype)
        check_index_values(inputs.index, len(bank))  # once, outside the timed calls

        def run_grouped(train: bool) -> list[torch.Tensor]:
            x = inputs.x_train if train else inputs.x
            return [fused_adapter_grouped(x, inputs.index, sdw, sdb, suw, sub, act, scale, check_index=False)]
        return GroupedWork(run_grouped, [inputs.grad], [inputs.x_train, sdw, sdb, suw, sub])
    if provider == "eager_loop":
        ldw, ldb, luw, lub = _stacked(bank, device, dtype)

        def run_loop(train: bool) -> list[torch.Tensor]:
            x = inputs.x_train if train else inputs.x
            return [reference_adapter_grouped(x, inputs.index, ldw, ldb, luw, lub, act, scale)]
        return GroupedWork(run_loop, [inputs.grad], [inputs.x_train, ldw, ldb, luw, lub])
    if provider == "separate":
        used = [k for k, c in enumerate(inputs.counts) if c > 0]
        sizes = [inputs.counts[k] for k in used]
        batches = list(inputs.by_adapter(inputs.x).split(sizes))
        batches_train = [b.detach().clone().requires_grad_(True) for b in batches]
        grads = list(inputs.by_adapter(inputs.grad).split(sizes))
        per_task = [_params(bank[k], device, dtype) for k in used]

        def run_separate(train: bool) -> list[torch.Tensor]:
            xs = batches_train if train else batches
            return [fused_adapter(x, p[0], p[1], p[2], p[3], act, scale) for x, p in zip(xs, per_task)]
        return GroupedWork(run_separate, grads, [*batches_train, *(t for p in per_task for t in p)])
    if provider == "adapterhub_batchsplit":
        layer = BatchSplitLayer(bank, inputs.counts).to(device=device, dtype=dtype).eval()
        ordered = inputs.by_adapter(inputs.x)
        ordered_train = ordered.detach().clone().requires_grad_(True)
        ordered_grad = inputs.by_adapter(inputs.grad)
        hub_params = [p for p in layer.parameters() if p.requires_grad]

        def run_batchsplit(train: bool) -> list[torch.Tensor]:
            return [layer(ordered_train if train else ordered)]
        return GroupedWork(run_batchsplit, [ordered_grad], [ordered_train, *hub_params])
    raise ValueError(f"unknown grouped provider {provider!r}")


def grouped_runner(op: str, work: GroupedWork) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """(a zero-argument callable doing one ``op`` of ``work``, the tensors whose ``.grad`` must be reset
    between calls); the counterpart of ``harness.op_runner`` for work with several outputs."""
    if op == "forward":
        def run_forward() -> list[torch.Tensor]:
            with torch.no_grad():
                return work.forward(False)
        return run_forward, []
    if op == "forward_backward":
        def run_forward_backward() -> None:
            torch.autograd.backward(work.forward(True), work.grads)
        return run_forward_backward, work.leaves
    raise ValueError(f"unknown grouped op {op!r}; expected one of {', '.join(GROUPED_OPS)}")


# ---------------------------------------------------------------- measurement and records


def make_grouped_record(op: str, provider: str, case: GroupedCase, n_adapters: int, adapters_used: int,
                        kind: str | None, timing: Timing | None, copy_bw_gbps: float,
                        peak_mem_bytes: int | None, skipped: str | None = None) -> dict[str, Any]:
    """One ``grouped`` record (keys ``GROUPED_RECORD_KEYS``) built on ``harness.make_record``; ``kind`` is
    None for ``single`` (no index); ``skipped``: why timing is None; ``ratio_to_single`` is filled in once
    the case is measured."""
    nbytes = grouped_minimal_bytes(op, case.M, case.d, case.r, adapters_used, case.dtype.itemsize)
    base = make_record(op, provider, case.kernel_case(), timing, copy_bw_gbps, peak_mem_bytes, nbytes=nbytes)
    extra = {"batch": case.batch, "seq": case.seq, "n_adapters": n_adapters, "adapters_used": adapters_used,
             "index": kind, "ratio_to_single": None, "skipped": skipped if timing is None else None}
    merged = {**base, **extra}
    return {key: merged[key] for key in GROUPED_RECORD_KEYS}


def fill_ratios(records: list[dict[str, Any]]) -> None:
    """Set ``ratio_to_single`` of every measured record: its median over the ``single`` median of the same
    op, dtype and shape (None where either is missing)."""
    single = {(r["op"], r["dtype"], r["batch"], r["seq"], r["d"], r["r"]): r["ms_median"]
              for r in records if r["provider"] == "single" and r["ms_median"]}
    for r in records:
        base = single.get((r["op"], r["dtype"], r["batch"], r["seq"], r["d"], r["r"]))
        r["ratio_to_single"] = r["ms_median"] / base if base and r["ms_median"] is not None else None


def _measure_work(op: str, work: GroupedWork, case: GroupedCase, device: torch.device, settings: TimingSettings,
                  notes: list[str]) -> tuple[Timing, int | None]:
    fn, leaves = grouped_runner(op, work)
    timing = measure(fn, leaves, device, settings, use_graph=case.M <= GRAPH_MAX_ROWS, notes=notes)
    peak = peak_memory(fn, leaves, device)
    _reset_grads(leaves)
    return timing, peak


def bench_grouped_case(case: GroupedCase, n_adapters: Sequence[int], kinds: Sequence[str], providers: Sequence[str],
                       ops: Sequence[str], device: torch.device, copy_bw: float, settings: TimingSettings,
                       activation: str = "relu", scale: float = 1.0, seed: int = 0, skips: list[Skip] | None = None,
                       on_provider_done: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Measure ``single`` once, then every other provider for each adapter count and index kind, on one
    batch shape; records in order, ``ratio_to_single`` filled in. A provider or op that fails is recorded
    with null timings and its reason appended to ``skips``."""
    skips = skips if skips is not None else []
    records: list[dict[str, Any]] = []
    plans: list[tuple[str, int, str | None]] = [("single", 1, None)] if "single" in providers else []
    plans += [(p, n, kind) for kind in kinds for n in n_adapters for p in providers if p != "single"]
    for provider, n, kind in plans:
        label = f"{case} n={n}" + (f" index={kind}" if kind else "")
        reason = grouped_unavailable(provider, kind or "sequence", device)
        inputs = make_grouped_inputs(case, kind or "sequence", n, device, seed)
        used = sum(c > 0 for c in inputs.counts)
        work: GroupedWork | None = None
        if reason is None:
            try:
                work = build_work(provider, make_bank(n, case.d, case.r, activation, scale, seed), inputs, device,
                                  case.dtype)
            except Exception as exc:
                reason = f"build failed: {_short(exc)}"
        for op in ops:
            timing: Timing | None = None
            peak: int | None = None
            op_reason = reason
            if work is not None:
                notes: list[str] = []
                try:
                    timing, peak = _measure_work(op, work, case, device, settings, notes)
                except Exception as exc:
                    op_reason, timing, peak = _short(exc), None, None
                skips.extend(Skip(provider, op, label, note) for note in notes)
            if timing is None:
                op_reason = op_reason or "not measured"
                skips.append(Skip(provider, op, label, op_reason))
            records.append(make_grouped_record(op, provider, case, n, used, kind, timing, copy_bw, peak, op_reason))
        del work
        if on_provider_done is not None:
            on_provider_done()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fill_ratios(records)
    return records
