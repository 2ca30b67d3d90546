"""The training preset, ``python -m benchmarks --preset train``, at its tiny size on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report, train

ROOT = Path(__file__).resolve().parents[1]


def test_train_preset_end_to_end(tmp_path: Path) -> None:
    """One Trainer epoch per variant (in a fresh process without the interpreter, so our op takes its plain
    PyTorch path, as a CPU run does): the results file carries the ``train`` records; every variant whose
    package is installed is measured, the others are skipped with the reason; the same model, data and seed
    give every measured variant the same training loss."""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "train", "--smoke", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("adapter_bench_cpu_*.json")
    result = json.loads(path.read_text(encoding="utf-8"))
    assert tuple(result) == report.TOP_LEVEL_KEYS and result["records"] == []
    assert result["train"]["spec"]["model"]["name"] == train.TINY_SPEC.model.name
    records = {r["variant"]: r for r in result["train"]["records"]}
    assert tuple(records) == train.VARIANTS
    losses = []
    for variant, record in records.items():
        assert tuple(record) == train.RECORD_KEYS
        if train.unavailable(variant):
            assert record["skipped"] == train.unavailable(variant) and record["tokens_per_s"] is None
            continue
        assert record["skipped"] is None, record
        spec = train.TINY_SPEC
        assert record["tokens_per_s"] == pytest.approx(spec.samples * spec.model.seq / record["epoch_s"])
        assert record["trainable_params"] > 0 and record["peak_mem_kind"]
        losses.append(record["train_loss"])
        assert math.isfinite(record["train_loss"])
    assert records["ours"]["path"] == "plain PyTorch"
    assert len(losses) >= 1 and max(losses) - min(losses) < 1e-3 * max(losses)
    assert "| variant | our op runs |" in done.stdout


def test_a_missing_package_skips_its_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AdapterHub its two variants are skipped with the reason, and without transformers every
    variant is, before any work."""
    for missing, skipped in (("adapters", ("adapterhub", "adapterhub_accelerated")), ("transformers", train.VARIANTS)):
        monkeypatch.setattr(train, "installed", lambda package, missing=missing: package != missing)
        for variant in skipped:
            record = train.run_variant(train.TINY_SPEC, variant, "cpu")
            assert missing in record["skipped"] and record["epoch_s"] is None
