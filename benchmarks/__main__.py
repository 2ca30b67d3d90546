"""Command line: ``python -m benchmarks [--smoke | --quick | --preset NAME] [--out DIR] ...``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

# spelled out here (the harness is imported only after TRITON_INTERPRET is settled); a test keeps them equal
OPS = ("forward", "forward_train", "backward", "forward_backward", "latency")
PROVIDERS = ("fused", "eager", "compile", "compile_max_autotune", "adapterhub")
GROUPED_PROVIDERS = ("single", "grouped", "separate", "eager_loop", "adapterhub_batchsplit")
INDEX_KINDS = ("sequence", "token")
PRESETS = ("headline", "train")

# The headline preset (what the GPU acceptance run times): kernel shapes as (M, d, r, dtype, ops, providers);
# one mixed batch as ((sequences, tokens), d, r, dtype, adapters); the model providers. ``--smoke`` runs the
# tiny CPU versions through the interpreter.
TRAIN_OPS = ("forward", "forward_backward")
SIDE_BY_SIDE = ("fused", "eager", "compile")
HEADLINE_KERNELS = {
    "gpu": ((16384, 4096, 64, "bfloat16", TRAIN_OPS, SIDE_BY_SIDE),  # x 16384 × 4096
            (4096, 768, 48, "bfloat16", TRAIN_OPS, SIDE_BY_SIDE),  # the BERT-base adapter site
            (1, 1024, 64, "bfloat16", ("latency",), SIDE_BY_SIDE)),  # batch-1 latency
    "smoke": ((64, 64, 16, "float32", TRAIN_OPS, SIDE_BY_SIDE),
              (32, 48, 12, "float32", TRAIN_OPS, ("fused", "eager")),
              (1, 64, 16, "float32", ("latency",), ("fused", "eager"))),
}
HEADLINE_GROUPED = {"gpu": ((64, 128), 4096, 64, "bfloat16", 8), "smoke": ((8, 4), 64, 16, "float32", 8)}
HEADLINE_BERT_PROVIDERS = ("fused", "eager")
EXIT_INTERRUPTED = 130


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
                           "a tiny grouped case); with --preset, the preset's tiny CPU version")
    grid.add_argument("--quick", action="store_true", help="a small subset of the full shape grid")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="headline: the shapes, models and mixed batch the GPU acceptance run times (targets "
                             "table at the end); train: one transformers.Trainer epoch of a small BERT with "
                             "AdapterHub's adapters, AdapterHub accelerated and ours (tokens/s, peak memory)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: start no new measurement after this (the rest is recorded as skipped)")
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
    args = parser.parse_args(argv)
    if args.models_only and args.grouped_only:
        parser.error("--models-only and --grouped-only exclude each other")
    if args.preset is not None:
        narrowing = [name for name in ("providers", "ops", "d", "r", "rows", "dtypes", "grouped_adapters",
                                       "grouped_batches", "grouped_index", "grouped_providers")
                     if getattr(args, name) is not None] + (["quick"] if args.quick else [])
        if narrowing:
            parser.error(f"--preset fixes the workloads; drop --{', --'.join(n.replace('_', '-') for n in narrowing)}")
    return args


def missing_extras(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Optional packages the chosen options need, checked before any work: (lines naming each missing
    package that the run cannot do without and the extra that installs it, notes on missing packages whose
    comparisons will be recorded as skipped)."""

    def absent(package: str) -> bool:
        if sys.modules.get(package) is not None:  # imported already (some set no __spec__, which find_spec rejects)
            return False
        return importlib.util.find_spec(package) is None

    train = args.preset == "train"
    kernels = not (args.models_only or args.grouped_only or train)
    run_models = not (args.no_models or args.grouped_only)
    run_grouped = not (args.no_grouped or args.models_only or train)
    hub_named = "adapterhub" in (args.providers or ()) or "adapterhub_batchsplit" in (args.grouped_providers or ())
    needs = [
        ("rich", not train, "tables and progress", "bench"),
        ("matplotlib", args.out is not None and kernels, "plots written with --out", "bench"),
        ("transformers", run_models, "model-level benchmarks; or pass --no-models", "hf"),
        ("adapters", hub_named, "the AdapterHub providers named in --providers/--grouped-providers", "adapterhub"),
    ]
    missing = [f"  {package} ({why}): pip install -e '.[{extra}]'"
               for package, needed, why, extra in needs if needed and absent(package)]
    notes = []
    hub_by_default = (run_models or (run_grouped and args.grouped_providers is None)
                      or (kernels and args.providers is None and not args.smoke and args.preset is None))
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

    if args.smoke and args.preset != "train":
        return "cpu"
    if args.device == "auto":
        if torch.cuda.is_available() or args.preset == "train":
            return "cuda" if torch.cuda.is_available() else "cpu"
        sys.exit("python -m benchmarks: no CUDA device; use --smoke for the CPU (Triton interpreter) run, "
                 "or --device cpu with a small grid")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m benchmarks: --device cuda but no CUDA device is available")
    return args.device


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks described by ``argv``; print the tables; write results when --out is given.
    Exit status 1 when a measurement of our own op failed (a skip for lack of time or a missing optional
    package is not a failure), 130 when interrupted (what was measured is still printed and written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_extras(args)
    device_name = pick_device(args)
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv)
    if args.preset == "train":  # our op runs its plain PyTorch path on a CPU: no interpreter here
        from . import train

        return train.main(device_name, args.smoke, args.out, command, args.seed)
    if device_name == "cpu":
        # must precede the first import of the kernels (adapter_fused imports them lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return run(args, device_name, command)


