"""Command line: ``python -m benchmarks [--smoke | --quick] [--out DIR] ...``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# spelled out here (the harness is imported only after TRITON_INTERPRET is settled); a test keeps them equal
OPS = ("forward", "forward_train", "backward", "forward_backward", "latency")
PROVIDERS = ("fused", "eager", "compile", "compile_max_autotune", "adapterhub")
GROUPED_PROVIDERS = ("single", "grouped", "separate", "eager_loop", "adapterhub_batchsplit")
INDEX_KINDS = ("sequence", "token")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the fused adapter kernel against eager PyTorch, torch.compile and AdapterHub, and "
                    "against the device copy bandwidth; at model level (BERT-base training, GPT-2 medium "
                    "latency); and many adapters in one batch (the grouped kernel against one adapter, separate "
                    "batches, an eager loop and AdapterHub's BatchSplit). Needs a CUDA device except with --smoke "
                    "(or --device cpu), which runs the kernels in "
                    "Triton's interpreter; CPU timings are labelled as such and are not comparable with GPU ones.",
    )
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--smoke", action="store_true",
                      help="tiny grid on CPU through the Triton interpreter (fused, eager, compile; tiny models; "
                           "a tiny grouped case)")
    grid.add_argument("--quick", action="store_true", help="a small subset of the full shape grid")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON results and PNG plots into this directory")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default); cpu runs the kernels in the Triton interpreter")
    parser.add_argument("--providers", type=_csv, default=None,
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--ops", type=_csv, default=None, help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--d", type=_csv, default=None, help="override the widths, e.g. 1024,4096")
    parser.add_argument("--r", type=_csv, default=None, help="override the ranks, e.g. 16,64,d/16")
    parser.add_argument("--rows", type=_csv, default=None, help="override the row counts, e.g. 1,4096")
    parser.add_argument("--dtypes", type=_csv, default=None, help="override the dtypes, e.g. bfloat16,float32")
    parser.add_argument("--activation", default="relu", help="adapter activation of the kernel benchmarks")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter output scale")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement in ms")
    parser.add_argument("--seed", type=int, default=0)
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--no-models", action="store_true", help="skip the model-level benchmarks")
    models.add_argument("--models-only", action="store_true", help="run only the model-level benchmarks")
    grouped = parser.add_mutually_exclusive_group()
    grouped.add_argument("--no-grouped", action="store_true", help="skip the many-adapters-in-one-batch benchmark")
    grouped.add_argument("--grouped-only", action="store_true",
                         help="run only the many-adapters-in-one-batch benchmark")
    parser.add_argument("--grouped-adapters", type=_csv, default=None,
                        help="adapter counts mixed in one batch (default 1,2,8,32; smoke 1,2)")
    parser.add_argument("--grouped-batches", type=_csv, default=None,
                        help="SEQUENCESxTOKENS batches of the grouped benchmark, e.g. 32x1,64x128")
    parser.add_argument("--grouped-index", type=_csv, default=None,
                        help=f"index kinds of the grouped benchmark, subset of {','.join(INDEX_KINDS)}")
    parser.add_argument("--grouped-providers", type=_csv, default=None,
                        help=f"comma-separated subset of {','.join(GROUPED_PROVIDERS)} (ratios need single)")
    parser.add_argument("--bert-batch", type=int, default=None, help="BERT training batch size (default 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU runs: torch intra-op threads (default 1 with --smoke, which keeps inductor's "
                             "OpenMP kernels from stalling on a busy machine; torch's default otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def missing_extras(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Optional packages the chosen options need, checked before any work: (lines naming each missing
    package that the run cannot do without and the extra that installs it, notes on missing packages whose
    comparisons will be recorded as skipped)."""

    def absent(package: str) -> bool:
        if sys.modules.get(package) is not None:  # imported already (some set no __spec__, which find_spec rejects)
            return False
        return importlib.util.find_spec(package) is None

    kernels = not (args.models_only or args.grouped_only)
    run_models = not (args.no_models or args.grouped_only)
    run_grouped = not (args.no_grouped or args.models_only)
    hub_named = "adapterhub" in (args.providers or ()) or "adapterhub_batchsplit" in (args.grouped_providers or ())
    needs = [
        ("rich", True, "tables and progress", "bench"),
        ("matplotlib", args.out is not None and kernels, "plots written with --out", "bench"),
        ("transformers", run_models, "model-level benchmarks; or pass --no-models", "hf"),
        ("adapters", hub_named, "the AdapterHub providers named in --providers/--grouped-providers", "adapterhub"),
    ]
    missing = [f"  {package} ({why}): pip install -e '.[{extra}]'"
               for package, needed, why, extra in needs if needed and absent(package)]
    notes = []
    hub_by_default = (run_models or (run_grouped and args.grouped_providers is None)
                      or (kernels and args.providers is None and not args.smoke))
    if hub_by_default and not hub_named and absent("adapters"):
        notes.append("python -m benchmarks: AdapterHub (adapters) is not installed; its comparisons are recorded "
                     "as skipped (pip install -e '.[adapterhub]' to run them)")
    return missing, notes


