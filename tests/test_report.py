"""The main job, ``python -m adapter_fused``: runs on this machine and reports parity and timings."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_report_runs_and_writes_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the report must switch it on itself
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "adapter_fused", "--rows", "20", "--d", "48", "--r", "8", "--dtypes", "float32,bfloat16",
         "--activation", "gelu", "--repeats", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "max rel err fused" in proc.stdout
    result = json.loads(out.read_text())
    cases = {case["dtype"]: case for case in result["results"]}
    assert set(cases) == {"float32", "bfloat16"}
    assert "interpreter" in result["device"] or "CUDA" in result["device"]
    assert max(cases["float32"]["fused_error"].values()) <= 1e-5
    assert max(cases["bfloat16"]["fused_error"].values()) <= 3e-2
    assert set(cases["float32"]["fused_error"]) == {"y", "dx", "dW_down", "db_down", "dW_up", "db_up"}
    assert cases["float32"]["fused_forward_ms"] > 0
