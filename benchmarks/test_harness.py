"""Tests of the harness itself: byte and FLOP counts, the grid, records, providers, model wiring and
the results file written by a (reduced) smoke run."""

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import grouped, harness, models, report
from benchmarks.__main__ import main


def test_minimal_bytes_values() -> None:
    M, d, r, elt = 4096, 1024, 64, 2
    params = 2 * d * r + r + d
    assert harness.minimal_bytes("forward", M, d, r, elt) == 17_041_536 == 2 * M * d * elt + params * elt
    assert harness.minimal_bytes("latency", M, d, r, elt) == 17_041_536
    assert harness.minimal_bytes("forward_train", M, d, r, elt) == 17_565_824
    assert harness.minimal_bytes("backward", M, d, r, elt) == 26_216_576
    assert harness.minimal_bytes("forward_backward", M, d, r, elt) == 17_565_824 + 26_216_576
    assert harness.minimal_bytes("forward", 1, 8, 2, 4, weight_elt=2) == 2 * 8 * 4 + (2 * 8 * 2 + 2 + 8) * 2
    with pytest.raises(ValueError):
        harness.minimal_bytes("sideways", M, d, r, elt)


def test_nominal_flops() -> None:
    assert harness.nominal_flops("forward", 10, 20, 3) == 4 * 10 * 20 * 3
    assert harness.nominal_flops("backward", 10, 20, 3) == 8 * 10 * 20 * 3
    assert harness.nominal_flops("forward_backward", 10, 20, 3) == 12 * 10 * 20 * 3


def test_grids() -> None:
    full = harness.expand_grid(harness.FULL_GRID)
    # ranks per width after d/16 is folded in: 768 -> 4, 1024 -> 3, 4096 -> 3, 8192 -> 4
    assert len(full) == 14 * 6 * 3
    assert len(set(full)) == len(full)
    assert {c.r for c in full if c.d == 8192} == {16, 64, 256, 512}
    quick = harness.expand_grid(harness.QUICK_GRID)
    assert set(quick) <= set(full)
    assert harness.resolve_rank("d/16", 768) == 48
    assert harness.parse_rank("64") == 64
    big, small = harness.Case(4096, 64, 16, torch.float32), harness.Case(16, 64, 16, torch.float32)
    assert "latency" not in harness.ops_for(big, harness.OPS)
    assert harness.ops_for(small, harness.OPS) == list(harness.OPS)
    assert small.dtype_name == "float32"


def test_cli_names_match_harness() -> None:
    from benchmarks import __main__ as cli

    assert cli.OPS == harness.OPS and cli.PROVIDERS == harness.PROVIDERS
    assert cli.GROUPED_PROVIDERS == grouped.GROUPED_PROVIDERS and cli.INDEX_KINDS == grouped.INDEX_KINDS


def test_quantile() -> None:
    assert harness.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert harness.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)


def test_record_schema() -> None:
    case = harness.Case(1024, 256, 16, torch.bfloat16)
    record = harness.make_record("forward", "fused", case, harness.Timing(1.0, 0.9, 1.1), 1000.0, 123)
    assert tuple(record) == harness.RECORD_KEYS
    assert record["dtype"] == "bfloat16"
    expected_gbps = harness.minimal_bytes("forward", 1024, 256, 16, 2) / 1e-3 / 1e9
    assert record["gbps"] == pytest.approx(expected_gbps)
    assert record["pct_of_copy_bw"] == pytest.approx(100 * expected_gbps / 1000.0)
    skipped = harness.make_record("forward", "compile", case, None, 1000.0, None)
    assert tuple(skipped) == harness.RECORD_KEYS
    assert skipped["ms_median"] is None and skipped["gbps"] is None