def check_extras(args: argparse.Namespace) -> None:
    """Exit with a message naming the extras to install when the chosen options need a missing package."""
    missing, notes = missing_extras(args)
    if missing:
        sys.exit("python -m benchmarks: the chosen options need packages that are not installed:\n"
                 + "\n".join(missing))
    for note in notes:
        print(note, file=sys.stderr)


def pick_device(args: argparse.Namespace) -> str:
    """'cuda' or 'cpu'; exits with a message when a GPU run is asked for without a GPU."""
    import torch

    if args.smoke:
        return "cpu"
    if args.device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        sys.exit("python -m benchmarks: no CUDA device; use --smoke for the CPU (Triton interpreter) run, "
                 "or --device cpu with a small grid")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m benchmarks: --device cuda but no CUDA device is available")
    return args.device


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks described by ``argv``; print the tables; write results when --out is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_extras(args)
    device_name = pick_device(args)
    if device_name == "cpu":
        # must precede the first import of the kernels (adapter_fused imports them lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import grouped, harness, models, report

    device = torch.device(device_name)
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    spec = harness.SMOKE_GRID if args.smoke else harness.QUICK_GRID if args.quick else harness.FULL_GRID
    spec = harness.GridSpec(
        d=tuple(int(v) for v in args.d) if args.d else spec.d,
        r=tuple(harness.parse_rank(v) for v in args.r) if args.r else spec.r,
        rows=tuple(int(v) for v in args.rows) if args.rows else spec.rows,
        dtypes=tuple(args.dtypes) if args.dtypes else spec.dtypes,
    )
    providers = args.providers or list(harness.SMOKE_PROVIDERS if args.smoke else harness.PROVIDERS)
    ops = args.ops or list(harness.OPS)
    for name, given, allowed in (("provider", providers, harness.PROVIDERS), ("op", ops, harness.OPS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            sys.exit(f"python -m benchmarks: unknown {name} {', '.join(unknown)}; expected {', '.join(allowed)}")
    settings = harness.SMOKE_TIMING if args.smoke else harness.TimingSettings()
    if args.rep_ms is not None:
        settings = harness.TimingSettings(rep_ms=args.rep_ms, warmup_ms=settings.warmup_ms, warmup=settings.warmup,
                                          min_reps=settings.min_reps, max_reps=settings.max_reps)
    if args.models_only and args.grouped_only:
        sys.exit("python -m benchmarks: --models-only and --grouped-only exclude each other")
    gspec = grouped.SMOKE_GROUPED if args.smoke else grouped.QUICK_GROUPED if args.quick else grouped.FULL_GROUPED
    try:
        gspec = grouped.GroupedSpec(
            batches=tuple(grouped.parse_batch(v) for v in args.grouped_batches) if args.grouped_batches
            else gspec.batches,
            d=spec.d if args.d else gspec.d,
            r=spec.r if args.r else gspec.r,
            dtypes=spec.dtypes if args.dtypes else gspec.dtypes,
            n_adapters=tuple(int(v) for v in args.grouped_adapters) if args.grouped_adapters else gspec.n_adapters,
            index_kinds=tuple(args.grouped_index) if args.grouped_index else gspec.index_kinds,
        )
    except ValueError as exc:
        sys.exit(f"python -m benchmarks: {exc}")
    grouped_providers = args.grouped_providers or list(grouped.GROUPED_PROVIDERS)
    for name, given, allowed in (("grouped provider", grouped_providers, grouped.GROUPED_PROVIDERS),
                                 ("index kind", gspec.index_kinds, grouped.INDEX_KINDS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            sys.exit(f"python -m benchmarks: unknown {name} {', '.join(unknown)}; expected {', '.join(allowed)}")
    if any(n < 1 for n in gspec.n_adapters):
        sys.exit("python -m benchmarks: --grouped-adapters must be positive")
    cases = [] if args.models_only or args.grouped_only else harness.expand_grid(spec)
    run_models = not args.no_models and not args.grouped_only
    grouped_cases = [] if args.no_grouped or args.models_only else grouped.expand_grouped(gspec)
    bert_spec = models.BERT_SMOKE if device.type == "cpu" else models.BERT_BASE
    gpt2_spec = models.GPT2_SMOKE if device.type == "cpu" else models.GPT2_MEDIUM
    if args.bert_batch:
        from dataclasses import replace

        bert_spec = replace(bert_spec, batch=args.bert_batch)

    console = Console()
    if not console.is_terminal:  # piped into a file or a CI log: do not squeeze the tables to 80 columns
        console = Console(width=200)
    started = time.perf_counter()
    when = datetime.now(timezone.utc)
    skips: list[harness.Skip] = []
    copy_bw = harness.copy_bandwidth_gbps(device, settings=settings)
    records: list[dict[str, Any]] = []
    model_records: list[dict[str, Any]] = []
    grouped_records: list[dict[str, Any]] = []
    total = len(cases) * len(providers) + (len(models.BERT_PROVIDERS) + len(models.GPT2_PROVIDERS)) * run_models
    total += grouped.grouped_steps(gspec, grouped_providers) if grouped_cases else 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=True) as progress:
        task = progress.add_task("kernels", total=total)
        for case in cases:
            progress.update(task, description=f"kernels {case}")
            records += harness.bench_case(case, providers, ops, device, copy_bw, settings, args.activation,
                                          args.scale, args.seed, skips, lambda: progress.advance(task))
        if run_models:
            progress.update(task, description=f"model {bert_spec.name}")
            model_records += models.bench_bert_training(bert_spec, models.BERT_PROVIDERS, device, settings, skips,
                                                        args.seed)
            progress.advance(task, len(models.BERT_PROVIDERS))
            progress.update(task, description=f"model {gpt2_spec.name}")
            model_records += models.bench_gpt2_latency(gpt2_spec, models.GPT2_PROVIDERS, device, settings, skips,
                                                       args.seed)
            progress.advance(task, len(models.GPT2_PROVIDERS))
        for gcase in grouped_cases:
            progress.update(task, description=f"grouped {gcase}")
            grouped_records += grouped.bench_grouped_case(
                gcase, gspec.n_adapters, gspec.index_kinds, grouped_providers, grouped.GROUPED_OPS, device, copy_bw,
                settings, args.activation, args.scale, args.seed, skips, lambda: progress.advance(task))

    from . import host_cost

    host = host_cost.measure(calls=500 if args.smoke else 4000, repeats=3 if args.smoke else 5)
    console.print(f"host cost per call on this CPU, no grad, x (1, {host['d']}), r {host['r']}: FusedAdapter "
                  f"{host['fused_module_us']:.1f} us up to the launch; eager adapter {host['eager_adapter_us']:.1f} us; "
                  f"one F.linear {host['linear_us']:.1f} us")
    result: dict[str, Any] = {
        "device": harness.device_label(device),
        **harness.versions(),
        "date": when.isoformat(timespec="seconds"),
        "command": "python -m benchmarks" + ("".join(" " + shlex.quote(a) for a in argv)),
        "copy_bw_gbps": copy_bw,
        "records": records,
        "models": model_records,
        "grouped": grouped_records,
        "host_cost": host,
    }
    report.print_tables(console, result, skips)
    if args.out is not None:
        stem = report.file_stem(result["device"], when)
        title = f"{result['device']} · {result['date']}"
        paths = [report.write_json(args.out / f"{stem}.json", result)]
        if records:
            paths.append(report.plot_speedup(records, args.out / f"{stem}_speedup.png", title))
            paths.append(report.plot_copy_bandwidth(records, args.out / f"{stem}_copy_bw.png", title))
        for path in paths:
            console.print(f"wrote {path}")
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
