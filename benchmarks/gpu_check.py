"""The GPU acceptance run: ``bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR`` (this module's ``main``).

One command turns a short GPU window into numbers. Each stage runs as its own process under its own
time limit, all within ``--total`` seconds (455 by default); a stage that fails or runs out of time
(interrupted, then killed after a grace period) does not stop the next:

- ``install``: ``pip install --no-deps --no-build-isolation -e .`` when ``adapter_fused.kernels`` does not
  import (skipped when it does);
- ``environment``: Python, platform, library versions, optional packages, ``nvidia-smi`` (GPU, driver,
  clocks, power) and what torch sees (device, SM count, memory);
- ``tests``: the ``gpu``-marked tests and the core parity tests, through pytest's ``-k`` and ``--junitxml``;
- ``kernels``: ``python -m benchmarks --preset headline --no-models --out OUT_DIR`` (the headline kernel
  shapes, the mixed batch of 8 adapters, the host cost of one call and the launch overhead; the results
  file, the device copy bandwidth and the plots);
- ``models``: ``python -m benchmarks --preset headline --models-only`` (GPT-2 medium batch-1 latency, a
  BERT-base training step), merged into the same results file;
- then ``gpu_check.json``: each stage's status (passed, failed, timed-out, skipped), reason and seconds,
  the environment, the test counts, and the targets table (``benchmarks.report.evaluate_targets``).

OUT_DIR receives at most 8 flat files: ``gpu_check.log`` (everything printed), ``gpu_check.json``,
``gpu_check_junit.xml``, ``adapter_bench_<device>_<date>.json`` in the schema of ``python -m benchmarks
--out`` and its two plots. The exit status is 0 when every stage passed or had nothing to do, 1 when a
stage failed, timed out or was not started for lack of time, 2 for a usage error. ``--dry-run`` runs
everything on the CPU through Triton's interpreter at tiny sizes: it checks the plumbing, never the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path
from typing import Any, TextIO

LOG_NAME, SUMMARY_NAME, JUNIT_NAME = "gpu_check.log", "gpu_check.json", "gpu_check_junit.xml"
MAX_OUT_FILES = 8
STATUSES = ("passed", "failed", "timed-out", "skipped")
TOTAL_LIMIT = 455.0
GRACE = 10.0
"""Seconds between the interrupt at a stage's limit and the kill."""
TABLE_RESERVE = 10.0
"""Seconds kept back at every stage for writing the summary."""
TEST_FILES = ("tests/test_cuda_graphs.py", "tests/test_ops.py", "tests/test_compile.py")  # gpu-marked tests first
GPU_TEST_SELECTION = "gpu or fullgraph or test_every_activation_and_dtype"
DRY_TEST_SELECTION = "gpu or test_every_activation_and_dtype and relu and float32 or test_forward_is_one_launch"


@dataclass
class Result:
    """A stage's outcome: status, why, its exit status, seconds, limit and what it recorded."""

    status: str
    reason: str | None = None
    exit_code: int | None = None
    seconds: float | None = None
    limit_seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """One acceptance run: options, output and scratch directories, the log, and every stage's result."""

    out: Path
    work: Path
    dry_run: bool
    total: float
    log: TextIO
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    results: dict[str, Result] = field(default_factory=dict)

    def say(self, text: str) -> None:
        """Print and log one line."""
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def command(self, argv: Sequence[str], limit: float) -> Result:
        """Run ``argv`` (output into the log) under ``limit`` seconds: interrupted at the limit, killed
        ``GRACE`` seconds later. Exit status 0 passes; anything else fails."""
        self.say("$ " + " ".join(argv))
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", start_new_session=True)

        def copy() -> None:
            for line in proc.stdout or ():
                self.say(line.rstrip("\n"))

        copier = threading.Thread(target=copy)
        copier.start()
        try:
            code, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                code = proc.wait()
            timed_out = True
        copier.join()
        if timed_out:
            return Result("timed-out", f"stopped at its {limit:.0f} s limit; partial results kept", code)
        return Result("passed" if code == 0 else "failed", None if code == 0 else f"exit status {code}", code)

    def bench(self, part: str, out: Path, limit: float) -> Result:
        """``python -m benchmarks --preset headline`` for one part, stopping new measurements in time."""
        own_limit = max(1.0, limit - max(20.0, 0.2 * limit))
        argv = [sys.executable, "-m", "benchmarks", "--preset", "headline", part, "--out", str(out), "--no-progress",
                "--time-limit", f"{own_limit:.0f}"]
        return self.command(argv + (["--smoke"] if self.dry_run else []), limit)


