"""Tests of the many-adapters-in-one-batch benchmark: byte counts, the index, the providers' agreement on
a tiny case, the ratios, and the ``grouped`` part of the results file written by a smoke run."""

import json
from pathlib import Path

import pytest
import torch

from adapter_fused.reference import reference_adapter
from benchmarks import grouped, harness, report
from benchmarks.__main__ import main

DEVICE = torch.device("cpu")
CASE = grouped.GroupedCase(batch=4, seq=3, d=32, r=8, dtype=torch.float32)


def test_grouped_minimal_bytes() -> None:
    M, d, r, elt = 4096, 1024, 64, 2
    params = 2 * d * r + r + d
    for op in grouped.GROUPED_OPS:
        assert grouped.grouped_minimal_bytes(op, M, d, r, 1, elt) == harness.minimal_bytes(op, M, d, r, elt)
    assert grouped.grouped_minimal_bytes("forward", M, d, r, 8, elt) == 2 * M * d * elt + 8 * params * elt
    # per adapter: its parameters read in the forward, both weight matrices read again and every gradient written
    step = grouped.grouped_minimal_bytes("forward_backward", M, d, r, 2, elt) - grouped.grouped_minimal_bytes(
        "forward_backward", M, d, r, 1, elt)
    assert step == (2 * params + 2 * d * r) * elt


@pytest.mark.parametrize("kind", grouped.INDEX_KINDS)
def test_make_index(kind: str) -> None:
    index = grouped.make_index(kind, 8, 5, 3, DEVICE, seed=1)
    assert index.shape == ((8,) if kind == "sequence" else (8, 5))
    counts = torch.bincount(index.reshape(-1), minlength=3)
    assert counts.max() - counts.min() <= 1 and int(counts.sum()) == index.numel()
    assert torch.equal(index, grouped.make_index(kind, 8, 5, 3, DEVICE, seed=1))


def test_parse_batch_and_grids() -> None:
    assert grouped.parse_batch("64x128") == (64, 128)
    with pytest.raises(ValueError):
        grouped.parse_batch("64")
    full = grouped.expand_grouped(grouped.FULL_GROUPED)
    assert len(full) == len(set(full)) == 4
    assert set(grouped.FULL_GROUPED.n_adapters) == {1, 2, 8, 32}
    providers = grouped.GROUPED_PROVIDERS
    assert grouped.grouped_steps(grouped.SMOKE_GROUPED, providers) == 1 + 4 * 2 * 2


@pytest.mark.parametrize("kind", grouped.INDEX_KINDS)
def test_providers_agree(kind: str) -> None:
    """Every provider computes the same outputs and input gradients as the eager loop (in its own layout)."""
    n = 3
    bank = grouped.make_bank(n, CASE.d, CASE.r, "gelu", 0.5)
    inputs = grouped.make_grouped_inputs(CASE, kind, n, DEVICE)
    eager = grouped.build_work("eager_loop", bank, inputs, DEVICE, CASE.dtype)
    (expected,) = eager.forward(False)
    fn, _ = grouped.grouped_runner("forward_backward", eager)
    fn()
    expected_dx = inputs.x_train.grad
    assert expected_dx is not None
    for provider in ("grouped", "separate", "adapterhub_batchsplit"):
        if grouped.grouped_unavailable(provider, kind, DEVICE):
            continue
        inputs.x_train.grad = None
        work = grouped.build_work(provider, bank, inputs, DEVICE, CASE.dtype)
        outs = work.forward(False)
        x_leaves = work.leaves[:len(work.grads)]
        fn, _ = grouped.grouped_runner("forward_backward", work)
        fn()
        got_dx = torch.cat([leaf.grad for leaf in x_leaves if leaf.grad is not None])
        if provider == "grouped":
            torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_dx, expected_dx, rtol=1e-5, atol=1e-5)
        else:  # rows ordered by adapter
            torch.testing.assert_close(torch.cat(outs), inputs.by_adapter(expected), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_dx, inputs.by_adapter(expected_dx), rtol=1e-5, atol=1e-5)
    single = grouped.build_work("single", bank, inputs, DEVICE, CASE.dtype)
    first = bank[0]
    want = reference_adapter(inputs.x, first.down.weight, first.down.bias, first.up.weight, first.up.bias, "gelu", 0.5)
    torch.testing.assert_close(single.forward(False)[0], want.detach(), rtol=1e-5, atol=1e-5)


def test_batchsplit_skipped_per_token() -> None:
    reason = grouped.grouped_unavailable("adapterhub_batchsplit", "token", DEVICE)
    assert reason is not None and "per-token" in reason


def test_fill_ratios() -> None:
    timing = harness.Timing(2.0, 1.9, 2.1)
    single = grouped.make_grouped_record("forward", "single", CASE, 1, 1, None, timing, 100.0, None)
    mixed = grouped.make_grouped_record("forward", "grouped", CASE, 8, 4, "token", harness.Timing(3.0, 2.9, 3.1),
                                        100.0, None)
    skipped = grouped.make_grouped_record("forward", "separate", CASE, 8, 4, "token", None, 100.0, None, "why")
    records = [single, mixed, skipped]
    grouped.fill_ratios(records)
    assert [r["ratio_to_single"] for r in records] == [1.0, 1.5, None]
    assert skipped["skipped"] == "why" and mixed["skipped"] is None
    assert all(tuple(r) == grouped.GROUPED_RECORD_KEYS for r in records)
    assert mixed["gbps"] == pytest.approx(
        grouped.grouped_minimal_bytes("forward", CASE.M, CASE.d, CASE.r, 4, 4) / 3e-3 / 1e9)


def test_smoke_grouped(tmp_path: Path) -> None:
    """The grouped part of the smoke run: every provider, adapter count, index kind and op recorded, ratios
    consistent with the times, BatchSplit skipped (with its reason) for a per-token index only."""
    assert main(["--smoke", "--grouped-only", "--out", str(tmp_path), "--no-progress"]) == 0
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    assert tuple(result) == report.TOP_LEVEL_KEYS
    assert result["records"] == [] and result["models"] == []
    records = result["grouped"]
    spec = grouped.SMOKE_GROUPED
    mixed = [p for p in grouped.GROUPED_PROVIDERS if p != "single"]
    expected = {(op, "single", 1, None) for op in grouped.GROUPED_OPS} | {
        (op, p, n, kind) for op in grouped.GROUPED_OPS for p in mixed for n in spec.n_adapters
        for kind in spec.index_kinds}
    assert {(r["op"], r["provider"], r["n_adapters"], r["index"]) for r in records} == expected
    assert len(records) == len(expected)
    single = {r["op"]: r["ms_median"] for r in records if r["provider"] == "single"}
    hub_available = harness.adapterhub_available() is None
    for r in records:
        assert tuple(r) == grouped.GROUPED_RECORD_KEYS
        assert (r["dtype"], r["batch"], r["seq"], r["M"]) == ("float32", 4, 4, 16)
        if r["provider"] == "adapterhub_batchsplit" and (r["index"] == "token" or not hub_available):
            assert r["ms_median"] is None and r["ratio_to_single"] is None and r["skipped"]
            continue
        assert r["skipped"] is None
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["ratio_to_single"] == pytest.approx(r["ms_median"] / single[r["op"]])
        assert r["gbps"] > 0 and r["peak_mem_bytes"] is None
        assert r["adapters_used"] == min(r["n_adapters"], 4)
