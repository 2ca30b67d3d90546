"""Results: the JSON file, the PNG plots, the terminal and markdown tables, and the targets table.

``rich`` (terminal tables) and ``matplotlib`` (plots) are imported by the functions that use them, so
the results file, the markdown tables and the targets need neither.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .grouped import TARGET_ADAPTERS, TARGET_RATIO
from .harness import OPS, Skip, tflops

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TOP_LEVEL_KEYS: tuple[str, ...] = ("device", "torch", "triton", "date", "command", "copy_bw_gbps", "records", "models",
                                   "grouped", "host_cost", "train")


def file_stem(device: str, when: datetime) -> str:
    """``adapter_bench_<device>_<date>``, e.g. ``adapter_bench_nvidia-h200_2025-01-31_120501``."""
    if device.startswith("CPU"):
        slug = "cpu-interpreter" if "interpreter" in device else "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"
    return f"adapter_bench_{slug}_{when:%Y-%m-%d_%H%M%S}"


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """Write the results file (keys exactly ``TOP_LEVEL_KEYS``)."""
    missing = set(TOP_LEVEL_KEYS) ^ set(result)
    if missing:
        raise ValueError(f"results must have exactly the keys {TOP_LEVEL_KEYS}; mismatch: {sorted(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: result[k] for k in TOP_LEVEL_KEYS}, indent=1) + "\n", encoding="utf-8")
    return path


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table (None or "" prints as ``—``)."""
    def cell(value: Any) -> str:
        return "—" if value is None or value == "" else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _plot_dtype(records: Sequence[dict[str, Any]]) -> str | None:
    dtypes = {r["dtype"] for r in records if r["ms_median"] is not None}
    for preferred in ("bfloat16", "float16", "float32"):
        if preferred in dtypes:
            return preferred
    return next(iter(sorted(dtypes)), None)


def speedups(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, int, int, int], float]:
    """(op, provider, dtype, M, d, r) -> provider's median time / fused median time."""
    fused = {(r["op"], r["dtype"], r["M"], r["d"], r["r"]): r["ms_median"]
             for r in records if r["provider"] == "fused" and r["ms_median"]}
    out = {}
    for r in records:
        base = fused.get((r["op"], r["dtype"], r["M"], r["d"], r["r"]))
        if r["provider"] != "fused" and r["ms_median"] and base:
            out[(r["op"], r["provider"], r["dtype"], r["M"], r["d"], r["r"])] = r["ms_median"] / base
    return out


def _ops_present(records: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["op"] for r in records}
    return [op for op in OPS if op in present]


