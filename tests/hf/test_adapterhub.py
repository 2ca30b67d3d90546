"""The AdapterHub bridge: adapters saved by AdapterHub load and reproduce its outputs; accelerate()
runs AdapterHub's bottleneck adapters on the fused kernel with unchanged outputs and gradients."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from .models import ARCHITECTURES, hidden_states, make_inputs, make_model, randomize

from adapter_fused import fused_adapter  # noqa: E402
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
    model.add_adapter("dropped", config=adapters.SeqBnConfig(dropout=0.1))
    model.add_adapter("gated", config=adapters.SeqBnConfig(use_gating=True))
    model.add_adapter("learned", config=adapters.SeqBnConfig(scaling="learned"))
    model.add_adapter("phm", config=adapters.CompacterConfig(reduction_factor=8))
    with pytest.warns(UserWarning) as record:
        report = accelerate(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 6 adapter(s)" in message  # compacter sits at both sites
    for fragment in ("dropped (dropout 0.1", "phm (PHM"):
        assert fragment in message
    assert sorted(report.converted) == [f"encoder.layer.{i}.output.adapters.{name}"
                                        for i in range(2) for name in ("gated", "learned", "plain")]
    # every adapter, converted or not, still runs and matches a twin that was not accelerated
    twin = make_model("bert")
    adapters.init(twin)
    for name, cfg in (("plain", "seq_bn"), ("dropped", adapters.SeqBnConfig(dropout=0.1))):
        twin.add_adapter(name, config=cfg)
    state = {k: v for k, v in model.state_dict().items() if ".plain." in k or ".dropped." in k}
    twin.load_state_dict(state, strict=False)
    for name in ("plain", "dropped"):
        model.set_active_adapters(name)
        twin.set_active_adapters(name)
        torch.testing.assert_close(hidden_states(model, make_inputs()), hidden_states(twin, make_inputs()),
                                   rtol=2e-5, atol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = accelerate(model)  # nothing new: no second warning
    assert again.converted == ()  # already converted adapters are not converted twice
    assert again.skipped == report.skipped


def hub_layer(model: torch.nn.Module, name: str = "hub") -> torch.nn.Module:
    """The first AdapterHub bottleneck layer of ``model`` holding adapter ``name``."""
    from adapters.methods.bottleneck import BottleneckLayer

    return next(m for m in model.modules() if isinstance(m, BottleneckLayer) and name in getattr(m, "adapters", {}))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_accelerated_parallel_adapter_is_as_precise_as_eager(arch: str) -> None:
    """At the parallel adapter's site, bf16 error against a float64 copy of the same model: the fused
    path adds the adapter output to the sub-block output in the kernel (no difference formed)."""
    hub = adapterhub_model(arch, "par_bn")
    generator = torch.Generator().manual_seed(8)
    h = torch.randn(8, 64, 32, generator=generator).bfloat16()  # sub-block output, (b, t, d)
    x = torch.randn(8, 64, 32, generator=generator).bfloat16()  # block input
    truth_model = copy.deepcopy(hub).double()
    eager_model = copy.deepcopy(hub).to(torch.bfloat16)
    fast_model = copy.deepcopy(hub).to(torch.bfloat16)
    accelerate(fast_model)
    with torch.no_grad():
        truth = hub_layer(truth_model).bottleneck_layer_forward(h.double(), x.double(), None)
        eager = hub_layer(eager_model).bottleneck_layer_forward(h, x, None)
        fast = hub_layer(fast_model).bottleneck_layer_forward(h, x, None)
        adapter = hub_layer(fast_model).adapters["hub"]
        one_pass = fused_adapter(x, adapter.adapter_down[0].weight, adapter.adapter_down[0].bias,
                                 adapter.adapter_up.weight, adapter.adapter_up.bias, "relu", adapter.scaling,
                                 residual=h)
    assert torch.equal(fast, one_pass + x)  # h + s * f(x) from the kernel, then the block residual
    eager_error, fast_error = (eager.double() - truth).abs(), (fast.double() - truth).abs()
    assert fast_error.mean() <= eager_error.mean()
    assert fast_error.max() <= eager_error.max()


@pytest.mark.parametrize("setup", ["stack", "average", "batch_split"])
def test_accelerate_parallel_adapters_in_compositions(setup: str) -> None:
    """Compositions that combine the adapters' outputs before the sub-block output is added get
    ``s * f(x)`` from each adapter, computed directly."""
    from adapters.composition import Average, BatchSplit, Stack

    model = make_model("bert")
    adapters.init(model)
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, config="par_bn")
        randomize([p for n, p in model.named_parameters() if f"adapters.{name}." in n], seed=20 + i)
    chosen = {"stack": Stack("a"), "average": Average("a", "b", weights=[0.25, 0.75]),
              "batch_split": BatchSplit("a", "b", batch_sizes=[1, 1])}[setup]
    model.set_active_adapters(chosen)
    model.eval()
    fast = copy.deepcopy(model)
    assert len(accelerate(fast).converted) == 4
    inputs = make_inputs()
    with torch.no_grad():
        expected = hidden_states(model, inputs)
        out = hidden_states(fast, inputs)
        base = hidden_states(make_model("bert"), inputs)
    assert (expected - base).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