def test_providers_agree() -> None:
    device = torch.device("cpu")
    case = harness.Case(5, 32, 8, torch.float32)
    torch.manual_seed(0)
    source = harness.make_adapter("eager", case.d, case.r, "gelu", 0.5)
    inputs = harness.make_inputs(case, device)
    expected = harness.build_provider("eager", source, device, case.dtype)(inputs.x)  # type: ignore[arg-type]
    for provider in ("fused", "adapterhub"):
        if harness.provider_unavailable(provider, device):
            continue
        got = harness.build_provider(provider, source, device, case.dtype)(inputs.x)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_insertion() -> None:
    spec = models.BERT_SMOKE
    bert = models.build_bert(spec, "eager")
    wrapped = [m for m in bert.modules() if isinstance(m, models.WithAdapter)]
    assert len(wrapped) == 2 * spec.layers
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable)
    gpt2 = models.build_gpt2(models.GPT2_SMOKE, "fused")
    assert sum(isinstance(m, models.WithAdapter) for m in gpt2.modules()) == 2 * models.GPT2_SMOKE.layers
    assert not any(isinstance(m, models.WithAdapter) for m in models.build_gpt2(models.GPT2_SMOKE, "base").modules())


def test_adapterhub_blocks_run_in_bert() -> None:
    if harness.adapterhub_available():
        pytest.skip("adapters library not importable")
    from adapters.methods.modeling import Adapter

    spec = models.BERT_SMOKE
    bert = models.build_bert(spec, "adapterhub")
    calls: list[int] = []
    for module in bert.modules():
        if isinstance(module, Adapter):
            module.register_forward_hook(lambda *args: calls.append(1))
    bert(input_ids=torch.randint(0, spec.vocab, (1, spec.seq)))
    assert len(calls) == 2 * spec.layers


def test_smoke_results_file(tmp_path: Path) -> None:
    """A reduced smoke run writes the results file with exactly the documented schema, and both plots."""
    argv = ["--smoke", "--out", str(tmp_path), "--rows", "1,8", "--providers", "fused,eager",
            "--no-models", "--no-grouped", "--no-progress"]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("*.json")
    assert re.fullmatch(r"adapter_bench_cpu-interpreter_\d{4}-\d{2}-\d{2}_\d{6}\.json", json_path.name)
    for suffix in ("_speedup.png", "_copy_bw.png"):
        png = json_path.with_name(json_path.stem + suffix)
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(json_path.read_text())
    assert tuple(result) == report.TOP_LEVEL_KEYS
    assert result["device"].startswith("CPU")
    assert result["command"].startswith("python -m benchmarks --smoke")
    assert result["copy_bw_gbps"] > 0
    assert result["models"] == [] and result["grouped"] == []
    records = result["records"]
    assert len(records) == 2 * 2 * len(harness.OPS)
    for record in records:
        assert tuple(record) == harness.RECORD_KEYS
        assert record["op"] in harness.OPS and record["provider"] in ("fused", "eager")
        assert record["dtype"] == "float32"
        assert record["ms_p20"] <= record["ms_median"] <= record["ms_p80"]
        assert record["gbps"] > 0 and record["pct_of_copy_bw"] > 0
        assert record["peak_mem_bytes"] is None  # CPU: no peak statistics


def test_smoke_models(tmp_path: Path) -> None:
    """The model-level part of the smoke run: every provider measured (AdapterHub's where it is installed,
    else skipped with the reason), tokens/s consistent with time."""
    assert main(["--smoke", "--models-only", "--out", str(tmp_path), "--no-progress"]) == 0
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert result["records"] == [] and result["grouped"] == [] and result["host_cost"] is None
    seen = {(m["model"], m["provider"]) for m in result["models"]}
    assert seen == {(models.BERT_SMOKE.name, p) for p in models.BERT_PROVIDERS} | {
        (models.GPT2_SMOKE.name, p) for p in models.GPT2_PROVIDERS} | {
        (models.DECODER_SMOKE.name, p) for p in models.DECODE_PROVIDERS}
    for m in result["models"]:
        if m["provider"] == "adapterhub" and harness.adapterhub_available():
            assert m["skipped"] == harness.adapterhub_available() and m["ms_median"] is None
            continue
        assert m["skipped"] is None
        assert m["tokens_per_s"] == pytest.approx(m["batch"] * m["seq"] / (m["ms_median"] * 1e-3))