def _signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group a stage's command leads (it may have ended meanwhile)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stage_install(run: Run, limit: float) -> Result:
    """Install the project in editable mode when its kernels do not import."""
    check = [sys.executable, "-c", "import adapter_fused.kernels"]
    if subprocess.run(check, check=False, capture_output=True, timeout=limit).returncode == 0:
        return Result("skipped", "adapter_fused already importable")
    done = run.command([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                       limit)
    if done.status == "passed" and subprocess.run(check, check=False, timeout=limit).returncode != 0:
        done = Result("failed", "installed, but adapter_fused.kernels still does not import", done.exit_code)
    return done


TORCH_PROBE = """import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
print(json.dumps(info))"""
SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "memory.total")


def stage_environment(run: Run, limit: float) -> Result:
    """The machine, the versions, what torch sees; fails on a GPU run without a CUDA device."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    data: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "versions": {n: version(n) for n in ("torch", "triton", "transformers", "numpy", "pytest", "adapters")},
        "optional_packages": {n: util.find_spec(n) is not None for n in
                              ("matplotlib", "rich", "hypothesis", "adapters", "transformers")},
    }
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE], check=False, capture_output=True, text=True,
                           timeout=limit)
    data["torch"] = json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-500:]}
    smi = shutil.which("nvidia-smi")
    if smi and not run.dry_run:
        done = subprocess.run([smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"], check=False,
                              capture_output=True, text=True, timeout=min(limit, 15))
        values = [v.strip() for v in done.stdout.split(",")]
        data["nvidia_smi"] = dict(zip(SMI_FIELDS, values)) if done.returncode == 0 else done.stderr.strip()
    run.say(json.dumps(data, indent=1))
    if "error" in data["torch"]:
        return Result("failed", "torch does not import", data=data)
    if not data["torch"].get("cuda_available") and not run.dry_run:
        return Result("failed", "no CUDA device visible to torch", data=data)
    return Result("passed", data=data)


def stage_tests(run: Run, limit: float) -> Result:
    """The selected tests; counts from the JUnit file."""
    junit = run.out / JUNIT_NAME
    selection = DRY_TEST_SELECTION if run.dry_run else GPU_TEST_SELECTION
    done = run.command([sys.executable, "-m", "pytest", *TEST_FILES, "-k", selection, "-p", "no:cacheprovider", "-q",
                        "-rfEs", "--tb=short", f"--junitxml={junit}", "-o", "junit_suite_name=gpu_check"], limit)
    if junit.exists():
        suite = ET.parse(junit).getroot().find("testsuite")
        if suite is not None:
            done.data["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return done


def stage_kernels(run: Run, limit: float) -> Result:
    """Kernel shapes, mixed batch, host cost: the results file and plots straight into OUT."""
    return run.bench("--no-models", run.out, limit)


def stage_models(run: Run, limit: float) -> Result:
    """Model workloads, into the scratch directory (merged into the results file at the end)."""
    return run.bench("--models-only", run.work / "models", limit)


@dataclass(frozen=True)
class Stage:
    """A stage: its name, its time limit on a GPU run, and what it does."""

    name: str
    budget: float
    run: Callable[[Run, float], Result]


STAGES = (Stage("install", 30, stage_install), Stage("environment", 20, stage_environment),
          Stage("tests", 135, stage_tests), Stage("kernels", 165, stage_kernels), Stage("models", 90, stage_models))


def results_file(run: Run) -> tuple[Path | None, dict[str, Any]]:
    """The results file in OUT, with the model records merged in (written back); (None, {}) when no stage
    wrote one."""
    from . import report

    found = sorted(run.out.glob("adapter_bench_*.json"))
    models = sorted((run.work / "models").glob("adapter_bench_*.json"))
    if not found and not models:
        return None, {}
    path = found[-1] if found else run.out / models[-1].name
    result = json.loads((found[-1] if found else models[-1]).read_text(encoding="utf-8"))
    if found and models:
        result["models"] = json.loads(models[-1].read_text(encoding="utf-8"))["models"]
    result["command"] = "bash benchmarks/gpu_check.sh" + (" --dry-run" if run.dry_run else "")
    return report.write_json(path, result), result


def summarize(run: Run) -> dict[str, Any]:
    """Merge the results, judge the targets, write ``gpu_check.json``; returns it."""
    summary: dict[str, Any] = {
        "mode": "dry-run" if run.dry_run else "gpu", "started": run.started_at, "total_seconds": None, "time_limit_seconds": run.total,
        "stages": {name: vars(result) for name, result in run.results.items()}, "results_file": None,
    }
    try:
        from . import report

        path, result = results_file(run)
        rows = report.evaluate_targets(result, judge=not run.dry_run)
        host = result.get("host_cost") or {}
        summary.update(results_file=path.name if path else None, device=result.get("device"),
                       copy_bw_gbps=result.get("copy_bw_gbps"), host_cost_target=host.get("target"),
                       launch_overhead=host.get("launch"), targets=[vars(r) for r in rows],
                       targets_markdown=report.targets_markdown(rows))
        run.say(f"\n## Targets{' (dry run: CPU, tiny shapes; not judged)' if run.dry_run else ''}\n\n"
                + summary["targets_markdown"])
    except Exception as exc:  # noqa: BLE001 - the summary is written whatever happened
        summary["summary_error"] = f"{type(exc).__name__}: {exc}"
        run.say(f"could not merge the results or judge the targets: {summary['summary_error']}")
    summary["total_seconds"] = round(time.monotonic() - run.started, 1)
    summary["out_files"] = sorted({p.name for p in run.out.iterdir() if p.is_file()} | {SUMMARY_NAME})
    (run.out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options (bad ones exit with status 2)."""
    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (flat, at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--total", type=float, default=TOTAL_LIMIT, help="seconds for the whole run")
    parser.add_argument("--budgets", default="", help="STAGE=SECONDS,... overriding stage limits")
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    args = parser.parse_args(argv)
    names = [s.name for s in STAGES]
    try:
        args.budgets = {k: float(v) for k, v in (item.split("=") for item in args.budgets.split(",") if item)}
    except ValueError:
        parser.error(f"--budgets: expected STAGE=SECONDS,... with stages {', '.join(names)}")
    args.stages = args.stages.split(",") if args.stages else names
    unknown = [n for n in [*args.budgets, *args.stages] if n not in names]
    if unknown or args.total <= 0 or any(v <= 0 for v in args.budgets.values()):
        parser.error(f"unknown stage {', '.join(unknown)} (stages: {', '.join(names)})" if unknown
                     else "time limits must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages; write the summary; 0 when every stage passed or had nothing to do, else 1."""
    args = parse_args(argv)
    args.out = args.out.resolve()  # relative to where the command was given
    os.chdir(Path(__file__).resolve().parents[1])
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.update({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""} if args.dry_run else
               {"TRITON_PRINT_AUTOTUNING": os.environ.get("TRITON_PRINT_AUTOTUNING", "1")})
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as work, open(args.out / LOG_NAME, "w") as log:
        run = Run(args.out, Path(work), args.dry_run, args.total, log)
        mode = "dry-run" if args.dry_run else "gpu"
        run.say(f"gpu_check ({mode}) {run.started_at} on {platform.node()}, "
                f"python {sys.executable}, output {run.out}, time limit {args.total:.0f} s")
        for stage in STAGES:
            if stage.name not in args.stages:
                run.results[stage.name] = Result("skipped", "not selected (--stages)")
                continue
            budget = args.budgets.get(stage.name, stage.budget)
            limit = min(budget, args.total - (time.monotonic() - run.started) - TABLE_RESERVE)
            if limit < min(5.0, budget):
                run.results[stage.name] = Result("skipped", "not started: no time left", limit_seconds=round(limit, 1))
                run.say(f"\n=== {stage.name}: not started, {limit:.0f} s left ===")
                continue
            run.say(f"\n=== {stage.name} (limit {limit:.0f} s) ===")
            start = time.monotonic()
            try:
                result = stage.run(run, limit)
            except Exception as exc:  # noqa: BLE001 - a broken stage is recorded; the next one still runs
                result = Result("failed", f"{type(exc).__name__}: {exc}")
            result.seconds, result.limit_seconds = round(time.monotonic() - start, 1), round(limit, 1)
            run.results[stage.name] = result
            run.say(f"=== {stage.name}: {result.status} in {result.seconds} s"
                    + (f" ({result.reason})" if result.reason else "") + " ===")
        summary = summarize(run)
        bad = [n for n, r in run.results.items() if r.status in ("failed", "timed-out")
               or r.reason == "not started: no time left"]
        run.say("\n## Stages\n\n" + "\n".join(f"- {n}: {r.status}, {r.seconds} s of {r.limit_seconds}"
                                            + (f" ({r.reason})" if r.reason else "") for n, r in run.results.items()))
        counts = run.results.get("tests", Result("skipped")).data.get("counts")
        if counts:
            run.say(f"\ntests: {counts['tests']} run, {counts['failures']} failed, {counts['errors']} errors, "
                    f"{counts['skipped']} skipped")
        run.say(f"\nfiles in {run.out}: {', '.join(summary['out_files'])}\ngpu_check ({mode}): "
                f"{summary['total_seconds']} s of {args.total:.0f} s; "
                + (f"stages not passed: {', '.join(bad)}" if bad else "every stage passed or had nothing to do"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
