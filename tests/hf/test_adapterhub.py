"""The AdapterHub bridge: adapters saved by AdapterHub load and reproduce its outputs; accelerate()
runs AdapterHub's bottleneck adapters on the fused kernel with unchanged outputs and gradients."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from .models import ARCHITECTURES, hidden_states, make_inputs, make_model, randomize

from adapter_fused.hf import accelerate, load_adapter, set_active_adapters  # noqa: E402

adapters = pytest.importorskip("adapters")

CONFIGS = ["seq_bn", "double_seq_bn", "par_bn"]


def adapterhub_model(arch: str, config: object, name: str = "hub") -> torch.nn.Module:
    model = make_model(arch)
    adapters.init(model)
    model.add_adapter(name, config=config)
    randomize([p for n, p in model.named_parameters() if f"adapters.{name}." in n])
    model.set_active_adapters(name)
    return model.eval()


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
    hub = adapterhub_model("bert", adapters.SeqBnConfig(ln_after=True, use_gating=True))
    hub.save_adapter(str(tmp_path), "hub")
    with pytest.raises(ValueError, match=r"adapter_config\.json: the fused adapter cannot express this AdapterHub "
                                         r"config: .*ln_after.*gating"):
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


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama"])
def test_accelerate_keeps_outputs_and_gradients(arch: str, config: str, launches) -> None:  # type: ignore[no-untyped-def]
    hub = adapterhub_model(arch, config)
    hub.train_adapter("hub")
    hub.eval()
    fast = copy.deepcopy(hub)
    inputs = make_inputs()
    names = [n for n, _ in fast.named_parameters()]
    report = accelerate(fast)
    assert [n for n, _ in fast.named_parameters()] == names
    sites = 2 if config == "double_seq_bn" else 1
    assert len(report.converted) == 2 * sites and report.skipped == ()
    probe = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    expected = hidden_states(hub, inputs)
    (expected * probe).sum().backward()
    launches.clear()
    out = hidden_states(fast, inputs)
    assert len(launches) >= 2 * sites  # the fused kernel ran
    (out * probe).sum().backward()
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    grads = dict(hub.named_parameters())
    trained = [(n, p) for n, p in fast.named_parameters() if p.requires_grad]
    assert trained and all("adapters.hub." in n for n, _ in trained)
    for name, parameter in trained:
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-4, atol=1e-5)


def test_accelerate_leaves_uncovered_adapters_and_warns_once() -> None:
    model = make_model("bert")
    adapters.init(model)
    model.add_adapter("plain", config="seq_bn")
    model.add_adapter("normed", config=adapters.SeqBnConfig(ln_before=True))
    model.add_adapter("gated", config=adapters.SeqBnConfig(use_gating=True))
    model.add_adapter("learned", config=adapters.SeqBnConfig(scaling="learned"))
    model.add_adapter("phm", config=adapters.CompacterConfig(reduction_factor=8))
    with pytest.warns(UserWarning) as record:
        report = accelerate(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 10 adapter(s)" in message  # compacter sits at both sites
    for fragment in ("normed (layer norm before", "gated (gating", "learned (learned scaling", "phm (PHM"):
        assert fragment in message
    assert sorted(report.converted) == [f"encoder.layer.{i}.output.adapters.plain" for i in range(2)]
    # every adapter, converted or not, still runs and matches a twin that was not accelerated
    twin = make_model("bert")
    adapters.init(twin)
    for name, cfg in (("plain", "seq_bn"), ("gated", adapters.SeqBnConfig(use_gating=True))):
        twin.add_adapter(name, config=cfg)
    state = {k: v for k, v in model.state_dict().items() if ".plain." in k or ".gated." in k}
    twin.load_state_dict(state, strict=False)
    for name in ("plain", "gated"):
        model.set_active_adapters(name)
        twin.set_active_adapters(name)
        torch.testing.assert_close(hidden_states(model, make_inputs()), hidden_states(twin, make_inputs()),
                                   rtol=2e-5, atol=2e-5)
    with pytest.warns(UserWarning, match="left 10 adapter"):
        again = accelerate(model)
    assert again.converted == ()  # already converted adapters are not converted twice
