"""examples/train_adapter.py runs end to end (a few Trainer steps) and the reloaded adapter and
checkpoint give the trained model's logits exactly."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_adapter.py"


def test_train_adapter_example(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_adapter_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "2", "--hidden", "32", "--train-size", "8", "--test-size", "8",
                          "--batch-size", "4", "--output-dir", str(tmp_path)])
    assert math.isfinite(result["training_loss"]) and 0.0 < result["training_loss"] < 5.0
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["logit_difference"] == 0.0
    assert result["checkpoint_logit_difference"] == 0.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "head_config.json").is_file()
    assert (tmp_path / "checkpoint" / "adapter_fused_setup.json").is_file()
