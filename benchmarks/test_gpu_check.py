"""Tests of ``benchmarks/gpu_check.sh``: the dry run end to end (CPU, Triton interpreter, tiny sizes), a run
whose stages run out of time and whose last stage fails, and the pieces that judge and merge.

The dry run takes one to two minutes. When ``GPU_CHECK_DRY_RUN_OUT`` names the output directory of a dry run
that has already been done (CI runs the script itself first), that directory is checked instead.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check, grouped, harness, models, report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``bash benchmarks/gpu_check.sh ARGS`` with this interpreter as its python."""
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The output directory of a complete dry run."""
    given = os.environ.get("GPU_CHECK_DRY_RUN_OUT")
    if given:
        yield Path(given)
        return
    out = tmp_path_factory.mktemp("gpu_check")
    done = run_script("--dry-run", str(out))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    yield out


def load_summary(out: Path) -> dict[str, Any]:
    """gpu_check.json, checked to name every stage with a known status."""
    summary = json.loads((out / gpu_check.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert tuple(summary["stages"]) == gpu_check.STAGES
    for name, stage in summary["stages"].items():
        assert stage["status"] in gpu_check.STATUSES, (name, stage)
        assert "seconds" in stage and "exit_code" in stage, (name, stage)
    return summary


def test_dry_run_files(dry_run: Path) -> None:
    """At most 8 plain files, no subdirectories; the log, the summary, the JUnit file, one results file and,
    with matplotlib, its two plots."""
    entries = list(dry_run.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert len(entries) <= gpu_check.MAX_OUT_FILES
    names = {p.name for p in entries}
    assert {gpu_check.LOG_NAME, gpu_check.SUMMARY_NAME, gpu_check.JUNIT_NAME} <= names
    (results,) = [n for n in names if n.endswith(".json") and n.startswith("adapter_bench_")]
    assert re.fullmatch(r"adapter_bench_cpu-interpreter_\d{4}-\d{2}-\d{2}_\d{6}\.json", results)
    plots = {n for n in names if n.endswith(".png")}
    stem = results.removesuffix(".json")
    if gpu_check.importable("matplotlib") and gpu_check.importable("rich"):
        assert plots == {f"{stem}_speedup.png", f"{stem}_copy_bw.png"}
    else:
        assert plots == set()
    log = (dry_run / gpu_check.LOG_NAME).read_text(encoding="utf-8")
    assert "total wall clock" in log and "## Targets" in log


def test_dry_run_summary(dry_run: Path) -> None:
    """Every stage ran and passed (install and, without matplotlib, plots are skipped with a reason);
    the test counts, the launch overhead and a verdict for every target are recorded."""
    summary = load_summary(dry_run)
    assert summary["mode"] == "dry-run"
    assert summary["total_seconds"] < summary["time_limit_seconds"]
    for name, stage in summary["stages"].items():
        if name in ("install", "plots") and stage["status"] == "skipped":
            assert stage["reason"]
        else:
            assert stage["status"] == "passed", (name, stage)
    environment = summary["stages"]["environment"]["result"]
    assert environment["copy_bandwidth"]["gbps"] > 0
    assert {s["item"] for s in summary["stages"]["environment"]["skipped_items"]} == {"gpu", "nvidia-smi"}
    counts = summary["stages"]["tests"]["result"]["counts"]
    assert counts["passed"] >= 3 and counts["failed"] == counts["error"] == counts["not_run"] == 0
    assert counts["skipped"] >= 1  # the gpu-marked tests, without a GPU
    overhead = summary["launch_overhead"]
    assert overhead["fused_call_us"] > 0
    assert overhead["module_bound_us"] > 0 and overhead["module_triton_launch_us"] > 0
    assert overhead["module_bound"] is False  # the interpreter has no compiled kernel to bind
    targets = summary["targets"]
    assert {t["verdict"] for t in targets} <= {"n/a (dry run)", "not measured"}
    assert sum(t["verdict"] == "n/a (dry run)" for t in targets) >= 5
    assert summary["targets_markdown"].startswith("| target |")
    assert set(summary["out_files"]) == {p.name for p in dry_run.iterdir()}


def test_dry_run_results_file(dry_run: Path) -> None:
    """The results file has the schema of ``python -m benchmarks --out`` and every planned measurement."""
    path = gpu_check.find_results(dry_run)
    assert path is not None
    result = json.loads(path.read_text(encoding="utf-8"))
    assert tuple(result) == report.TOP_LEVEL_KEYS
    assert result["device"].startswith("CPU") and result["copy_bw_gbps"] > 0
    assert result["command"] == "bash benchmarks/gpu_check.sh --dry-run"
    measured = {(r["op"], r["provider"], r["M"], r["d"], r["r"]) for r in result["records"] if r["ms_median"]}
    planned = {(op, p, item.M, item.d, item.r) for item in gpu_check.DRY_PLAN.kernels for p in item.providers
               for op in item.ops}
    # compile may be unable to build where inductor has no C compiler (recorded as skipped); the rest must run
    assert {key for key in planned if key[1] != "compile"} <= measured
    assert {(r["op"], r["provider"], r["M"], r["d"], r["r"]) for r in result["records"]} == planned
    for record in result["records"]:
        assert tuple(record) == harness.RECORD_KEYS
    seen = {(m["model"], m["provider"]) for m in result["models"] if m["ms_median"]}
    assert seen == {(models.GPT2_SMOKE.name, p) for p in models.GPT2_PROVIDERS} | {
        (models.BERT_SMOKE.name, p) for p in ("fused", "eager")}
    ratios = {(g["op"], g["provider"]): g["ratio_to_single"] for g in result["grouped"]}
    assert ratios[("forward", "grouped")] and ratios[("forward_backward", "grouped")]


def test_stages_that_time_out_or_fail_leave_a_summary(tmp_path: Path) -> None:
    """Stages cut off at their limit are recorded as timed-out and later stages still run; when the table
    stage itself fails, the script writes gpu_check.json from its own records; the exit status is 1."""
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\ncase " $* " in *" table "*) echo "table stage broken" >&2; exit 1 ;; esac\n'
                    f'exec "{sys.executable}" "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    out = tmp_path / "out"
    done = run_script("--dry-run", str(out), env={"PYTHON": str(shim),
                                                  "GPU_CHECK_BUDGETS": "tests=1,kernels=1,models=1"})
    assert done.returncode == 1, done.stdout[-4000:]
    summary = load_summary(out)
    assert summary["complete"] is False
    stages = summary["stages"]
    assert [stages[n]["status"] for n in ("tests", "kernels", "models")] == ["timed-out"] * 3
    assert stages["plots"]["status"] == "skipped"  # nothing to plot
    assert stages["table"]["status"] == "failed" and stages["table"]["exit_code"] == 1
    assert stages["environment"]["status"] == "passed"
    assert all(p.is_file() for p in out.iterdir()) and len(list(out.iterdir())) <= gpu_check.MAX_OUT_FILES
    assert "total wall clock" in (out / gpu_check.LOG_NAME).read_text(encoding="utf-8")


def test_a_run_without_time_starts_no_stage(tmp_path: Path) -> None:
    """Stages that no longer fit the run's limit are not started and are recorded as skipped with the reason;
    the run still writes its summary, and exits with 1."""
    done = run_script("--dry-run", str(tmp_path), env={"GPU_CHECK_TOTAL": "12"}, timeout=120)
    assert done.returncode == 1, done.stdout[-4000:]
    summary = load_summary(tmp_path)
    for name in gpu_check.STAGES[:-1]:
        stage = summary["stages"][name]
        assert stage["status"] == "skipped" and stage["reason"] == "not started: no time left", (name, stage)
        assert stage["seconds"] is None and stage["exit_code"] is None
    assert summary["stages"]["table"]["status"] == "passed"
    assert {t["verdict"] for t in summary["targets"]} == {"not measured"}


@pytest.mark.parametrize("args, env", [((), {}), (("a", "b"), {}), (("--bogus", "x"), {}),
                                       (("--dry-run", "x"), {"GPU_CHECK_BUDGETS": "tests=0"}),
                                       (("--dry-run", "x"), {"GPU_CHECK_BUDGETS": "nonsense=5"}),
                                       (("--dry-run", "x"), {"GPU_CHECK_TOTAL": "soon"})])
def test_usage_errors(args: tuple[str, ...], env: dict[str, str], tmp_path: Path) -> None:
    """Bad arguments and budget overrides stop the script before any stage, with exit status 2."""
    args = tuple(str(tmp_path / a) if a == "x" else a for a in args)
    done = run_script(*args, env=env, timeout=60)
    assert done.returncode == 2
    assert "usage" in done.stderr


# ---------------------------------------------------------------- pieces


def test_copied_names_match_their_sources() -> None:
    """Names spelled out in gpu_check (so that later stages need neither rich nor torch) equal the originals."""
    from datetime import datetime, timezone

    assert gpu_check.RESULTS_KEYS == report.TOP_LEVEL_KEYS
    when = datetime(2026, 1, 31, 12, 5, 1, tzinfo=timezone.utc)
    for device in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "CPU / Triton interpreter (x)", "CPU / no Triton kernels"):
        assert gpu_check.file_stem(device, when) == report.file_stem(device, when)
    assert (gpu_check.GROUPED_ADAPTERS, gpu_check.GROUPED_MAX_RATIO) == (grouped.TARGET_ADAPTERS, grouped.TARGET_RATIO)
    for plan in (gpu_check.GPU_PLAN, gpu_check.DRY_PLAN):
        for item in plan.kernels:
            assert set(item.ops) <= set(harness.OPS) and set(item.providers) <= set(harness.PROVIDERS)
            assert item.dtype in harness.DTYPES


def test_every_gpu_marked_test_file_is_selected() -> None:
    """``-k gpu`` selects every gpu-marked test of the chosen files; no gpu-marked test lives elsewhere."""
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
              if "pytest.mark.gpu" in p.read_text(encoding="utf-8")}
    assert marked <= set(gpu_check.TEST_FILES)
    assert gpu_check.GPU_TEST_SELECTION.split(" or ")[0] == "gpu"


def _record(op: str, provider: str, M: int, d: int, r: int, ms: float, pct: float | None = None) -> dict[str, Any]:
    return {"op": op, "provider": provider, "dtype": "bfloat16", "M": M, "d": d, "r": r, "ms_median": ms,
            "gbps": 4000.0 if pct is not None else None, "pct_of_copy_bw": pct}


def test_targets_met_missed_and_not_measured() -> None:
    """Each target is judged only where its size condition holds; a miss states the gap."""
    records = [
        _record("forward", "fused", 16384, 4096, 64, 0.1, 88.0),
        _record("forward", "fused", 4096, 768, 48, 0.1, 40.0),  # below 2**25 elements: not judged
        _record("forward_backward", "fused", 16384, 4096, 64, 1.0),
        _record("forward_backward", "eager", 16384, 4096, 64, 2.0),
        _record("forward_backward", "compile", 16384, 4096, 64, 1.6),
        _record("forward_backward", "fused", 1024, 4096, 64, 1.0),  # fewer than 4096 rows: not judged
    ]
    model_runs = [{"model": "gpt2-medium", "task": "inference", "provider": p, "batch": 1, "seq": 128,
                   "dtype": "bfloat16", "ms_median": ms} for p, ms in (("base", 10.0), ("eager", 11.0), ("fused", 10.3))]
    mixed = [{"op": "forward", "provider": "grouped", "n_adapters": 8, "ratio_to_single": 1.3, "batch": 64, "seq": 128,
              "d": 4096, "r": 64, "dtype": "bfloat16", "index": "sequence"}]
    rows = gpu_check.evaluate_targets(records, model_runs, mixed, dry_run=False)
    by_target: dict[str, list[gpu_check.TargetRow]] = {}
    for row in rows:
        by_target.setdefault(row.target.split(" (")[0], []).append(row)
    (bw,) = by_target["forward ≥ 85% of copy bandwidth"]
    assert bw.verdict == "met" and bw.gap is None and bw.value == 88.0
    (vs_eager,) = by_target["forward+backward ≥ 2.5× eager"]
    assert vs_eager.verdict == "missed" and vs_eager.value == pytest.approx(2.0)
    assert vs_eager.gap == "fused must take 20% less time"
    (vs_compile,) = by_target["forward+backward ≥ 1.5× compile"]
    assert vs_compile.verdict == "met"
    (gpt2,) = by_target["GPT-2 medium batch-1 latency ≤ +5% over the base model"]
    assert gpt2.verdict == "met" and gpt2.value == pytest.approx(0.03) and "eager adapters +10.0%" in gpt2.measured
    (many,) = by_target["8 adapters in one grouped batch ≤ 1.15× one adapter"]
    assert many.verdict == "missed" and many.gap == "0.15× over"
    empty = gpu_check.evaluate_targets([], [], [], dry_run=False)
    assert len(empty) == 5 and {r.verdict for r in empty} == {"not measured"}
    table = gpu_check.targets_markdown(rows)
    assert table.count("\n") == len(rows) + 1


@pytest.mark.parametrize("shell, record, status", [
    (None, None, "skipped"),
    ({"exit_code": None, "seconds": None, "limit_seconds": 3.0, "note": "not started: no time left"}, None, "skipped"),
    ({"exit_code": 0, "seconds": 1.0, "limit_seconds": 9.0}, {"status": "passed"}, "passed"),
    ({"exit_code": 0, "seconds": 1.0, "limit_seconds": 9.0}, None, "failed"),
    ({"exit_code": 3, "seconds": 1.0, "limit_seconds": 9.0}, {"status": "skipped", "reason": "why"}, "skipped"),
    ({"exit_code": 124, "seconds": 9.0, "limit_seconds": 9.0}, {"status": "passed"}, "timed-out"),
    ({"exit_code": 137, "seconds": 14.0, "limit_seconds": 9.0}, None, "timed-out"),
    ({"exit_code": 1, "seconds": 1.0, "limit_seconds": 9.0}, {"status": "failed", "reason": "boom"}, "failed"),
])
def test_stage_status(shell: dict[str, Any] | None, record: dict[str, Any] | None, status: str) -> None:
    """The shell's exit status decides timed-out and skipped; the stage's own record decides the rest."""
    entry = gpu_check.stage_status("kernels", shell, record)
    assert entry["status"] == status
    assert entry["reason"] or status == "passed"


def test_plots_are_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the plots stage says so and exits with the skip status."""
    monkeypatch.setattr(gpu_check, "importable", lambda name: name != "matplotlib")
    args = argparse.Namespace(out=tmp_path, work=tmp_path, dry_run=True, budget=10.0)
    record = gpu_check.StageRecord("plots")
    assert gpu_check.stage_plots(args, record) == gpu_check.SKIP_EXIT
    assert record.status == "skipped" and "matplotlib" in (record.reason or "")


def test_hypothesis_stand_in(tmp_path: Path) -> None:
    """The stand-in used where hypothesis is missing supports what the test modules do at import time, and
    marks property-based tests as skipped."""
    (tmp_path / "hypothesis").mkdir()
    (tmp_path / "hypothesis" / "__init__.py").write_text(gpu_check.HYPOTHESIS_STAND_IN, encoding="utf-8")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import hypothesis\n"
        "from hypothesis import given, settings, strategies as st\n"
        "assert hypothesis.__file__.startswith(sys.argv[1])\n"
        "settings.register_profile('ci', max_examples=20, deadline=None); settings.load_profile('ci')\n"
        "strategy = st.floats(-4, 4).filter(lambda s: s == 0)\n"
        "def test_property(rows, scale): pass\n"
        "test = given(rows=st.integers(0, 40), scale=strategy)(test_property)\n"
        "assert test.pytestmark[0].name == 'skip'\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
