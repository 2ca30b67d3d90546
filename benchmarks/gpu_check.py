"""The stages of ``benchmarks/gpu_check.sh``: one command that turns a short GPU window into numbers.

``bash benchmarks/gpu_check.sh OUT_DIR`` runs each stage below as its own process under its own time
limit (``python -m benchmarks.gpu_check STAGE ...``), so a stage that fails, hangs or runs out of time
does not stop the next one. Every stage writes a record (status, seconds, what it measured) into a
scratch directory; the ``table`` stage merges them into ``OUT_DIR/gpu_check.json`` and prints the
targets table. With ``--dry-run`` everything runs on the CPU through Triton's interpreter at tiny sizes:
it checks the plumbing, never the speed.

Stages:

- ``install``: make ``adapter_fused`` importable (``pip install --no-deps --no-build-isolation -e .``
  when it is not), with whatever python runs this.
- ``environment``: GPU name, SM count, clocks (``nvidia-smi``), library versions, optional packages
  present, and the device-to-device copy bandwidth (GB/s counting read + write).
- ``tests``: the ``gpu``-marked tests and the core parity tests (every dtype, past 2**31 elements, CUDA
  graph capture and replay, torch.compile with fullgraph), gpu-marked ones first; pass/fail counts are
  recorded after every test, so a run cut short still counts what finished.
- ``kernels``: the headline shapes only, through the benchmark harness: x (16384, 4096) bf16 r 64 and
  the BERT-base adapter site (4096 rows, d 768, r 48), forward and forward+backward, fused against
  eager and torch.compile; batch-1 latency at d 1024, r 64; the launch overhead of one small fused
  call; and, when time is left, 8 adapters in one grouped batch against one adapter.
- ``models``: GPT-2 medium batch-1 inference latency (base, eager and fused adapters) and a BERT-base
  Houlsby training step (tokens/s, fused and eager adapters), from configs with random weights.
- ``plots``: the speedup and copy-bandwidth plots of ``python -m benchmarks`` (needs matplotlib).
- ``table``: ``gpu_check.json`` and the targets table, each target met or its measured gap.

Files in OUT_DIR (flat, at most 8): ``gpu_check.log`` (written by the shell script), ``gpu_check.json``,
``gpu_check_junit.xml``, ``adapter_bench_<device>_<date>.json`` in the schema of ``python -m benchmarks
--out`` (to be committed under ``benchmarks/results/``) and its two PNG plots.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .naming import file_stem

STAGES: tuple[str, ...] = ("install", "environment", "tests", "kernels", "models", "plots", "table")
STATUSES: tuple[str, ...] = ("passed", "failed", "timed-out", "skipped")
SKIP_EXIT = 3
"""Exit status of a stage that had nothing to do (its record says why)."""
TIMEOUT_EXITS = (124, 137)
"""Exit statuses of ``timeout``: the limit passed (124), or the stage ignored the interrupt and was killed."""

LOG_NAME = "gpu_check.log"
SUMMARY_NAME = "gpu_check.json"
JUNIT_NAME = "gpu_check_junit.xml"
MAX_OUT_FILES = 8
STATUS_FILE = "status.tsv"
"""Written by the shell script into the scratch directory: stage, exit status, seconds, limit, note."""

# The results file of ``python -m benchmarks --out`` (``benchmarks.report``), spelled out here because
# that module needs ``rich``, which the GPU image may lack; a test keeps the two equal.
RESULTS_KEYS: tuple[str, ...] = ("device", "torch", "triton", "date", "command", "copy_bw_gbps", "records", "models",
                                 "grouped", "host_cost")

# Targets (the table stage judges the measurements against them).
FORWARD_COPY_BW_PCT = 85.0
FORWARD_MIN_ELEMENTS = 2**25
FWD_BWD_VS_EAGER = 2.5
FWD_BWD_VS_COMPILE = 1.5
FWD_BWD_MIN_ROWS = 4096
GPT2_MAX_OVERHEAD = 0.05
GROUPED_ADAPTERS = 8  # benchmarks.grouped.TARGET_ADAPTERS (a test keeps them equal)
GROUPED_MAX_RATIO = 1.15  # benchmarks.grouped.TARGET_RATIO

# Test selection: files and a -k expression (pytest's -k also matches marker names, so "gpu" picks every
# gpu-marked test in these files).
TEST_FILES: tuple[str, ...] = ("tests/test_ops.py", "tests/test_cuda_graphs.py", "tests/test_compile.py")
GPU_TEST_SELECTION = "gpu or fullgraph or test_every_activation_and_dtype"
DRY_TEST_SELECTION = "gpu or test_every_activation_and_dtype and relu and float32 or test_forward_is_one_launch"


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class KernelItem:
    """One kernel shape of the ``kernels`` stage: x (M, d), bottleneck r, the ops and providers timed,
    and the fewest seconds that must be left in the stage to start it."""

    name: str
    M: int
    d: int
    r: int
    dtype: str
    ops: tuple[str, ...]
    providers: tuple[str, ...]
    min_seconds: float


@dataclass(frozen=True)
class GroupedItem:
    """The optional mixed-adapter batch: (batch, seq, d) rows, bottleneck r, n adapters per sequence."""

    batch: int
    seq: int
    d: int
    r: int
    dtype: str
    n_adapters: int
    min_seconds: float


@dataclass(frozen=True)
class Plan:
    """What the measuring stages run: the GPU plan, or the tiny CPU one of a dry run."""

    kernels: tuple[KernelItem, ...]
    grouped: GroupedItem
    launch_iters: int
    launch_repeats: int
    copy_bytes: int
    test_selection: str


TRAIN = ("forward", "forward_backward")
SIDE_BY_SIDE = ("fused", "eager", "compile")
GPU_PLAN = Plan(
    kernels=(
        KernelItem("headline", 16384, 4096, 64, "bfloat16", TRAIN, SIDE_BY_SIDE, 25.0),
        KernelItem("bert_site", 4096, 768, 48, "bfloat16", TRAIN, SIDE_BY_SIDE, 20.0),
        KernelItem("batch1_latency", 1, 1024, 64, "bfloat16", ("latency",), SIDE_BY_SIDE, 15.0),
    ),
    grouped=GroupedItem(64, 128, 4096, 64, "bfloat16", GROUPED_ADAPTERS, 30.0),
    launch_iters=2000,
    launch_repeats=5,
    copy_bytes=1 << 30,
    test_selection=GPU_TEST_SELECTION,
)
DRY_PLAN = Plan(
    kernels=(
        KernelItem("headline", 64, 64, 16, "float32", TRAIN, SIDE_BY_SIDE, 5.0),
        KernelItem("bert_site", 32, 48, 12, "float32", TRAIN, ("fused", "eager"), 5.0),
        KernelItem("batch1_latency", 1, 64, 16, "float32", ("latency",), ("fused", "eager"), 5.0),
    ),
    grouped=GroupedItem(8, 4, 64, 16, "float32", GROUPED_ADAPTERS, 5.0),
    launch_iters=10,
    launch_repeats=3,
    copy_bytes=1 << 24,
    test_selection=DRY_TEST_SELECTION,
)


def plan_for(dry_run: bool) -> Plan:
    """The dry-run plan or the GPU plan."""
    return DRY_PLAN if dry_run else GPU_PLAN


# ---------------------------------------------------------------- small helpers


@dataclass
class Deadline:
    """The time a stage has left: its limit minus a margin for writing its record before the interrupt."""

    budget: float
    started: float = field(default_factory=time.monotonic)

    @property
    def margin(self) -> float:
        """Seconds kept back at the end of the stage."""
        return min(10.0, max(2.0, 0.05 * self.budget))

    def left(self) -> float:
        """Seconds left before the margin."""
        return self.budget - self.margin - (time.monotonic() - self.started)


def short_error(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def write_json_file(path: Path, payload: Any, ascii_only: bool = False) -> Path:
    """Write ``payload`` as indented JSON, replacing ``path`` in one step (a partial file is never left)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str, ensure_ascii=ascii_only) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json_file(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def started_at(epoch: float) -> datetime:
    """The run's start time (UTC) from the epoch seconds the shell script passes to every stage."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    """Whether ``module`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def kernels_import_problem() -> str | None:
    """None when the Triton kernels import in this process, else the error (the fused provider would be
    reported as unavailable without it)."""
    try:
        import adapter_fused.kernels  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        return short_error(exc)
    return None


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    def cell(value: Any) -> str:
        return "—" if value is None or value == "" else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (``—`` when None)."""
    return "—" if value is None else format(value, spec) + suffix


@dataclass
class StageRecord:
    """What a stage writes into the scratch directory: its own verdict, why, what it measured, and the
    parts it skipped with their reasons."""

    stage: str
    status: str = "passed"
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def skip(self, item: str, reason: str) -> None:
        """Note a part of the stage that did not run, and why."""
        self.skipped.append({"item": item, "reason": reason})
        print(f"  skipped {item}: {reason}", flush=True)

    def save(self, work: Path) -> None:
        """Write the record (again) into ``work``; called as the stage goes, so an interrupt loses little."""
        payload = {"stage": self.stage, "status": self.status, "reason": self.reason,
                   "seconds": round(time.monotonic() - self.started, 3), "skipped": self.skipped, "data": self.data}
        write_json_file(work / f"{self.stage}.json", payload)


# ---------------------------------------------------------------- results file


def results_path(out: Path, device: str, epoch: float) -> Path:
    """Where the results file of this run goes."""
    return out / f"{file_stem(device, started_at(epoch))}.json"


def find_results(out: Path) -> Path | None:
    """The results file in ``out`` (the newest when there are several)."""
    found = sorted(out.glob("adapter_bench_*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def update_results(out: Path, device: str, epoch: float, dry_run: bool, **parts: Any) -> Path:
    """Create or update the results file (the schema of ``python -m benchmarks --out``) with ``parts``
    (any of ``records``, ``models``, ``grouped``, ``copy_bw_gbps``, ``host_cost``)."""
    import torch
    import triton

    path = results_path(out, device, epoch)
    current = read_json_file(path)
    if not isinstance(current, dict) or set(current) != set(RESULTS_KEYS):
        current = {
            "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": started_at(epoch).isoformat(timespec="seconds"),
            "command": "bash benchmarks/gpu_check.sh" + (" --dry-run" if dry_run else ""),
            "copy_bw_gbps": None, "records": [], "models": [], "grouped": [], "host_cost": None,
        }
    unknown = set(parts) - set(RESULTS_KEYS)
    if unknown:
        raise ValueError(f"not results-file keys: {sorted(unknown)}")
    current.update(parts)
    return write_json_file(path, {key: current[key] for key in RESULTS_KEYS}, ascii_only=True)  # as report.write_json


# ---------------------------------------------------------------- stage: install


def _kernels_import_error(python: str) -> str | None:
    """None when ``python`` imports ``adapter_fused.kernels`` in a fresh process, else its last error line."""
    done = subprocess.run([python, "-c", "import adapter_fused.kernels"], check=False, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def stage_install(args: argparse.Namespace, record: StageRecord) -> int:
    """Install the project in editable mode (no dependencies, no build isolation) when the kernels do
    not import; skipped when they do."""
    python = sys.executable
    record.data["python"] = python
    error = _kernels_import_error(python)
    if error is None:
        record.status, record.reason = "skipped", "adapter_fused already importable"
        print(f"adapter_fused imports with {python}: nothing to install", flush=True)
        return SKIP_EXIT
    print(f"adapter_fused.kernels does not import ({error}); installing with {python}", flush=True)
    command = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    record.data["command"] = " ".join(command)
    done = subprocess.run(command, check=False, stdin=subprocess.DEVNULL)
    error = _kernels_import_error(python)
    if done.returncode != 0 or error is not None:
        record.status = "failed"
        record.reason = f"pip exit status {done.returncode}; import: {error or 'ok'}"
        return 1
    return 0


# ---------------------------------------------------------------- stage: environment


NVIDIA_SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                     "power.draw", "power.limit", "temperature.gpu", "memory.total")


def nvidia_smi_query() -> tuple[dict[str, str] | None, str | None]:
    """(``nvidia-smi --query-gpu`` fields of GPU 0, None) or (None, why it could not be asked)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not found"
    try:
        done = subprocess.run([exe, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
                              check=False, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, short_error(exc)
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip()[:300] or f"exit status {done.returncode}"
    first = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    values = [v.strip() for v in first.split(",")]
    if len(values) != len(NVIDIA_SMI_FIELDS):
        return None, f"unexpected output: {first[:200]!r}"
    return dict(zip(NVIDIA_SMI_FIELDS, values)), None


def copy_bandwidth(device: Any, nbytes: int, repeats: int = 20) -> dict[str, Any]:
    """Copy bandwidth of ``device`` in GB/s counting read + write (2 · nbytes per copy): the median of
    ``repeats`` timed copies of an ``nbytes`` tensor (CUDA events on a GPU, perf_counter on a CPU)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"gbps": 2 * src.numel() * 4 / median / 1e9, "bytes": src.numel() * 4, "median_ms": median * 1e3,
            "repeats": repeats, "method": "CUDA events" if device.type == "cuda" else "perf_counter"}


def stage_environment(args: argparse.Namespace, record: StageRecord) -> int:
    """Record the machine, the library versions and the measured copy bandwidth."""
    data = record.data
    data["python"] = platform.python_version()
    data["platform"] = platform.platform()
    data["cpu_count"] = os.cpu_count()
    data["versions"] = {name: package_version(name) for name in
                        ("torch", "triton", "transformers", "numpy", "pytest", "setuptools", "adapter-fused")}
    data["optional_packages"] = {name: importable(name) for name in
                                 ("matplotlib", "rich", "hypothesis", "adapters", "transformers", "pytest")}
    data["env"] = {k: os.environ[k] for k in ("TRITON_INTERPRET", "TRITON_PRINT_AUTOTUNING", "CUDA_VISIBLE_DEVICES")
                   if k in os.environ}
    record.save(args.work)
    import torch

    data["kernels_import_error"] = kernels_import_problem()
    if data["kernels_import_error"]:
        print(f"the Triton kernels do not import: {data['kernels_import_error']}", flush=True)
    data["torch_cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    data["cuda_available"] = cuda
    if cuda:
        props = torch.cuda.get_device_properties(0)
        data["gpu"] = {"name": props.name, "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
                       "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                       "device_count": torch.cuda.device_count()}
    elif args.dry_run:
        record.skip("gpu", "dry run: no CUDA device")
    else:
        record.status, record.reason = "failed", "no CUDA device visible to torch"
    smi, why = nvidia_smi_query() if (cuda or not args.dry_run) else (None, "dry run: no GPU")
    if smi is not None:
        data["nvidia_smi"] = smi
    else:
        record.skip("nvidia-smi", why or "unavailable")
    device = torch.device("cuda" if cuda else "cpu")
    nbytes = plan_for(args.dry_run).copy_bytes
    try:
        data["copy_bandwidth"] = {"device": str(device), **copy_bandwidth(device, nbytes)}
    except Exception as exc:  # noqa: BLE001 - recorded; the rest of the environment is still reported
        record.status, record.reason = "failed", f"copy bandwidth: {short_error(exc)}"
    versions = data["versions"]
    print(f"python {data['python']} · torch {versions['torch']} (CUDA {data['torch_cuda']}) · triton "
          f"{versions['triton']} · transformers {versions['transformers']} · numpy {versions['numpy']}", flush=True)
    if "gpu" in data:
        gpu = data["gpu"]
        print(f"GPU: {gpu['name']}, {gpu['sm_count']} SMs, sm_{gpu['capability'].replace('.', '')}, "
              f"{gpu['memory_gib']} GiB", flush=True)
    if smi is not None:
        print("nvidia-smi: " + ", ".join(f"{k}={v}" for k, v in smi.items()), flush=True)
    missing = [name for name, present in data["optional_packages"].items() if not present]
    print(f"optional packages missing: {', '.join(missing) or 'none'}", flush=True)
    if "copy_bandwidth" in data:
        bw = data["copy_bandwidth"]
        print(f"copy bandwidth ({bw['device']}, {bw['bytes'] / 2**20:.0f} MiB, read + write): {bw['gbps']:.1f} GB/s",
              flush=True)
    return 0 if record.status == "passed" else 1


# ---------------------------------------------------------------- stage: tests

HYPOTHESIS_STAND_IN = '''"""Stand-in for hypothesis, which is not installed: modules import, property-based tests skip."""
import pytest


class _Anything:
    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return self


strategies = _Anything()
settings = _Anything()
HealthCheck = _Anything()


def given(*args, **kwargs):
    return pytest.mark.skip(reason="hypothesis is not installed")


def example(*args, **kwargs):
    return lambda fn: fn
'''


class TestRecorder:
    """A pytest plugin: puts gpu-marked tests first (then fullgraph compile tests, then the rest), and
    records every test's outcome and duration into the stage record as it finishes."""

    __test__ = False  # not a test class

    def __init__(self, record: StageRecord, work: Path) -> None:
        self.record = record
        self.work = work
        self.outcomes: dict[str, str] = {}
        self.durations: dict[str, float] = {}
        self.failures: list[dict[str, str]] = []
        self.selected = 0

    @staticmethod
    def priority(item: Any) -> int:
        """0: gpu-marked; 1: torch.compile fullgraph; 2: the rest."""
        if item.get_closest_marker("gpu") is not None:
            return 0
        return 1 if "fullgraph" in item.name else 2

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        """Order the tests (stable within each priority)."""
        items.sort(key=self.priority)

    def pytest_collection_finish(self, session: Any) -> None:
        """Note how many tests were selected."""
        self.selected = len(session.items)
        self._save()

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Fold one phase's report into the test's outcome."""
        node = report.nodeid
        self.durations[node] = self.durations.get(node, 0.0) + float(report.duration)
        outcome: str | None = None
        if report.when == "call":
            outcome = "skipped" if hasattr(report, "wasxfail") else report.outcome
        elif report.failed:
            outcome = "error"
        elif report.skipped and report.when == "setup":
            outcome = "skipped"
        if outcome is None:
            return
        if outcome in ("failed", "error") or node not in self.outcomes:
            self.outcomes[node] = outcome
        if outcome in ("failed", "error"):
            text = getattr(report, "longreprtext", "") or ""
            self.failures.append({"test": node, "when": report.when, "message": text.strip()[-800:]})
        self._save()

    def counts(self) -> dict[str, int]:
        """Tests per outcome, and those selected but not finished."""
        counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        counts["selected"] = self.selected
        counts["not_run"] = max(0, self.selected - len(self.outcomes))
        return counts

    def _save(self) -> None:
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:12]
        self.record.data.update(counts=self.counts(), failures=self.failures[:20],
                                slowest=[{"test": k, "seconds": round(v, 2)} for k, v in slowest])
        self.record.save(self.work)


def stage_tests(args: argparse.Namespace, record: StageRecord) -> int:
    """Run the selected tests in this process with pytest (no -x: every selected test runs)."""
    import pytest

    plan = plan_for(args.dry_run)
    argv = [*TEST_FILES, "-k", plan.test_selection, "-p", "no:cacheprovider", "-q", "-rfEs", "--tb=short",
            f"--junitxml={args.out / JUNIT_NAME}", "-o", "junit_suite_name=gpu_check"]
    if not importable("hypothesis"):
        stubs = args.work / "stand-ins"
        (stubs / "hypothesis").mkdir(parents=True, exist_ok=True)
        (stubs / "hypothesis" / "__init__.py").write_text(HYPOTHESIS_STAND_IN, encoding="utf-8")
        sys.path.insert(0, str(stubs))
        argv += ["-p", "no:hypothesispytest"]  # hypothesis's own pytest plugin, should a broken install leave it
        record.data["note"] = "hypothesis is not installed: a stand-in lets the test modules import"
        print(record.data["note"], flush=True)
    record.data["pytest_args"] = argv
    print("python -m pytest " + " ".join(f"'{a}'" if " " in a else a for a in argv), flush=True)
    recorder = TestRecorder(record, args.work)
    code = int(pytest.main(list(argv), plugins=[recorder]))  # pytest.main adds its ini options to the list
    counts = recorder.counts()
    record.data["exit_code"] = code
    record.data["counts"] = counts
    print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
          f"{counts['skipped']} skipped, {counts['not_run']} not run of {counts['selected']} selected "
          f"(pytest exit status {code}; JUnit XML: {JUNIT_NAME})", flush=True)
    if code != 0:
        record.status = "failed"
        record.reason = f"pytest exit status {code}: {counts['failed']} failed, {counts['error']} errors"
        return 1
    return 0


# ---------------------------------------------------------------- stage: kernels


def launch_overhead(device: Any, item: KernelItem, iters: int, repeats: int) -> dict[str, Any]:
    """Host cost of one small ``fused_adapter`` call: a loop of ``iters`` inference calls on x (1, d)
    (then one synchronisation) against an empty loop and against a loop of a one-element torch op, each
    the median of ``repeats`` loops; microseconds per call. Also a ``FusedAdapter`` call launching its
    bound compiled kernel (``module_bound_us``; ``module_bound`` says whether it could bind: never in
    the interpreter) against the same call launching through Triton's ``JITFunction.run``
    (``module_triton_launch_us``), at batch 1."""
    import torch
    from adapter_fused.kernels import launch

    from adapter_fused import FusedAdapter, fused_adapter

    dtype = getattr(torch, item.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, item.d, generator=gen).to(device, dtype)
    dw = (torch.randn(item.r, item.d, generator=gen) * item.d**-0.5).to(device, dtype)
    uw = (torch.randn(item.d, item.r, generator=gen) * item.r**-0.5).to(device, dtype)
    db, ub = torch.zeros(item.r, device=device, dtype=dtype), torch.zeros(item.d, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def per_call(body: Callable[[], Any]) -> float:
        samples = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                body()
            sync()
            samples.append((time.perf_counter() - t0) / iters * 1e6)
        return sorted(samples)[len(samples) // 2]

    # FusedAdapter calls on x (1, 1, d): one launching its bound compiled kernel, one (binding switched
    # off) launching through Triton's JITFunction.run, which binds and specializes every argument.
    modules = {}
    for name, bind in (("bound", True), ("unbound", False)):
        module = FusedAdapter(item.d, item.r, "relu").to(device, dtype)
        with torch.no_grad():
            module.down.weight.copy_(dw), module.down.bias.copy_(db), module.up.weight.copy_(uw), module.up.bias.copy_(ub)
        modules[name] = module
    x3 = x.view(1, 1, item.d)
    with torch.no_grad():
        for _ in range(3):  # compiled and tuned already when the latency item ran; make sure
            fused_adapter(x, dw, db, uw, ub, "relu", 1.0)
            modules["bound"](x3)
        launch.BIND_LAUNCHES = False
        try:
            for _ in range(3):
                modules["unbound"](x3)
        finally:
            launch.BIND_LAUNCHES = True
        checked = modules["bound"]._checked
        bound = bool(checked is not None and any(checked.plans.values()))
        empty = per_call(lambda: None)
        fused = per_call(lambda: fused_adapter(x, dw, db, uw, ub, "relu", 1.0))
        module_bound = per_call(lambda: modules["bound"](x3))
        module_unbound = per_call(lambda: modules["unbound"](x3))
        tiny = per_call(lambda: x.add(1.0))
    return {"device": str(device), "x": [1, item.d], "r": item.r, "dtype": item.dtype, "iters": iters,
            "repeats": repeats, "empty_loop_us": empty, "fused_call_us": fused, "torch_add_us": tiny,
            "fused_overhead_us": fused - empty, "torch_add_overhead_us": tiny - empty,
            "module_bound": bound, "module_bound_us": module_bound, "module_triton_launch_us": module_unbound,
            "bound_launch_saving_us": module_unbound - module_bound}


def kernel_rows(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the kernel table: each measured record with its time relative to fused."""
    fused = {(r["op"], r["dtype"], r["M"], r["d"], r["r"]): r["ms_median"] for r in records
             if r["provider"] == "fused" and r["ms_median"]}
    rows = []
    for r in records:
        base = fused.get((r["op"], r["dtype"], r["M"], r["d"], r["r"]))
        ratio = r["ms_median"] / base if r["ms_median"] and base and r["provider"] != "fused" else None
        rows.append([r["op"], r["provider"], r["dtype"], r["M"], r["d"], r["r"], fmt(r["ms_median"], ".4f"),
                     fmt(r["gbps"], ".1f"), fmt(r["pct_of_copy_bw"], ".1f", "%"),
                     fmt(ratio, ".3g", "×") if ratio else ("skipped" if r["ms_median"] is None else "")])
    return rows


KERNEL_HEADER = ("op", "provider", "dtype", "M", "d", "r", "ms median", "GB/s", "% copy bw", "time / fused")


def timing_setup(args: argparse.Namespace, record: StageRecord) -> tuple[Any, Any, str] | None:
    """What a timing stage starts with: (device, timing settings, device label), or None (the stage
    failed: no CUDA device). Records a kernels import error, which the stage then reports per case."""
    import torch

    from . import harness

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        record.status, record.reason = "failed", "no CUDA device visible to torch"
        return None
    problem = kernels_import_problem()
    if problem is not None:
        record.data["kernels_import_error"] = problem
        print(f"the Triton kernels do not import: {problem}", flush=True)
    if args.dry_run:
        torch.set_num_threads(1)  # as the smoke run: inductor's OpenMP kernels stall on a busy machine
    settings = harness.SMOKE_TIMING if args.dry_run else harness.TimingSettings()
    return device, settings, harness.device_label(device)


def stage_kernels(args: argparse.Namespace, record: StageRecord) -> int:
    """Time the headline shapes with the harness; update the results file after every provider."""

    from . import grouped as grouped_bench
    from . import harness

    plan = plan_for(args.dry_run)
    deadline = Deadline(args.budget)
    ready = timing_setup(args, record)
    if ready is None:
        return 1
    device, settings, device_label = ready
    copy_bw = harness.copy_bandwidth_gbps(device, nbytes=plan.copy_bytes, settings=settings)
    print(f"{device_label}: copy bandwidth {copy_bw:.1f} GB/s (read + write)", flush=True)
    record.data.update(device=device_label, copy_bw_gbps=copy_bw)
    path = update_results(args.out, device_label, args.started, args.dry_run, copy_bw_gbps=copy_bw)
    record.data["results_file"] = path.name
    skips: list[Any] = []
    records: list[dict[str, Any]] = []

    def save() -> None:
        record.data["harness_skips"] = [vars(s) for s in skips]
        update_results(args.out, device_label, args.started, args.dry_run, records=records)
        record.save(args.work)

    for item in plan.kernels:
        case = harness.Case(M=item.M, d=item.d, r=item.r, dtype=harness.DTYPES[item.dtype])
        for provider in item.providers:
            if deadline.left() < item.min_seconds:
                record.skip(f"{item.name} {provider}", f"{deadline.left():.0f} s left of the stage's {args.budget:.0f} s")
                continue
            t0 = time.monotonic()
            records += harness.bench_case(case, [provider], item.ops, device, copy_bw, settings, skips=skips)
            print(f"  {item.name} ({case}) {provider}: {time.monotonic() - t0:.1f} s", flush=True)
            save()
    latency = next((i for i in plan.kernels if "latency" in i.ops), plan.kernels[-1])
    if deadline.left() > 5:
        try:
            overhead = launch_overhead(device, latency, plan.launch_iters, plan.launch_repeats)
            record.data["launch_overhead"] = overhead
            print(f"  launch overhead (x (1, {latency.d}) {latency.dtype}, r {latency.r}): fused call "
                  f"{overhead['fused_call_us']:.1f} µs, empty loop {overhead['empty_loop_us']:.2f} µs, "
                  f"torch add {overhead['torch_add_us']:.1f} µs per call; FusedAdapter with its bound kernel "
                  f"{overhead['module_bound_us']:.1f} µs (bound: {overhead['module_bound']}), through Triton's "
                  f"launcher {overhead['module_triton_launch_us']:.1f} µs", flush=True)
        except Exception as exc:  # noqa: BLE001 - recorded; the grouped batch still runs
            record.skip("launch_overhead", f"failed: {short_error(exc)}")
    else:
        record.skip("launch_overhead", "no time left")
    if deadline.left() > 15:
        from . import host_cost

        host = host_cost.measure(calls=300 if args.dry_run else 2000, repeats=3)
        update_results(args.out, device_label, args.started, args.dry_run, host_cost=host)
        print(f"  host cost up to the launch (CPU side, no-op launch): FusedAdapter {host['fused_module_us']:.1f} µs "
              f"(target {host['target']['target_us']:.0f} µs met: {host['target']['met']}), "
              f"eager adapter on the CPU {host['eager_adapter_us']:.1f} µs per call", flush=True)
    else:
        record.skip("host_cost", "no time left")
    g = plan.grouped
    if deadline.left() >= g.min_seconds:
        gcase = grouped_bench.GroupedCase(batch=g.batch, seq=g.seq, d=g.d, r=g.r, dtype=harness.DTYPES[g.dtype])
        t0 = time.monotonic()
        grouped_records = grouped_bench.bench_grouped_case(
            gcase, [g.n_adapters], ["sequence"], ["single", "grouped"], grouped_bench.GROUPED_OPS, device, copy_bw,
            settings, skips=skips)
        print(f"  grouped ({gcase}, {g.n_adapters} adapters): {time.monotonic() - t0:.1f} s", flush=True)
        update_results(args.out, device_label, args.started, args.dry_run, grouped=grouped_records)
    else:
        record.skip("grouped", f"optional; {deadline.left():.0f} s left, {g.min_seconds:.0f} s wanted")
    save()
    print(md_table(KERNEL_HEADER, kernel_rows(records)), flush=True)
    unmeasured = [f"{r['op']} M={r['M']} d={r['d']}" for r in records
                  if r["provider"] == "fused" and r["ms_median"] is None]
    if unmeasured:
        record.status, record.reason = "failed", f"fused not measured: {', '.join(unmeasured)}"
        return 1
    return 0


# ---------------------------------------------------------------- stage: models


def stage_models(args: argparse.Namespace, record: StageRecord) -> int:
    """GPT-2 medium batch-1 latency (base, eager, fused), then a BERT-base training step (fused, eager)."""

    from . import models

    deadline = Deadline(args.budget)
    ready = timing_setup(args, record)
    if ready is None:
        return 1
    device, settings, device_label = ready
    gpt2 = models.GPT2_SMOKE if args.dry_run else models.GPT2_MEDIUM
    bert = models.BERT_SMOKE if args.dry_run else models.BERT_BASE
    min_left = 5.0 if args.dry_run else 25.0
    skips: list[Any] = []
    results: list[dict[str, Any]] = []
    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        (f"{gpt2.name} inference", lambda: models.bench_gpt2_latency(gpt2, models.GPT2_PROVIDERS, device, settings,
                                                                      skips)),
        (f"{bert.name} train_step", lambda: models.bench_bert_training(bert, ("fused", "eager"), device, settings,
                                                                        skips)),
    ]
    for name, job in jobs:
        if deadline.left() < min_left:
            record.skip(name, f"{deadline.left():.0f} s left of the stage's {args.budget:.0f} s")
            continue
        t0 = time.monotonic()
        results += job()
        print(f"  {name}: {time.monotonic() - t0:.1f} s", flush=True)
        record.data["harness_skips"] = [vars(s) for s in skips]
        path = update_results(args.out, device_label, args.started, args.dry_run, models=results)
        record.data["results_file"] = path.name
        record.save(args.work)
    print(md_table(MODEL_HEADER, model_rows(results)), flush=True)
    failed = [f"{m['model']} {m['provider']}: {m['skipped']}" for m in results if m["ms_median"] is None]
    if failed:
        record.status, record.reason = "failed", "; ".join(failed)[:500]
        return 1
    if record.skipped:
        record.reason = "partly skipped: " + ", ".join(s["item"] for s in record.skipped)
    return 0


MODEL_HEADER = ("model", "task", "provider", "batch×seq", "dtype", "ms median", "tokens/s", "vs reference")


def model_rows(models: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the model table: inference against ``base``, training tokens/s against ``eager``."""
    ref: dict[tuple[str, str], dict[str, float]] = {}
    for m in models:
        if m["ms_median"] is not None:
            ref.setdefault((m["model"], m["task"]), {})[m["provider"]] = m["ms_median"]
    rows = []
    for m in models:
        times = ref.get((m["model"], m["task"]), {})
        note = ""
        if m["ms_median"] is not None and m["provider"] not in ("base",):
            if m["task"] == "inference" and "base" in times:
                note = f"{100 * (m['ms_median'] / times['base'] - 1):+.1f}% time vs base"
            elif m["task"] == "train_step" and "eager" in times and m["provider"] != "eager":
                note = f"{times['eager'] / m['ms_median']:.2f}× tokens/s vs eager"
        rows.append([m["model"], m["task"], m["provider"], f"{m['batch']}×{m['seq']}", m["dtype"],
                     fmt(m["ms_median"], ".3f") if m["ms_median"] is not None else "skipped",
                     fmt(m["tokens_per_s"], ".0f"), note])
    return rows


# ---------------------------------------------------------------- stage: plots


def stage_plots(args: argparse.Namespace, record: StageRecord) -> int:
    """The two plots of ``python -m benchmarks --out`` from this run's kernel records; skipped without
    matplotlib (or rich, which ``benchmarks.report`` imports)."""
    missing = [name for name in ("matplotlib", "rich") if not importable(name)]
    if missing:
        record.status = "skipped"
        record.reason = f"{' and '.join(missing)} not installed: no plots (the numbers are in the results file)"
        print(record.reason, flush=True)
        return SKIP_EXIT
    path = find_results(args.out)
    result = read_json_file(path) if path else None
    if path is None or not isinstance(result, dict) or not result.get("records"):
        record.status, record.reason = "skipped", "no kernel records to plot"
        print(record.reason, flush=True)
        return SKIP_EXIT
    from . import report

    title = f"{result['device']} · {result['date']}"
    records = result["records"]
    written = [report.plot_speedup(records, path.with_name(path.stem + "_speedup.png"), title),
               report.plot_copy_bandwidth(records, path.with_name(path.stem + "_copy_bw.png"), title)]
    record.data["files"] = [p.name for p in written]
    print("wrote " + ", ".join(p.name for p in written), flush=True)
    return 0


# ---------------------------------------------------------------- targets


@dataclass
class TargetRow:
    """One line of the targets table."""

    target: str
    case: str
    measured: str
    verdict: str
    gap: str | None = None
    value: float | None = None
    threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return dict(vars(self))


def _case_label(r: dict[str, Any]) -> str:
    return f"M={r['M']} d={r['d']} r={r['r']} {r['dtype']}"


def _judge(met: bool, dry_run: bool) -> str:
    return "n/a (dry run)" if dry_run else ("met" if met else "missed")


def _gap(met: bool, dry_run: bool, text: str) -> str | None:
    return None if met or dry_run else text


def evaluate_targets(records: Sequence[dict[str, Any]], models: Sequence[dict[str, Any]],
                     grouped: Sequence[dict[str, Any]], dry_run: bool) -> list[TargetRow]:
    """Each target, per applicable measurement: met, or missed with the measured gap. A dry run applies
    every target to its tiny shapes (size conditions dropped) and judges none of them."""
    rows: list[TargetRow] = []

    def ms(provider: str, op: str, like: dict[str, Any]) -> float | None:
        for r in records:
            if (r["provider"], r["op"], r["dtype"], r["M"], r["d"], r["r"]) == (
                    provider, op, like["dtype"], like["M"], like["d"], like["r"]) and r["ms_median"]:
                return float(r["ms_median"])
        return None

    name = f"forward ≥ {FORWARD_COPY_BW_PCT:.0f}% of copy bandwidth (rows·d ≥ 2^{int(math.log2(FORWARD_MIN_ELEMENTS))})"
    found = False
    for r in records:
        if r["provider"] != "fused" or r["op"] != "forward" or (r["M"] * r["d"] < FORWARD_MIN_ELEMENTS and not dry_run):
            continue
        found = True
        pct = r["pct_of_copy_bw"]
        if pct is None:
            rows.append(TargetRow(name, _case_label(r), "not measured", "not measured"))
            continue
        met = pct >= FORWARD_COPY_BW_PCT
        rows.append(TargetRow(name, _case_label(r), f"{pct:.1f}% ({r['gbps']:.0f} GB/s)", _judge(met, dry_run),
                              _gap(met, dry_run, f"{FORWARD_COPY_BW_PCT - pct:.1f} points short"), pct,
                              FORWARD_COPY_BW_PCT))
    if not found:
        rows.append(TargetRow(name, "—", "no fused forward record of that size", "not measured"))

    for provider, need in (("eager", FWD_BWD_VS_EAGER), ("compile", FWD_BWD_VS_COMPILE)):
        name = f"forward+backward ≥ {need}× {provider} (rows ≥ {FWD_BWD_MIN_ROWS})"
        found = False
        for r in records:
            if r["provider"] != "fused" or r["op"] != "forward_backward" or (r["M"] < FWD_BWD_MIN_ROWS and not dry_run):
                continue
            found = True
            other = ms(provider, "forward_backward", r)
            if r["ms_median"] is None or other is None:
                rows.append(TargetRow(name, _case_label(r), f"fused or {provider} not measured", "not measured"))
                continue
            speedup = other / r["ms_median"]
            met = speedup >= need
            gap = _gap(met, dry_run, f"fused must take {100 * (1 - speedup / need):.0f}% less time")
            rows.append(TargetRow(name, _case_label(r), f"{speedup:.2f}× ({r['ms_median']:.3f} vs {other:.3f} ms)",
                                  _judge(met, dry_run), gap, speedup, need))
        if not found:
            rows.append(TargetRow(name, "—", "no fused forward+backward record of that size", "not measured"))

    name = f"GPT-2 medium batch-1 latency ≤ +{GPT2_MAX_OVERHEAD:.0%} over the base model"
    inference = {m["provider"]: m for m in models if m["task"] == "inference" and m["ms_median"] is not None}
    if "base" in inference and "fused" in inference:
        base, fused = inference["base"], inference["fused"]
        overhead = fused["ms_median"] / base["ms_median"] - 1
        eager = inference.get("eager")
        extra = f"; eager adapters {100 * (eager['ms_median'] / base['ms_median'] - 1):+.1f}%" if eager else ""
        met = overhead <= GPT2_MAX_OVERHEAD
        gap = _gap(met, dry_run, f"{100 * (overhead - GPT2_MAX_OVERHEAD):.1f} points over")
        rows.append(TargetRow(name, f"{fused['model']} {fused['batch']}×{fused['seq']} {fused['dtype']}",
                              f"{100 * overhead:+.1f}% ({fused['ms_median']:.3f} vs {base['ms_median']:.3f} ms{extra})",
                              _judge(met, dry_run), gap, overhead, GPT2_MAX_OVERHEAD))
    else:
        rows.append(TargetRow(name, "—", "base or fused latency not measured", "not measured"))

    name = f"{GROUPED_ADAPTERS} adapters in one grouped batch ≤ {GROUPED_MAX_RATIO}× one adapter (optional)"
    found = False
    for g in grouped:
        if g["provider"] != "grouped" or g["n_adapters"] != GROUPED_ADAPTERS:
            continue
        found = True
        ratio = g["ratio_to_single"]
        case = f"{g['op']} {g['batch']}×{g['seq']} d={g['d']} r={g['r']} {g['dtype']} ({g['index']})"
        if ratio is None:
            rows.append(TargetRow(name, case, "not measured", "not measured"))
            continue
        met = ratio <= GROUPED_MAX_RATIO
        rows.append(TargetRow(name, case, f"{ratio:.2f}×", _judge(met, dry_run),
                              _gap(met, dry_run, f"{ratio - GROUPED_MAX_RATIO:.2f}× over"), ratio, GROUPED_MAX_RATIO))
    if not found:
        rows.append(TargetRow(name, "—", "not measured (optional, runs when the kernels stage has time left)",
                              "not measured"))
    return rows


def targets_markdown(rows: Sequence[TargetRow]) -> str:
    """The targets table in markdown."""
    return md_table(("target", "case", "measured", "verdict", "gap"),
                    [(r.target, r.case, r.measured, r.verdict, r.gap) for r in rows])


# ---------------------------------------------------------------- stage: table


def read_status(work: Path) -> dict[str, dict[str, Any]]:
    """The shell script's per-stage lines: exit status, seconds, limit and note, by stage."""
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = (work / STATUS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        name, rc, seconds, limit = parts[:4]
        out[name] = {"exit_code": int(rc) if rc.lstrip("-").isdigit() else None,
                     "seconds": float(seconds) if seconds not in ("", "-") else None,
                     "limit_seconds": float(limit) if limit.lstrip("-").isdigit() else None,
                     "note": parts[4] if len(parts) > 4 and parts[4] else None}
    return out


def stage_status(name: str, shell: dict[str, Any] | None, record: dict[str, Any] | None) -> dict[str, Any]:
    """One stage's entry in ``gpu_check.json`` from the shell's line (exit status, seconds, limit) and the
    stage's own record: ``timed-out`` when ``timeout`` ended it, ``skipped`` for exit status 3 or a stage
    the script did not start, ``passed`` for exit status 0 with a record, ``failed`` otherwise."""
    rc = shell.get("exit_code") if shell else None
    entry: dict[str, Any] = {"status": "failed", "reason": None, "seconds": shell.get("seconds") if shell else None,
                             "limit_seconds": shell.get("limit_seconds") if shell else None, "exit_code": rc}
    own_reason = record.get("reason") if record else None
    if shell is None:
        entry.update(status="skipped", reason="not run")
    elif rc is None:
        entry.update(status="skipped", reason=shell.get("note") or "not started")
    elif rc in TIMEOUT_EXITS:
        entry.update(status="timed-out",
                     reason=f"stopped at its {shell.get('limit_seconds') or '?'} s limit"
                            + (" (killed)" if rc == 137 else "") + "; partial results kept")
    elif rc == SKIP_EXIT:
        entry.update(status="skipped", reason=own_reason or "nothing to do")
    elif rc == 0 and record is not None:
        entry.update(status=record.get("status") if record.get("status") in STATUSES else "passed", reason=own_reason)
    elif rc == 0:
        entry.update(reason="exit status 0 but the stage wrote no record")
    else:
        entry.update(reason=own_reason or f"exit status {rc} (see {LOG_NAME})")
    if record is not None:
        entry["skipped_items"] = record.get("skipped", [])
        entry["result"] = record.get("data", {})
    return entry


def stage_table(args: argparse.Namespace, record: StageRecord) -> int:
    """Merge every stage's record into ``gpu_check.json``; print the stage, kernel, model and targets tables."""
    shell = read_status(args.work)
    records = {name: read_json_file(args.work / f"{name}.json") for name in STAGES}
    stages: dict[str, Any] = {}
    for name in STAGES:
        if name == "table":
            continue
        stages[name] = stage_status(name, shell.get(name), records[name])
    results_file = find_results(args.out)
    results = read_json_file(results_file) if results_file else None
    results = results if isinstance(results, dict) else {}
    targets = evaluate_targets(results.get("records", []), results.get("models", []), results.get("grouped", []),
                               args.dry_run)
    tmd = targets_markdown(targets)
    kernels = (records.get("kernels") or {}).get("data", {})
    total = time.time() - args.started
    summary: dict[str, Any] = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "started": started_at(args.started).isoformat(timespec="seconds"),
        "total_seconds": round(total, 1),
        "time_limit_seconds": args.total_limit,
        "stages": stages,
        "results_file": results_file.name if results_file else None,
        "device": results.get("device"),
        "copy_bw_gbps": {"environment": ((records.get("environment") or {}).get("data", {})
                                         .get("copy_bandwidth", {}).get("gbps")),
                         "kernels": results.get("copy_bw_gbps")},
        "launch_overhead": kernels.get("launch_overhead"),
        "targets": [t.as_dict() for t in targets],
        "targets_markdown": tmd,
    }
    stage_md = md_table(("stage", "status", "seconds", "limit", "reason"),
                        [(n, s["status"], fmt(s["seconds"], ".1f"), fmt(s["limit_seconds"], ".0f"), s["reason"])
                         for n, s in stages.items()])
    print("\n## Stages\n\n" + stage_md)
    tests = stages["tests"].get("result", {}).get("counts")
    if tests:
        print(f"\ntests: {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
              f"{tests['skipped']} skipped, {tests['not_run']} not run of {tests['selected']} selected")
    if results.get("records"):
        print("\n## Kernels\n\n" + md_table(KERNEL_HEADER, kernel_rows(results["records"])))
    overhead = summary["launch_overhead"]
    if overhead:
        print(f"\nlaunch overhead: fused call {overhead['fused_call_us']:.1f} µs, empty loop "
              f"{overhead['empty_loop_us']:.2f} µs, torch add {overhead['torch_add_us']:.1f} µs per call "
              f"({overhead['device']}); FusedAdapter: bound kernel {overhead['module_bound_us']:.1f} µs "
              f"(bound: {overhead['module_bound']}), Triton's launcher {overhead['module_triton_launch_us']:.1f} µs")
    if results.get("models"):
        print("\n## Models\n\n" + md_table(MODEL_HEADER, model_rows(results["models"])))
    label = " (dry run: CPU interpreter, tiny shapes; nothing is judged)" if args.dry_run else ""
    print(f"\n## Targets{label}\n\n{tmd}\n", flush=True)
    stages["table"] = {"status": "passed", "reason": None, "seconds": round(time.monotonic() - record.started, 2),
                       "limit_seconds": args.budget, "exit_code": 0}
    summary["out_files"] = sorted({p.name for p in args.out.iterdir() if p.is_file()} | {SUMMARY_NAME})
    write_json_file(args.out / SUMMARY_NAME, summary)
    print(f"wrote {SUMMARY_NAME}" + (f" and {results_file.name}" if results_file else ""), flush=True)
    return 0


# ---------------------------------------------------------------- entry point

STAGE_FUNCTIONS: dict[str, Callable[[argparse.Namespace, StageRecord], int]] = {
    "install": stage_install, "environment": stage_environment, "tests": stage_tests, "kernels": stage_kernels,
    "models": stage_models, "plots": stage_plots, "table": stage_table,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line options of one stage."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description="One stage of benchmarks/gpu_check.sh (run that script instead).")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", type=Path, required=True, help="the output directory (flat)")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for the stage records")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--budget", type=float, default=60.0, help="this stage's time limit in seconds")
    parser.add_argument("--started", type=float, default=None, help="the run's start (epoch seconds)")
    parser.add_argument("--total-limit", type=float, default=None, help="the whole run's time limit in seconds")
    args = parser.parse_args(argv)
    if args.started is None:
        args.started = time.time()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; its record is saved whatever happens (an interrupt from the time limit included)."""
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    record = StageRecord(args.stage)
    code = 1
    try:
        code = STAGE_FUNCTIONS[args.stage](args, record)
    except KeyboardInterrupt:
        record.status, record.reason = "timed-out", "interrupted at the time limit"
        code = 124
    except Exception as exc:  # noqa: BLE001 - any failure is the stage's verdict, and its record is kept
        import traceback

        traceback.print_exc()
        record.status, record.reason = "failed", short_error(exc)
        code = 1
    finally:
        record.save(args.work)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
