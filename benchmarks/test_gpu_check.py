"""Tests of ``benchmarks/gpu_check.sh``: the dry run end to end (CPU, Triton interpreter, tiny sizes), the
stage plumbing (statuses, limits, exit status, files) with stand-in stages, usage errors, and the targets.

The dry run takes one to two minutes. When ``GPU_CHECK_DRY_RUN_OUT`` names the output directory of a dry run
that has already been done (CI runs the script itself first), that directory is checked instead.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as cli
from benchmarks import gpu_check, harness, models, report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``bash benchmarks/gpu_check.sh ARGS`` with this interpreter as its python."""
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable}, stdin=subprocess.DEVNULL)


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
    for name, stage in summary["stages"].items():
        assert stage["status"] in gpu_check.STATUSES, (name, stage)
        assert "seconds" in stage and "exit_code" in stage and "reason" in stage, (name, stage)
    return summary


def test_dry_run_files(dry_run: Path) -> None:
    """At most 8 plain files, no subdirectories: the log, the summary, the JUnit file, one results file and
    its two plots."""
    entries = list(dry_run.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert len(entries) <= gpu_check.MAX_OUT_FILES
    names = {p.name for p in entries}
    (results,) = [n for n in names if n.startswith("adapter_bench_") and n.endswith(".json")]
    assert re.fullmatch(r"adapter_bench_cpu-interpreter_\d{4}-\d{2}-\d{2}_\d{6}\.json", results)
    stem = results.removesuffix(".json")
    assert names == {gpu_check.LOG_NAME, gpu_check.SUMMARY_NAME, gpu_check.JUNIT_NAME, results,
                     f"{stem}_speedup.png", f"{stem}_copy_bw.png"}
    log = (dry_run / gpu_check.LOG_NAME).read_text(encoding="utf-8")
    assert "## Targets" in log and "every stage passed or had nothing to do" in log


def test_dry_run_summary(dry_run: Path) -> None:
    """Every stage ran and passed (install is skipped, with its reason, where the project imports); the
    environment, the test counts, the launch overhead and a verdict for every target are recorded."""
    summary = load_summary(dry_run)
    assert summary["mode"] == "dry-run" and tuple(summary["stages"]) == tuple(s.name for s in gpu_check.STAGES)
    assert summary["total_seconds"] < summary["time_limit_seconds"]
    for name, stage in summary["stages"].items():
        assert stage["status"] == "passed" or (name == "install" and stage["reason"]), (name, stage)
    environment = summary["stages"]["environment"]["data"]
    assert environment["torch"]["cuda_available"] is False and environment["versions"]["torch"]
    counts = summary["stages"]["tests"]["data"]["counts"]
    assert counts["tests"] >= 3 and counts["failures"] == counts["errors"] == 0
    assert counts["skipped"] >= 1  # the gpu-marked tests, without a GPU
    assert summary["copy_bw_gbps"] > 0
    overhead = summary["launch_overhead"]
    assert overhead["fused_call_us"] > 0 and overhead["module_bound_us"] > 0
    assert overhead["module_bound"] is False  # the interpreter has no compiled kernel to bind
    assert summary["host_cost_target"]["measured_us"] > 0
    verdicts = [t["verdict"] for t in summary["targets"]]
    assert set(verdicts) <= {"n/a (not judged)", "not measured"} and verdicts.count("n/a (not judged)") >= 6
    assert summary["targets_markdown"].startswith("| target |")
    assert set(summary["out_files"]) == {p.name for p in dry_run.iterdir()}


def test_dry_run_results_file(dry_run: Path) -> None:
    """The results file has the schema of ``python -m benchmarks --out``, every planned measurement, and the
    model records of the models stage merged in."""
    (path,) = dry_run.glob("adapter_bench_*.json")
    result = json.loads(path.read_text(encoding="utf-8"))
    assert tuple(result) == report.TOP_LEVEL_KEYS
    assert result["device"].startswith("CPU") and result["copy_bw_gbps"] > 0
    assert result["command"] == "bash benchmarks/gpu_check.sh --dry-run"
    planned = {(op, p, M, d, r) for M, d, r, _, ops, providers in cli.HEADLINE_KERNELS["smoke"] for p in providers
               for op in ops}
    assert {(r["op"], r["provider"], r["M"], r["d"], r["r"]) for r in result["records"]} == planned
    measured = {(r["op"], r["provider"], r["M"], r["d"], r["r"]) for r in result["records"] if r["ms_median"]}
    # compile may be unable to build where inductor has no C compiler (recorded as skipped); the rest must run
    assert {key for key in planned if key[1] != "compile"} <= measured
    assert all(tuple(record) == harness.RECORD_KEYS for record in result["records"])
    seen = {(m["model"], m["provider"]) for m in result["models"] if m["ms_median"]}
    assert seen == {(models.GPT2_SMOKE.name, p) for p in models.GPT2_PROVIDERS} | {
        (models.BERT_SMOKE.name, p) for p in cli.HEADLINE_BERT_PROVIDERS} | {
        (models.DECODER_SMOKE.name, p) for p in models.DECODE_PROVIDERS}
    ratios = {(g["op"], g["provider"]): g["ratio_to_single"] for g in result["grouped"]}
    assert ratios[("forward", "grouped")] and ratios[("forward_backward", "grouped")]
    assert result["host_cost"]["bound"] is True and result["train"] is None


# ---------------------------------------------------------------- plumbing, with stand-in stages


def _python(code: str, budget: float = 10) -> gpu_check.Stage:
    """A stage running ``python -c code``."""
    return gpu_check.Stage(code, budget, lambda run, limit: run.command([sys.executable, "-c", code], limit))


def _returns(result: gpu_check.Result) -> gpu_check.Stage:
    """A stage that runs nothing and reports ``result``."""
    return gpu_check.Stage(result.status, 10, lambda run, limit: result)


def _main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: dict[str, gpu_check.Stage],
          *options: str) -> tuple[int, Any]:
    """Run ``gpu_check.main`` with ``stages`` (by name) in place of the real ones; (exit status, summary).
    Nothing of the project is measured."""
    monkeypatch.setattr(gpu_check, "STAGES", tuple(gpu_check.Stage(name, stage.budget, stage.run)
                                                   for name, stage in stages.items()))
    out = tmp_path / "out"
    code = gpu_check.main([str(out), *options])
    assert {p.name for p in out.iterdir()} == {gpu_check.LOG_NAME, gpu_check.SUMMARY_NAME}
    return code, load_summary(out)


