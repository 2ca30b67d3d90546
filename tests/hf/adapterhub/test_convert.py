"""Adapters saved by AdapterHub load into a plain transformers model and reproduce AdapterHub's outputs;
configs the fused adapters cannot express and damaged weight files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapter_fused.hf import load_adapter, set_active_adapters

from ..models import ARCHITECTURES, hidden_states, make_inputs, make_model
from .hub import CONFIGS, adapterhub_model

adapters = pytest.importorskip("adapters")

pytestmark = pytest.mark.adapterhub

@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapterhub_saved_adapter_reproduces_its_outputs(tmp_path: Path, arch: str, config: str) -> None:
    hub = adapterhub_model(arch, config)
    inputs = make_inputs()
    with torch.no_grad():
        expected = hidden_states(hub, inputs)
    safetensors = config == "double_seq_bn"
    hub.save_adapter(str(tmp_path), "hub", use_safetensors=safetensors)
    assert (tmp_path / ("adapter.safetensors" if safetensors else "pytorch_adapter.bin")).is_file()
    model = make_model(arch)
    base = hidden_states(model, inputs)
    assert load_adapter(model, tmp_path) == "hub"
    set_active_adapters(model, "hub")
    out = hidden_states(model, inputs)
    assert (expected - base).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_unsupported_adapterhub_config_refused(tmp_path: Path) -> None:
    hub = adapterhub_model("bert", adapters.CompacterConfig(reduction_factor=4))
    hub.save_adapter(str(tmp_path), "hub")
    with pytest.raises(ValueError, match=r"adapter_config\.json: the fused adapter cannot express this AdapterHub "
                                         r"config: PHM"):
        load_adapter(make_model("bert"), tmp_path)


def test_adapterhub_truncated_bin_refused(tmp_path: Path) -> None:
    hub = adapterhub_model("bert", "seq_bn")
    hub.save_adapter(str(tmp_path), "hub")
    weights = tmp_path / "pytorch_adapter.bin"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"pytorch_adapter\.bin: cannot read adapter weights"):
        load_adapter(make_model("bert"), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["name"] == "hub"
