"""The host-cost benchmark runs on the CPU and measures the GPU launch path up to the launch: one call, and
the per-site table inside models."""

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import host_cost, sites


def test_host_cost_measures_the_launch_path() -> None:
    figures = host_cost.measure(calls=200, repeats=2)
    assert figures["launches_per_call"] == 1.0  # the kernel launch was reached, once per call
    assert figures["bound"] is True  # the module's call went through its bound kernel launch
    for key in ("fused_module", "fused_module_unbound", "fused_function", "fused_module_train", "eager_adapter",
                "linear"):
        assert 0 < figures[f"{key}_us"] <= figures[f"{key}_median_us"] < 10_000, key
    target = figures["target"]
    assert target["target_us"] == host_cost.TARGET_US
    assert target["measured_us"] == figures["fused_module_us"]
    assert target["met"] == (figures["fused_module_us"] <= host_cost.TARGET_US)
    # Timings are not compared here (a loaded CI machine makes them noise); that a module call skips
    # validation and the dispatcher is tested in tests/test_layer.py.


def test_site_table_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The per-site table on both paths and both workloads, at one layer and one repetition: every variant
    is measured; on the GPU launch path each active site of ours reaches the (stubbed) launch once per step,
    on the plain path nothing launches; markdown with the header and one table per workload and path."""
    figures = tmp_path / "sites.json"
    assert host_cost.main(["--sites", "--repeats", "1", "--layers", "1", "--json", str(figures)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(figures.read_text(encoding="utf-8"))["results"]
    assert [(r["workload"], r["path"]) for r in results] == [(w, p) for w in sites.WORKLOADS for p in sites.PATHS]
    hub = importlib.util.find_spec("adapters") is not None
    expected = [v.key for v in sites.variants("gpt2-decode", hub)]
    assert hub == ("adapterhub_accelerated" in expected)
    for result in results:
        rows = {row["key"]: row for row in result["rows"]}
        assert list(rows) == expected
        counts = {key: row["sites"] for key, row in rows.items()}
        assert counts["eager"] == counts["houlsby"] == counts["per_sample_2"] == counts["idle"] == 2
        assert counts["pfeiffer"] == 1 and counts["base"] == counts["base_2"] == 0
        for key, row in rows.items():
            assert row["step_us"] > 0
            assert (row["per_site_us"] is None) == (key in ("base", "base_2"))
            gpu = result["path"] == "gpu"
            launches = row["sites"] if gpu and key not in ("base", "base_2", "eager", "eager_2", "idle", "adapterhub") \
                else 0
            assert row["launches_per_step"] == launches, (result["path"], key)
        assert rows["houlsby"]["vs_eager"] == pytest.approx(rows["houlsby"]["per_site_us"] / rows["eager"]["per_site_us"])
    assert printed.startswith("Host cost per adapter site") and "one torch thread" in printed
    assert printed.count("| variant | batch | sites |") == 4


def test_block_entry(capsys: pytest.CaptureFixture[str]) -> None:
    """Entering a block of per-row names is measured for the first block, the same names and new mixes."""
    assert host_cost.main(["--block-entry", "--layers", "2"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["adapters"] == 8 and figures["layers"] == 2 and figures["sites"] == 4
    assert all(figures[key] > 0 for key in ("first_us", "same_names_us", "new_mix_us"))