def test_statuses_and_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Passed, skipped, failed and timed-out stages are recorded with their exit status and reason; a stage
    that fails or times out does not stop the next; the exit status is 1 when any failed."""
    monkeypatch.setattr(gpu_check, "GRACE", 2.0)
    stubborn = gpu_check.Stage("stubborn", 1, lambda run, limit: run.command(
        ["sh", "-c", "trap '' INT; sleep 60"], limit))
    code, summary = _main(tmp_path, monkeypatch, {
        "ok": _python("print('fine')"), "nothing": _returns(gpu_check.Result("skipped", "nothing to do")),
        "slow": _python("import time; time.sleep(60)", budget=1),
        "broken": _python("raise SystemExit(3)"), "stubborn": stubborn, "after": _python("pass")})
    stages = summary["stages"]
    assert code == 1
    assert [stages[n]["status"] for n in stages] == ["passed", "skipped", "timed-out", "failed", "timed-out", "passed"]
    assert stages["broken"]["exit_code"] == 3 and stages["broken"]["reason"] == "exit status 3"
    assert stages["slow"]["limit_seconds"] == 1 and stages["slow"]["seconds"] < 2 + gpu_check.GRACE
    assert stages["stubborn"]["exit_code"] == -9  # ignored the interrupt: killed after the grace period
    assert "fine" in (tmp_path / "out" / gpu_check.LOG_NAME).read_text(encoding="utf-8")


def test_all_passed_or_nothing_to_do_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, summary = _main(tmp_path, monkeypatch, {"ok": _python("pass"),
                                                  "nothing": _returns(gpu_check.Result("skipped", "nothing to do"))})
    assert code == 0 and [s["status"] for s in summary["stages"].values()] == ["passed", "skipped"]
    assert summary["targets"] and {t["verdict"] for t in summary["targets"]} == {"not measured"}


def test_a_run_without_time_starts_no_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages that no longer fit the run's limit are not started, recorded as skipped with the reason, and
    the exit status is 1; stages left out with --stages are not failures."""
    code, summary = _main(tmp_path, monkeypatch, {"a": _python("pass"), "b": _python("pass")}, "--total", "12")
    assert code == 1
    for stage in summary["stages"].values():
        assert stage["status"] == "skipped" and stage["reason"] == "not started: no time left"
    code, summary = _main(tmp_path, monkeypatch, {"a": _python("pass"), "b": _python("raise SystemExit(1)")},
                          "--stages", "a")
    assert code == 0 and summary["stages"]["b"]["reason"] == "not selected (--stages)"


def test_the_script_exits_1_when_a_stage_runs_out_of_time(tmp_path: Path) -> None:
    """Through the shell entry point: the tests stage cut off at one second is timed-out, and the run exits 1."""
    done = run_script("--dry-run", str(tmp_path), "--stages", "environment,tests", "--budgets", "tests=1",
                      timeout=120)
    assert done.returncode == 1, done.stdout[-4000:]
    stages = load_summary(tmp_path)["stages"]
    assert stages["environment"]["status"] == "passed" and stages["tests"]["status"] == "timed-out"
    assert stages["kernels"]["reason"] == "not selected (--stages)"


@pytest.mark.parametrize("args", [(), ("a", "b"), ("--bogus", "x"), ("x", "--budgets", "tests=0"),
                                  ("x", "--budgets", "nonsense=5"), ("x", "--total", "soon"), ("x", "--stages", "all")])
def test_usage_errors(args: tuple[str, ...], tmp_path: Path) -> None:
    """Bad arguments stop the script before any stage, with exit status 2."""
    done = run_script(*(str(tmp_path / a) if a == "x" else a for a in args), timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
    assert not (tmp_path / "x").exists()


def test_every_gpu_marked_test_file_is_selected() -> None:
    """``-k gpu`` selects every gpu-marked test of the chosen files; no gpu-marked test lives elsewhere."""
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
              if "pytest.mark.gpu" in p.read_text(encoding="utf-8")}
    assert marked <= set(gpu_check.TEST_FILES)
    assert gpu_check.GPU_TEST_SELECTION.split(" or ")[0] == "gpu"


# ---------------------------------------------------------------- targets


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
    host = {"d": 1024, "r": 64, "dtype": "bfloat16",
            "target": {"target_us": 10.0, "measured_us": 12.5, "median_us": 13.0, "met": False}}
    rows = report.evaluate_targets({"records": records, "models": model_runs, "grouped": mixed, "host_cost": host})
    by_target: dict[str, list[report.TargetRow]] = {}
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
    (call,) = by_target["FusedAdapter call"]
    assert call.verdict == "missed" and call.gap == "2.5 µs over"
    empty = report.evaluate_targets({})
    assert len(empty) == 6 and {r.verdict for r in empty} == {"not measured"}
    unjudged = report.evaluate_targets({"records": records}, judge=False)
    assert {r.verdict for r in unjudged if r.value is not None} == {"n/a (not judged)"}
    assert report.targets_markdown(rows).count("\n") == len(rows) + 1