def plot_speedup(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Speedup of fused over each provider vs rows, one panel per op: geometric mean over (d, r),
    shaded from the smallest to the largest speedup among the shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = _plot_dtype(records)
    ops = _ops_present(records) or list(OPS)
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
    ratios = speedups(records)
    for ax, op in zip(axes[0], ops):
        by_provider: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (r_op, provider, r_dtype, M, _d, _r), value in ratios.items():
            if r_op == op and r_dtype == dtype:
                by_provider[provider][M].append(value)
        for provider, per_rows in sorted(by_provider.items()):
            rows = sorted(per_rows)
            mid = [_geomean(per_rows[m]) for m in rows]
            ax.plot(rows, mid, marker="o", label=f"vs {provider}")
            ax.fill_between(rows, [min(per_rows[m]) for m in rows], [max(per_rows[m]) for m in rows], alpha=0.15)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows M")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
    return _save_figure(fig, axes, "speedup of fused (×)", f"{title} · {dtype}", path)


def plot_copy_bandwidth(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Achieved bandwidth (minimal bytes) as % of the measured copy bandwidth vs rows, one panel per
    op, one line per provider: median over (d, r), shaded from the lowest to the highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = _plot_dtype(records)
    ops = _ops_present(records) or list(OPS)
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        by_provider: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            if r["op"] == op and r["dtype"] == dtype and r["pct_of_copy_bw"] is not None:
                by_provider[r["provider"]][r["M"]].append(r["pct_of_copy_bw"])
        for provider, per_rows in sorted(by_provider.items()):
            rows = sorted(per_rows)
            med = [sorted(per_rows[m])[len(per_rows[m]) // 2] for m in rows]
            ax.plot(rows, med, marker="o", label=provider)
            ax.fill_between(rows, [min(per_rows[m]) for m in rows], [max(per_rows[m]) for m in rows], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows M")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
    return _save_figure(fig, axes, "% of copy bandwidth", f"{title} · {dtype}", path)


def _save_figure(fig: Any, axes: Any, ylabel: str, title: str, path: Path) -> Path:
    """Label, title and write a one-row panel figure as PNG; returns ``path``."""
    import matplotlib.pyplot as plt

    axes[0][0].set_ylabel(ylabel)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def kernel_table(records: Sequence[dict[str, Any]], title: str) -> Table:
    """One row per (op, shape): fused's figures, then each other provider's median and fused's speedup."""
    from rich.table import Table

    providers = [p for p in dict.fromkeys(r["provider"] for r in records) if p != "fused"]
    table = Table(title=title, title_justify="left")
    for name in ("op", "dtype", "M", "d", "r", "fused ms", "p20–p80", "GB/s", "% copy", "TFLOP/s", "peak MiB"):
        table.add_column(name, justify="left" if name in ("op", "dtype") else "right")
    for provider in providers:
        table.add_column(f"{provider} ms (×)", justify="right")
    grouped: dict[tuple[str, str, int, int, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        grouped[(r["op"], r["dtype"], r["M"], r["d"], r["r"])][r["provider"]] = r
    for (op, dtype, M, d, rank), by_provider in grouped.items():
        fused = by_provider.get("fused")
        fused_ms = fused["ms_median"] if fused else None
        cells = [op, SHORT_DTYPES.get(dtype, dtype), str(M), str(d), str(rank)]
        if fused and fused_ms is not None:
            cells += [f"{fused_ms:.4f}", f"{fused['ms_p20']:.4f}–{fused['ms_p80']:.4f}", _fmt(fused["gbps"], ".4g"),
                      _fmt(fused["pct_of_copy_bw"], ".3g"), _fmt(tflops(fused), ".3g"), _mib(fused["peak_mem_bytes"])]
        else:
            cells += ["skipped" if fused else "not run", "", "", "", "", ""]
        for provider in providers:
            other = by_provider.get(provider)
            if other is None or other["ms_median"] is None:
                cells.append("skipped" if other is not None else "")
                continue
            speedup = f" ({other['ms_median'] / fused_ms:.3g}×)" if fused_ms else ""
            cells.append(f"{other['ms_median']:.4f}{speedup}")
        table.add_row(*cells)
    return table


def model_table(models: Sequence[dict[str, Any]], title: str) -> Table:
    """Model-level results, with fused's ratio to each provider (tokens/s for training, time for latency)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in ("model", "task", "provider", "batch×seq", "dtype", "ms median", "p20–p80", "tokens/s", "peak MiB",
                 "ratio"):
        table.add_column(name, justify="left" if name in ("model", "task", "provider", "dtype") else "right")
    ref: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for m in models:
        if m["ms_median"] is not None:
            ref[(m["model"], m["task"])][m["provider"]] = m["ms_median"]
    for m in models:
        times = ref[(m["model"], m["task"])]
        ratio = ""
        if m["ms_median"] is not None:
            if m["task"] == "inference" and "base" in times and m["provider"] != "base":
                ratio = f"{100 * (m['ms_median'] / times['base'] - 1):+.1f}% vs base"
            elif m["task"] == "decode" and m["provider"] != "base":
                same = "base compiled" if "compiled" in m["provider"] else "base"
                ratio = f"{100 * (m['ms_median'] / times[same] - 1):+.1f}% vs {same}" if same in times else ""
            elif m["task"] == "train_step" and "fused" in times and m["provider"] != "fused":
                ratio = f"fused {m['ms_median'] / times['fused']:.2f}× tokens/s"
        if m["ms_median"] is None:
            cells = ["skipped", "", "", "", ""]
        else:
            cells = [f"{m['ms_median']:.3f}", f"{m['ms_p20']:.3f}–{m['ms_p80']:.3f}", f"{m['tokens_per_s']:.0f}",
                     _mib(m["peak_mem_bytes"]), ratio]
        table.add_row(m["model"], m["task"], m["provider"], f"{m['batch']}×{m['seq']}", m["dtype"], *cells)
    return table


def grouped_table(grouped: Sequence[dict[str, Any]], title: str, gpu: bool) -> Table:
    """One row per (op, shape, index kind, adapter count): the single-adapter time, then each provider's
    median and its ratio to the single adapter; ``target`` judges the grouped kernel at
    ``TARGET_ADAPTERS`` adapters against ``TARGET_RATIO`` (GPU runs only)."""
    from rich.table import Table

    providers = [p for p in dict.fromkeys(r["provider"] for r in grouped) if p != "single"]
    table = Table(title=title, title_justify="left")
    for name in ("op", "dtype", "B×S", "d", "r", "index", "adapters", "single ms"):
        table.add_column(name, justify="left" if name in ("op", "dtype", "index") else "right")
    for provider in providers:
        table.add_column(f"{provider} ms (×)", justify="right")
    table.add_column(f"target ≤{TARGET_RATIO}×", justify="left")
    single: dict[tuple[str, str, int, int, int, int], dict[str, Any]] = {}
    rows: dict[tuple[str, str, int, int, int, int, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in grouped:
        shape = (r["op"], r["dtype"], r["batch"], r["seq"], r["d"], r["r"])
        if r["provider"] == "single":
            single[shape] = r
        else:
            rows[(*shape, r["index"], r["n_adapters"])][r["provider"]] = r
    for (op, dtype, batch, seq, d, rank, kind, n), by_provider in rows.items():
        base = single.get((op, dtype, batch, seq, d, rank))
        base_ms = base["ms_median"] if base else None
        cells = [op, SHORT_DTYPES.get(dtype, dtype), f"{batch}×{seq}", str(d), str(rank), kind, str(n),
                 _fmt(base_ms, ".4f") if base else "not run"]
        for provider in providers:
            rec = by_provider.get(provider)
            if rec is None or rec["ms_median"] is None:
                cells.append("skipped" if rec is not None else "")
                continue
            ratio = f" ({rec['ratio_to_single']:.3g}×)" if rec["ratio_to_single"] is not None else ""
            cells.append(f"{rec['ms_median']:.4f}{ratio}")
        verdict = ""
        fused = by_provider.get("grouped")
        if n == TARGET_ADAPTERS and fused is not None and fused["ratio_to_single"] is not None:
            verdict = ("met" if fused["ratio_to_single"] <= TARGET_RATIO else "missed") if gpu else "n/a on CPU"
        cells.append(verdict)
        table.add_row(*cells)
    return table


def skip_table(skips: Sequence[Skip]) -> Table:
    """Skipped measurements grouped by provider, op kind and reason."""
    from rich.table import Table

    table = Table(title="Skipped, or measured differently than planned", title_justify="left")
    for name in ("provider", "op", "count", "reason"):
        table.add_column(name)
    grouped: dict[tuple[str, str, str], int] = defaultdict(int)
    for s in skips:
        grouped[(s.provider, s.op, s.reason)] += 1
    for (provider, op, reason), count in grouped.items():
        table.add_row(provider, op, str(count), reason)
    return table


def print_tables(console: Console, result: dict[str, Any], skips: Sequence[Skip]) -> None:
    """Print the kernel table, the model table, the grouped table and the skipped measurements."""
    cpu = str(result["device"]).startswith("CPU")
    note = " — CPU timings (Triton interpreter), not comparable with GPU figures" if cpu else ""
    head = f"{result['device']} · torch {result['torch']} · triton {result['triton']} · {result['date']}"
    console.print(f"[bold]{head}[/bold]")
    console.print(f"copy bandwidth (read + write): {result['copy_bw_gbps']:.1f} GB/s{note}")
    if result["records"]:
        console.print(kernel_table(result["records"], f"Adapter kernels (×: provider time / fused time){note}"))
    if result["models"]:
        console.print(model_table(result["models"], f"Models{note}"))
    if result["grouped"]:
        console.print(grouped_table(result["grouped"], "Many adapters in one batch (×: time / one adapter on the same "
                                    f"rows){note}", gpu=not cpu))
    if skips:
        console.print(skip_table(skips))


# ---------------------------------------------------------------- targets (judged on GPU runs)

FORWARD_COPY_BW_PCT = 85.0
FORWARD_MIN_ELEMENTS = 2**25
FWD_BWD_VS = {"eager": 2.5, "compile": 1.5}
FWD_BWD_MIN_ROWS = 4096
GPT2_MAX_OVERHEAD = 0.05


@dataclass
class TargetRow:
    """One line of the targets table: ``verdict`` is met, missed, not measured or n/a (not judged);
    a miss carries the measured ``gap``."""

    target: str
    case: str
    measured: str
    verdict: str
    gap: str | None = None
    value: float | None = None
    threshold: float | None = None


def evaluate_targets(result: dict[str, Any], judge: bool = True) -> list[TargetRow]:
    """Each target against every measurement of ``result`` (a results file) it applies to: met, or
    missed with the gap. ``judge=False`` (CPU runs at tiny sizes) drops the size conditions, applies
    every target and judges none (verdict ``n/a``), so the plumbing is exercised."""
    records, models, grouped = result.get("records") or [], result.get("models") or [], result.get("grouped") or []
    rows: list[TargetRow] = []

    def add(name: str, case: str, value: float | None, threshold: float, met: bool, measured: str, gap: str) -> None:
        verdict = ("met" if met else "missed") if judge else "n/a (not judged)"
        rows.append(TargetRow(name, case, measured, verdict, None if met or not judge else gap, value, threshold))

    def label(r: dict[str, Any]) -> str:
        return f"M={r['M']} d={r['d']} r={r['r']} {r['dtype']}"

    def fused(op: str, big: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in records if r["provider"] == "fused" and r["op"] == op and (big(r) or not judge)]

    size = f"rows·d ≥ 2^{int(math.log2(FORWARD_MIN_ELEMENTS))}"
    name = f"forward ≥ {FORWARD_COPY_BW_PCT:.0f}% of copy bandwidth ({size})"
    chosen = fused("forward", lambda r: r["M"] * r["d"] >= FORWARD_MIN_ELEMENTS)
    for r in chosen:
        pct = r["pct_of_copy_bw"]
        if pct is None:
            rows.append(TargetRow(name, label(r), "not measured", "not measured"))
        else:
            add(name, label(r), pct, FORWARD_COPY_BW_PCT, pct >= FORWARD_COPY_BW_PCT,
                f"{pct:.1f}% ({r['gbps']:.0f} GB/s)", f"{FORWARD_COPY_BW_PCT - pct:.1f} points short")
    if not chosen:
        rows.append(TargetRow(name, "—", "no fused forward record of that size", "not measured"))
    for provider, need in FWD_BWD_VS.items():
        name = f"forward+backward ≥ {need}× {provider} (rows ≥ {FWD_BWD_MIN_ROWS})"
        chosen = fused("forward_backward", lambda r: r["M"] >= FWD_BWD_MIN_ROWS)
        for r in chosen:
            other = next((o["ms_median"] for o in records if o["provider"] == provider and o["ms_median"] and all(
                o[k] == r[k] for k in ("op", "dtype", "M", "d", "r"))), None)
            if r["ms_median"] is None or other is None:
                rows.append(TargetRow(name, label(r), f"fused or {provider} not measured", "not measured"))
                continue
            speedup = other / r["ms_median"]
            add(name, label(r), speedup, need, speedup >= need,
                f"{speedup:.2f}× ({r['ms_median']:.3f} vs {other:.3f} ms)",
                f"fused must take {100 * (1 - speedup / need):.0f}% less time")
        if not chosen:
            rows.append(TargetRow(name, "—", "no fused forward+backward record of that size", "not measured"))
    name = f"GPT-2 medium batch-1 latency ≤ +{GPT2_MAX_OVERHEAD:.0%} over the base model"
    latency = {m["provider"]: m for m in models if m["task"] == "inference" and m["ms_median"] is not None}
    if "base" in latency and "fused" in latency:
        base, ours = latency["base"], latency["fused"]
        overhead = ours["ms_median"] / base["ms_median"] - 1
        eager = latency.get("eager")
        extra = f"; eager adapters {100 * (eager['ms_median'] / base['ms_median'] - 1):+.1f}%" if eager else ""
        add(name, f"{ours['model']} {ours['batch']}×{ours['seq']} {ours['dtype']}", overhead, GPT2_MAX_OVERHEAD,
            overhead <= GPT2_MAX_OVERHEAD,
            f"{100 * overhead:+.1f}% ({ours['ms_median']:.3f} vs {base['ms_median']:.3f} ms{extra})",
            f"{100 * (overhead - GPT2_MAX_OVERHEAD):.1f} points over")
    else:
        rows.append(TargetRow(name, "—", "base or fused latency not measured", "not measured"))
    host = (result.get("host_cost") or {}).get("target")
    name = "FusedAdapter call (no grad, one row) on the host up to the launch"
    if host:
        name += f" ≤ {host['target_us']:g} µs"
        add(name, f"d={result['host_cost']['d']} r={result['host_cost']['r']} {result['host_cost']['dtype']}",
            host["measured_us"], host["target_us"], host["met"],
            f"{host['measured_us']:.1f} µs (median {host['median_us']:.1f})",
            f"{host['measured_us'] - host['target_us']:.1f} µs over")
    else:
        rows.append(TargetRow(name, "—", "host cost not measured", "not measured"))
    name = f"{TARGET_ADAPTERS} adapters in one grouped batch ≤ {TARGET_RATIO}× one adapter"
    chosen = [g for g in grouped if g["provider"] == "grouped" and g["n_adapters"] == TARGET_ADAPTERS]
    for g in chosen:
        case = f"{g['op']} {g['batch']}×{g['seq']} d={g['d']} r={g['r']} {g['dtype']} ({g['index']})"
        ratio = g["ratio_to_single"]
        if ratio is None:
            rows.append(TargetRow(name, case, "not measured", "not measured"))
        else:
            add(name, case, ratio, TARGET_RATIO, ratio <= TARGET_RATIO, f"{ratio:.2f}×",
                f"{ratio - TARGET_RATIO:.2f}× over")
    if not chosen:
        rows.append(TargetRow(name, "—", f"no batch of {TARGET_ADAPTERS} adapters measured", "not measured"))
    return rows


def targets_markdown(rows: Sequence[TargetRow]) -> str:
    """The targets table in markdown."""
    return md_table(("target", "case", "measured", "verdict", "gap"),
                    [(r.target, r.case, r.measured, r.verdict, r.gap) for r in rows])
