"""The command line checks the optional packages the chosen options need before doing any work."""

import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from benchmarks import __main__ as cli


def _without(monkeypatch: pytest.MonkeyPatch, packages: Iterable[str]) -> None:
    """Make ``packages`` look not installed: out of ``sys.modules`` and not found by ``find_spec``."""
    hidden = set(packages)
    for name in hidden:
        monkeypatch.delitem(sys.modules, name, raising=False)
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # type: ignore[no-untyped-def]
        return None if name in hidden else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets past the start-up checks."""
    def pick_device(args: object) -> str:
        raise AssertionError("work started before the missing package was reported")

    monkeypatch.setattr(cli, "pick_device", pick_device)


def test_out_without_matplotlib_exits_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    _without(monkeypatch, ["matplotlib"])
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--smoke", "--out", str(tmp_path)])
    message = str(exc.value.code)
    assert "matplotlib" in message and "pip install -e '.[bench]'" in message


def test_every_missing_package_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, ["rich", "matplotlib", "transformers", "adapters"])
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quick", "--out", "results", "--providers", "fused,adapterhub"])
    message = str(exc.value.code)
    for package, extra in (("rich", "bench"), ("matplotlib", "bench"), ("transformers", "hf"),
                           ("adapters", "adapterhub")):
        assert f"  {package} (" in message and f"'.[{extra}]'" in message
    assert message.count("  adapters (") == 1


@pytest.mark.parametrize("argv, missing", [
    (["--smoke"], ["transformers"]),                          # models run by default; no --out: no plots
    (["--smoke", "--out", "d", "--models-only"], ["transformers"]),
    (["--smoke", "--out", "d", "--grouped-only"], []),        # no kernel records, so no plots
    (["--smoke", "--no-models"], []),
    (["--smoke", "--out", "d", "--no-models"], ["matplotlib"]),
])
def test_only_what_the_options_use_is_required(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                missing: list[str]) -> None:
    _without(monkeypatch, ["matplotlib", "transformers"])
    lines, _ = cli.missing_extras(cli.parse_args(argv))
    assert [line.split()[0] for line in lines] == missing


def test_adapterhub_by_default_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """AdapterHub comparisons that are only part of the default lists are recorded as skipped, with a
    note at start; named explicitly, the missing package stops the run."""
    _without(monkeypatch, ["adapters"])
    lines, notes = cli.missing_extras(cli.parse_args(["--quick"]))
    assert lines == [] and len(notes) == 1 and "'.[adapterhub]'" in notes[0]
    lines, notes = cli.missing_extras(cli.parse_args(["--quick", "--grouped-providers", "adapterhub_batchsplit"]))
    assert [line.split()[0] for line in lines] == ["adapters"] and notes == []
    lines, notes = cli.missing_extras(cli.parse_args(["--smoke", "--no-models", "--no-grouped"]))
    assert lines == [] and notes == []


def test_nothing_missing_here() -> None:
    """With the extras installed (as in CI) the full option set passes the check."""
    for package in ("rich", "matplotlib", "transformers", "adapters"):
        if sys.modules.get(package) is None and importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    assert cli.missing_extras(cli.parse_args(["--quick", "--out", "d"])) == ([], [])


def test_a_preset_fixes_the_workloads() -> None:
    """The grid options cannot narrow a preset; the training preset needs neither rich nor matplotlib."""
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "headline", "--providers", "fused"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "headline", "--quick"])
    args = cli.parse_args(["--preset", "headline", "--smoke", "--no-models", "--time-limit", "30"])
    assert args.preset == "headline" and args.time_limit == 30.0


def test_train_preset_needs_only_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, ["rich", "matplotlib", "adapters"])
    lines, notes = cli.missing_extras(cli.parse_args(["--preset", "train", "--out", "d"]))
    assert lines == [] and len(notes) == 1  # AdapterHub's variants are skipped, with a note


def test_headline_plan() -> None:
    """The headline preset's kernel jobs, mixed batch and providers, as the GPU acceptance run times them."""
    from benchmarks import grouped, harness

    for size, dtype in (("gpu", "bfloat16"), ("smoke", "float32")):
        argv = ["--preset", "headline", "--no-models"] + (["--smoke"] if size == "smoke" else [])
        jobs, gspec, providers = cli.plan(cli.parse_args(argv), harness, grouped)
        assert [(c.M, c.d, c.r) for c, _, _ in jobs] == [row[:3] for row in cli.HEADLINE_KERNELS[size]]
        assert {c.dtype_name for c, _, _ in jobs} == {dtype} == set(gspec.dtypes)
        assert all(set(ops) <= set(harness.OPS) and set(p) <= set(harness.PROVIDERS) for _, ops, p in jobs)
        assert gspec.n_adapters == (grouped.TARGET_ADAPTERS,) and providers == ["single", "grouped"]
    jobs, _, _ = cli.plan(cli.parse_args(["--preset", "headline", "--models-only"]), harness, grouped)
    assert jobs == []


def test_time_limit_skips_what_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no time left every step is recorded as skipped, the results file is still written, and the run
    is not a failure."""
    assert cli.main(["--smoke", "--no-models", "--no-grouped", "--rows", "1", "--providers", "fused,eager",
                     "--time-limit", "0", "--no-progress", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["records"] == [] and result["host_cost"] is None and result["copy_bw_gbps"] > 0
    assert "not started: time limit of 0 s reached" in capsys.readouterr().out