def run(args: argparse.Namespace, device_name: str, command: str) -> int:
    """The kernel, model and mixed-batch benchmarks of ``args`` on ``device_name``."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import grouped, harness, host_cost, models, report

    device = torch.device(device_name)
    smoke = args.smoke or device.type == "cpu"
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    settings = harness.SMOKE_TIMING if args.smoke else harness.TimingSettings()
    if args.rep_ms is not None:
        settings = harness.TimingSettings(rep_ms=args.rep_ms, warmup_ms=settings.warmup_ms, warmup=settings.warmup,
                                          min_reps=settings.min_reps, max_reps=settings.max_reps)
    try:
        jobs, gspec, grouped_providers = plan(args, harness, grouped)
    except ValueError as exc:
        sys.exit(f"python -m benchmarks: {exc}")
    run_models = not args.no_models and not args.grouped_only
    grouped_cases = [] if args.no_grouped or args.models_only else grouped.expand_grouped(gspec)
    bert_spec = models.BERT_SMOKE if device.type == "cpu" else models.BERT_BASE
    gpt2_spec = models.GPT2_SMOKE if device.type == "cpu" else models.GPT2_MEDIUM
    bert_providers = HEADLINE_BERT_PROVIDERS if args.preset == "headline" else models.BERT_PROVIDERS
    if args.bert_batch:
        from dataclasses import replace

        bert_spec = replace(bert_spec, batch=args.bert_batch)

    console = Console()
    if not console.is_terminal:  # piped into a file or a CI log: do not squeeze the tables to 80 columns
        console = Console(width=200)
    started = time.perf_counter()
    deadline = started + args.time_limit if args.time_limit is not None else float("inf")
    when = datetime.now(timezone.utc)
    skips: list[harness.Skip] = []
    copy_bw = harness.copy_bandwidth_gbps(device, settings=settings)
    records: list[dict[str, Any]] = []
    model_records: list[dict[str, Any]] = []
    grouped_records: list[dict[str, Any]] = []
    host: dict[str, Any] = {}

    def kernels(case: Any, provider: str, ops: tuple[str, ...]) -> None:
        records.extend(harness.bench_case(case, [provider], ops, device, copy_bw, settings, args.activation,
                                          args.scale, args.seed, skips))

    def mixed(gcase: Any) -> None:
        grouped_records.extend(grouped.bench_grouped_case(
            gcase, gspec.n_adapters, gspec.index_kinds, grouped_providers, grouped.GROUPED_OPS, device, copy_bw,
            settings, args.activation, args.scale, args.seed, skips))

    def host_figures() -> None:
        d, r, dtype = (64, 16, "float32") if smoke else (1024, 64, "bfloat16")
        host.update(host_cost.measure(calls=500 if smoke else 4000, repeats=3 if smoke else 5))
        host["launch"] = host_cost.launch_overhead(device, d, r, dtype, iters=3 if smoke else 2000,
                                                   repeats=3 if smoke else 5)

    # (what, case, work): the steps in order; each is skipped once the time limit has passed
    steps: list[tuple[str, str, Callable[[], None]]] = [
        (provider, str(case), partial(kernels, case, provider, ops)) for case, ops, providers in jobs
        for provider in providers]
    if run_models:
        steps.append(("models", bert_spec.name, lambda: model_records.extend(models.bench_bert_training(
            bert_spec, bert_providers, device, settings, skips, args.seed))))
        steps.append(("models", gpt2_spec.name, lambda: model_records.extend(models.bench_gpt2_latency(
            gpt2_spec, models.GPT2_PROVIDERS, device, settings, skips, args.seed))))
        decoder = models.DECODER_SMOKE if device.type == "cpu" else models.DECODER
        steps.append(("models", decoder.name, lambda: model_records.extend(models.bench_decode(
            decoder, device, settings, skips, args.seed))))
    steps += [("grouped", str(gcase), partial(mixed, gcase)) for gcase in grouped_cases]
    if jobs:
        steps.append(("host cost", "one call", host_figures))
    interrupted, broken = False, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.no_progress, transient=True) as progress:
        task = progress.add_task("kernels", total=len(steps))
        for what, case_label, work in steps:
            progress.update(task, description=f"{what} {case_label}")
            if interrupted or time.perf_counter() > deadline:
                why = "interrupted" if interrupted else f"not started: time limit of {args.time_limit:g} s reached"
                skips.append(harness.Skip(what, "-", case_label, why))
            else:
                try:
                    work()
                except KeyboardInterrupt:
                    interrupted = True
                    skips.append(harness.Skip(what, "-", case_label, "interrupted"))
                except Exception as exc:  # noqa: BLE001 - recorded; the other steps still run
                    broken.append(f"{what} {case_label}: {harness._short(exc)}")
                    skips.append(harness.Skip(what, "-", case_label, broken[-1]))
            progress.advance(task)

    result: dict[str, Any] = {
        "device": harness.device_label(device), **harness.versions(), "date": when.isoformat(timespec="seconds"),
        "command": command, "copy_bw_gbps": copy_bw, "records": records, "models": model_records,
        "grouped": grouped_records, "host_cost": host or None, "train": None,
    }
    report.print_tables(console, result, skips)
    if host:
        console.print(f"host cost per call on this CPU (GPU launch path, launch a no-op), no grad, x (1, {host['d']}), "
                      f"r {host['r']}: FusedAdapter {host['fused_module_us']:.1f} us up to the launch; eager adapter "
                      f"{host['eager_adapter_us']:.1f} us; one F.linear {host['linear_us']:.1f} us")
    if "launch" in host:
        launch = host["launch"]
        console.print(f"launch on {launch['device']}, x (1, {launch['d']}): fused_adapter "
                      f"{launch['fused_call_us']:.1f} "
                      f"us per call; FusedAdapter with its bound kernel {launch['module_bound_us']:.1f} us (bound: "
                      f"{launch['module_bound']}), through Triton's launcher {launch['module_triton_launch_us']:.1f} "
                      f"us; torch add {launch['torch_add_us']:.1f} us")
    if args.preset == "headline" and not (args.models_only or args.no_models or args.grouped_only or args.no_grouped):
        judged = device.type == "cuda"
        console.print(f"\nTargets{'' if judged else ' (CPU: not judged)'}\n\n"
                      + report.targets_markdown(report.evaluate_targets(result, judge=judged)), markup=False)
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
    failed = broken + [f"{r['op']} {r['M']}x{r['d']} r={r['r']}" for r in records
                       if r["provider"] == "fused" and r["ms_median"] is None]
    failed += [f"{m['model']}" for m in model_records if m["provider"] == "fused" and m["ms_median"] is None]
    failed += [f"grouped {g['op']}" for g in grouped_records if g["provider"] == "grouped" and g["ms_median"] is None]
    if failed:
        console.print(f"python -m benchmarks: not measured: {'; '.join(failed)}", markup=False)
    return EXIT_INTERRUPTED if interrupted else int(bool(failed))


Job = tuple[Any, tuple[str, ...], list[str]]  # a kernel case, its ops, its providers


def plan(args: argparse.Namespace, harness: Any, grouped: Any) -> tuple[list[Job], Any, list[str]]:
    """(kernel jobs as (case, ops, providers), the mixed-batch spec, its providers) of ``args``: the
    preset's, or the grid narrowed by the options. ValueError for unknown names."""
    if args.preset == "headline":
        size = "smoke" if args.smoke else "gpu"
        jobs: list[Job] = [(harness.Case(M=M, d=d, r=r, dtype=harness.DTYPES[dtype]), tuple(ops), list(providers))
                           for M, d, r, dtype, ops, providers in HEADLINE_KERNELS[size]]
        (batch, seq), d, r, dtype, n = HEADLINE_GROUPED[size]
        gspec = grouped.GroupedSpec(batches=((batch, seq),), d=(d,), r=(r,), dtypes=(dtype,), n_adapters=(n,),
                                    index_kinds=("sequence",))
        return ([] if args.models_only or args.grouped_only else jobs), gspec, ["single", "grouped"]
    spec = harness.SMOKE_GRID if args.smoke else harness.QUICK_GRID if args.quick else harness.FULL_GRID
    spec = harness.GridSpec(
        d=tuple(int(v) for v in args.d) if args.d else spec.d,
        r=tuple(harness.parse_rank(v) for v in args.r) if args.r else spec.r,
        rows=tuple(int(v) for v in args.rows) if args.rows else spec.rows,
        dtypes=tuple(args.dtypes) if args.dtypes else spec.dtypes,
    )
    providers = args.providers or list(harness.SMOKE_PROVIDERS if args.smoke else harness.PROVIDERS)
    ops = tuple(args.ops or harness.OPS)
    gspec = grouped.SMOKE_GROUPED if args.smoke else grouped.QUICK_GROUPED if args.quick else grouped.FULL_GROUPED
    gspec = grouped.GroupedSpec(
        batches=tuple(grouped.parse_batch(v) for v in args.grouped_batches) if args.grouped_batches else gspec.batches,
        d=spec.d if args.d else gspec.d,
        r=spec.r if args.r else gspec.r,
        dtypes=spec.dtypes if args.dtypes else gspec.dtypes,
        n_adapters=tuple(int(v) for v in args.grouped_adapters) if args.grouped_adapters else gspec.n_adapters,
        index_kinds=tuple(args.grouped_index) if args.grouped_index else gspec.index_kinds,
    )
    grouped_providers = args.grouped_providers or list(grouped.GROUPED_PROVIDERS)
    for name, given, allowed in (("provider", providers, harness.PROVIDERS), ("op", ops, harness.OPS),
                                 ("grouped provider", grouped_providers, grouped.GROUPED_PROVIDERS),
                                 ("index kind", gspec.index_kinds, grouped.INDEX_KINDS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            raise ValueError(f"unknown {name} {', '.join(unknown)}; expected {', '.join(allowed)}")
    if any(n < 1 for n in gspec.n_adapters):
        raise ValueError("--grouped-adapters must be positive")
    cases = [] if args.models_only or args.grouped_only else harness.expand_grid(spec)
    return [(case, tuple(harness.ops_for(case, ops)), providers) for case in cases], gspec, grouped_providers


if __name__ == "__main__":
    raise SystemExit(main())
