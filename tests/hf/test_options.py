"""AdapterHub's bottleneck options on fused adapters: per-layer widths, leave_out, original_ln_after,
layer norms inside the adapter, learned scaling, gating and dropout. Parity with AdapterHub's own
outputs on the same (random, non-default) weights, float64 truth for training-mode dropout and for
the gradient of a learned scale, and round trips through save_adapter / load_adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapter_fused.hf import (
    AdapterConfig,
    Placement,
    adapter_summary,
    add_adapter,
    load_adapter,
    per_sample_adapters,
    save_adapter,
    set_active_adapters,
)
from adapter_fused.hf.modules import BottleneckAdapter
from adapter_fused.reference import reference_adapter

from .models import hidden_states, make_inputs, make_model, randomize

# (AdapterHub config class, its options) -> what each exercises
HUB_CASES = {
    "ln_before+ln_after": ("SeqBnConfig", {"ln_before": True, "ln_after": True}),
    "ln_after residual before": ("DoubleSeqBnConfig", {"ln_after": True, "adapter_residual_before_ln": True}),
    "gating": ("DoubleSeqBnConfig", {"use_gating": True}),
    "learned scaling": ("SeqBnConfig", {"scaling": "learned"}),
    "channel scaling": ("DoubleSeqBnConfig", {"scaling": "channel"}),
    "per-layer reduction": ("DoubleSeqBnConfig", {"reduction_factor": {"default": 16, "1": 4}}),
    "leave_out": ("SeqBnConfig", {"leave_out": [0], "reduction_factor": 8}),
    "no original_ln_after": ("SeqBnConfig", {"original_ln_after": False}),
    "no original_ln_after, before": ("DoubleSeqBnConfig", {"original_ln_after": False, "original_ln_before": True,
                                                           "residual_before_ln": False}),
    "parallel, no original_ln_after": ("ParBnConfig", {"original_ln_after": False, "ln_after": True}),
    "parallel gating": ("ParBnConfig", {"use_gating": True, "scaling": "channel"}),
    "dropout (eval)": ("SeqBnConfig", {"dropout": 0.3, "use_gating": True, "ln_before": True}),
    "invertible (nice)": ("SeqBnInvConfig", {"inv_adapter_reduction_factor": 4}),
}
PRE_NORM_CASES = ("ln_before+ln_after", "gating", "no original_ln_after", "no original_ln_after, before",
                  "parallel, no original_ln_after", "invertible (nice)")


def hub_model(arch: str, config: object, seed: int = 3):  # type: ignore[no-untyped-def]
    """A tiny model with one AdapterHub adapter "hub", every adapter parameter (biases, layer norms,
    gates, scales included) set to random non-default values."""
    adapters = pytest.importorskip("adapters")
    model = make_model(arch)
    adapters.init(model)
    model.add_adapter("hub", config=config)
    params = [p for n, p in model.named_parameters() if "adapters.hub." in n]
    randomize(params, seed=seed, std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters.hub." in name and (name.endswith("scaling") or ("norm" in name and name.endswith("weight"))):
                p.add_(1.0)  # scales and norm gains around 1, so the adapter's term stays visible
    model.set_active_adapters("hub")
    return model.eval()


def hub_parity(tmp_path: Path, arch: str, case: str) -> torch.nn.Module:
    adapters = pytest.importorskip("adapters")
    cls, options = HUB_CASES[case]
    hub = hub_model(arch, getattr(adapters, cls)(**options))
    inputs = make_inputs()
    with torch.no_grad():
        expected = hidden_states(hub, inputs)
    hub.save_adapter(str(tmp_path), "hub", use_safetensors=False)
    model = make_model(arch)
    base = hidden_states(model, inputs)
    assert load_adapter(model, tmp_path) == "hub"
    set_active_adapters(model, "hub")
    with torch.no_grad():
        out = hidden_states(model, inputs)
    assert (expected - base).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.adapterhub
@pytest.mark.parametrize("case", list(HUB_CASES))
def test_adapterhub_option_parity_bert(tmp_path: Path, case: str) -> None:
    hub_parity(tmp_path, "bert", case)


@pytest.mark.adapterhub
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("case", PRE_NORM_CASES)
def test_adapterhub_option_parity_pre_norm(tmp_path: Path, arch: str, case: str) -> None:
    hub_parity(tmp_path, arch, case)


@pytest.mark.adapterhub
def test_adapterhub_options_convert_to_config(tmp_path: Path) -> None:
    adapters = pytest.importorskip("adapters")
    hub = hub_model("bert", adapters.SeqBnConfig(reduction_factor={"default": 16, "1": 4}, leave_out=[0],
                                                 ln_before=True, use_gating=True, scaling="channel", dropout=0.1,
                                                 original_ln_after=False, inv_adapter="nice",
                                                 inv_adapter_reduction_factor=2))
    hub.save_adapter(str(tmp_path), "hub")
    model = make_model("bert")
    load_adapter(model, tmp_path)
    config = model.base_model._fused_adapter_state.configs["hub"]
    assert config.reduction_factor == {"default": 16, "1": 4} and config.leave_out == (0,)
    assert (config.ln_before, config.ln_after, config.use_gating, config.scale, config.dropout) == (
        True, False, True, "channel", 0.1)
    assert config.layout.original_ln_after is False
    assert (config.inv_adapter, config.inv_adapter_reduction_factor) == ("nice", 2)
    modules = model.base_model.fused_adapters["hub"]
    assert list(modules) == ["1", "invertible"] and modules["1"]["ffn"].bottleneck == 8
    summary = adapter_summary(model)
    assert summary.adapters[0].unfused == ("ln_before", "use_gating", "dropout")
    assert "no: ln_before, use_gating, dropout" in str(summary)


@pytest.mark.adapterhub
def test_adapterhub_dropout_in_training_matches_with_the_same_seed() -> None:
    """AdapterHub's Adapter module and ours, same weights, training mode, same random seed: the
    dropout masks coincide and so do the outputs."""
    pytest.importorskip("adapters")
    from adapters import SeqBnConfig
    from adapters.methods.modeling import Adapter

    config = SeqBnConfig(dropout=0.4, use_gating=True, ln_after=True, scaling="learned")
    torch.manual_seed(0)
    theirs = Adapter("a", 32, 8, config)
    randomize(theirs.parameters(), seed=5, std=0.3)
    ours = BottleneckAdapter(32, 8, "relu", "learned", ln_after=True, use_gating=True, dropout=0.4)
    mapping = {"adapter_down.0": "down", "adapter_up": "up", "adapter_norm_after": "norm_after", "gate": "gate"}
    state = {}
    for key, value in theirs.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        state[f"{mapping[prefix]}.{leaf}" if prefix else key] = value
    ours.load_state_dict(state)
    z = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    residual = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    theirs.train()
    ours.train()
    torch.manual_seed(11)
    expected = theirs(z, residual)[0]
    torch.manual_seed(11)
    out = ours(z, residual)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(12)
    assert (ours(z, residual) - out).abs().max() > 1e-3  # another seed, another mask


def float64_truth(module: BottleneckAdapter, z: torch.Tensor, residual: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """What the module computes, in float64, written out by hand (mask: dropout's kept/(1-p), or None)."""
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    z, residual = z.double(), residual.double()
    a = F.layer_norm(z, (z.shape[-1],), p["norm_before.weight"], p["norm_before.bias"]) if "norm_before.weight" in p \
        else z
    s = p.get("scaling", torch.tensor([module.scale], dtype=torch.float64))
    term = s * (torch.relu(a @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"])
    if mask is not None:
        term = term * mask.double()
    if "gate.weight" in p:
        term = term * torch.sigmoid(z @ p["gate.weight"].T + p["gate.bias"]).mean(dim=1, keepdim=True)
    if "norm_after.weight" in p:
        normed = lambda t: F.layer_norm(t, (t.shape[-1],), p["norm_after.weight"], p["norm_after.bias"])
        return normed(residual + term) if module.adapter_residual_before_ln else residual + normed(term)
    return residual + term


@pytest.mark.parametrize("options", [
    {"ln_before": True, "use_gating": True},
    {"ln_after": True, "adapter_residual_before_ln": True, "scale": "channel"},
    {"ln_after": True, "scale": 0.7},
])
def test_dropout_in_training_against_float64(options: dict) -> None:
    torch.manual_seed(0)
    module = BottleneckAdapter(32, 8, "relu", dropout=0.25, **options)
    randomize(module.parameters(), seed=7, std=0.3)
    z = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    residual = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    module.train()
    torch.manual_seed(21)
    out = module(z, residual)
    torch.manual_seed(21)  # the same draw, for a tensor of the same shape, dtype and device
    mask = F.dropout(torch.ones_like(z), 0.25, training=True)
    assert 0 < (mask == 0).sum() < mask.numel()
    torch.testing.assert_close(out.double(), float64_truth(module, z, residual, mask), rtol=1e-5, atol=1e-5)
    module.eval()  # no dropout: the plain composition
    torch.testing.assert_close(module(z, residual).double(), float64_truth(module, z, residual, None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["learned", "channel"])
def test_learned_scale_is_one_launch_and_its_gradient_matches_float64(scale: str, launches) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    module = BottleneckAdapter(32, 8, "gelu", scale)
    randomize(module.parameters(), seed=9, std=0.3)
    assert module.unfused_options == ()
    truth = BottleneckAdapter(32, 8, "gelu", scale, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    probe = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    launches.clear()
    out = module(x)
    assert len(launches) == 1  # scale folded into the up-projection: one fused launch
    (out * probe).sum().backward()
    expected = reference_adapter(x.double(), truth.down.weight, truth.down.bias,
                                 truth.scaling[:, None] * truth.up.weight, truth.scaling * truth.up.bias, "gelu", 1.0)
    (expected * probe.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert module.scaling.grad is not None and module.scaling.grad.abs().max() > 1e-3
    for (name, p), q in zip(module.named_parameters(), truth.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5, msg=name)


def own_config_round_trip(tmp_path: Path, arch: str, config: AdapterConfig) -> torch.nn.Module:
    model = make_model(arch)
    add_adapter(model, "task", config)
    randomize(model.base_model.fused_adapters.parameters(), seed=4, std=0.3)
    set_active_adapters(model, "task")
    inputs = make_inputs()
    with torch.no_grad():
        expected = hidden_states(model, inputs)
        base = hidden_states(make_model(arch), inputs)
    assert (expected - base).abs().max() > 0.05
    save_adapter(model, "task", tmp_path / "task")
    other = make_model(arch)
    load_adapter(other, tmp_path / "task")
    set_active_adapters(other, "task")
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(other, inputs), expected, rtol=0, atol=0)
    return other


OWN_CONFIGS = [
    AdapterConfig("houlsby", reduction_factor={"default": 8, "1": 2}, leave_out=[0], ln_after=True),
    AdapterConfig("pfeiffer", scale="channel", use_gating=True, dropout=0.1, ln_before=True),
    AdapterConfig(Placement(attention=True, ffn=True, original_ln_after=False), scale="learned",
                  ln_after=True, adapter_residual_before_ln=True),
    AdapterConfig("parallel", ln_after=True, use_gating=True),
]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("config", OWN_CONFIGS, ids=range(len(OWN_CONFIGS)))
def test_own_config_round_trip(tmp_path: Path, arch: str, config: AdapterConfig) -> None:
    other = own_config_round_trip(tmp_path, arch, config)
    saved = other.base_model._fused_adapter_state.configs["task"]
    assert saved == config and hash(saved) == hash(config)


@pytest.mark.adapterhub
def test_own_config_matches_adapterhub(tmp_path: Path) -> None:
    """An adapter added with our AdapterConfig computes what AdapterHub computes with the same options
    and weights (weights copied from AdapterHub's module into ours)."""
    adapters = pytest.importorskip("adapters")
    hub = hub_model("bert", adapters.DoubleSeqBnConfig(reduction_factor={"default": 8, "0": 4}, ln_before=True,
                                                       use_gating=True, scaling="channel"))
    model = make_model("bert")
    add_adapter(model, "hub", AdapterConfig("houlsby", reduction_factor={"default": 8, "0": 4}, ln_before=True,
                                            use_gating=True, scale="channel"))
    hub.save_adapter(str(tmp_path), "hub")
    from adapter_fused.hf.adapterhub.convert import weights_from_adapterhub

    _, weights = weights_from_adapterhub(torch.load(tmp_path / "pytorch_adapter.bin"), "test")
    model.base_model.fused_adapters["hub"].load_state_dict(weights)
    set_active_adapters(model, "hub")
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(model, make_inputs()), hidden_states(hub, make_inputs()),
                                   rtol=1e-5, atol=1e-5)


def test_plain_configs_stay_plain_fused_adapters() -> None:
    from adapter_fused import FusedAdapter

    model = make_model("bert")
    add_adapter(model, "plain", AdapterConfig("houlsby", reduction_factor={"default": 8, "1": 4}, leave_out=[0]))
    add_adapter(model, "extra", AdapterConfig("houlsby", use_gating=True))
    modules = model.base_model.fused_adapters
    assert type(modules["plain"]["1"]["ffn"]) is FusedAdapter and "0" not in modules["plain"]
    assert modules["plain"]["1"]["ffn"].bottleneck == 8
    assert isinstance(modules["extra"]["0"]["ffn"], BottleneckAdapter)
    rows = {row.name: row for row in adapter_summary(model).adapters}
    assert rows["plain"].unfused == () and rows["extra"].unfused == ("use_gating",)


def test_per_sample_adapters_with_options() -> None:
    model = make_model("bert")
    add_adapter(model, "a", AdapterConfig("pfeiffer", leave_out=[1]))
    add_adapter(model, "b", AdapterConfig("pfeiffer", leave_out=[1]))
    add_adapter(model, "c", AdapterConfig("pfeiffer"))
    add_adapter(model, "wide", AdapterConfig("pfeiffer", reduction_factor={"default": 16, "1": 4}))
    add_adapter(model, "gated", AdapterConfig("pfeiffer", use_gating=True))
    randomize(model.base_model.fused_adapters.parameters(), seed=6, std=0.3)
    inputs = make_inputs()
    for names in (["a", "b"], ["a", "c"], ["c", "wide"]):  # the same layers; different layers; different widths
        with per_sample_adapters(model, names):
            both = hidden_states(model, inputs)
        for i, name in enumerate(names):
            set_active_adapters(model, name)
            torch.testing.assert_close(both[i], hidden_states(model, inputs)[i], rtol=1e-5, atol=1e-5)
        set_active_adapters(model, None)
    with pytest.raises(ValueError, match="'gated' uses use_gating"), per_sample_adapters(model, ["gated", None]):
        pass


def test_bad_options_refused_and_model_unchanged() -> None:
    with pytest.raises(ValueError, match="reduction_factor keys"):
        AdapterConfig("pfeiffer", reduction_factor={"x": 2})
    with pytest.raises(ValueError, match="scale must be"):
        AdapterConfig("pfeiffer", scale="vector")
    with pytest.raises(ValueError, match="dropout"):
        AdapterConfig("pfeiffer", dropout=1.0)
    with pytest.raises(ValueError, match="adapter_residual_before_ln"):
        AdapterConfig("parallel", ln_after=True, adapter_residual_before_ln=True)
    model = make_model("bert")
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="leaves out every one"):
        add_adapter(model, "x", AdapterConfig("pfeiffer", leave_out=[0, 1]))
    with pytest.raises(ValueError, match="no value for layer 0"):
        add_adapter(model, "x", AdapterConfig("pfeiffer", reduction_factor={"1": 4}))
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.adapterhub
def test_adapterhub_invertible_inverse_before_lm_head(tmp_path: Path) -> None:
    """Where AdapterHub runs the inverse block before the output embeddings (its language-modelling
    heads, and models it adapts through its plug-in interface such as Qwen2), logits match."""
    adapters = pytest.importorskip("adapters")
    transformers = pytest.importorskip("transformers")

    def causal_lm() -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=64, vocab_size=97,
                                          max_position_embeddings=64)
        return transformers.Qwen2ForCausalLM(config).eval()

    hub = causal_lm()
    adapters.init(hub)
    hub.add_adapter("hub", config=adapters.SeqBnInvConfig(inv_adapter_reduction_factor=4))
    randomize([p for n, p in hub.named_parameters() if "adapters.hub." in n], std=0.3)
    hub.set_active_adapters("hub")
    inputs = make_inputs()
    with torch.no_grad():
        expected = hub(**inputs).logits
    hub.save_adapter(str(tmp_path), "hub")
    model = causal_lm()
    load_adapter(model, tmp_path)
    set_active_adapters(model, "hub")
    with torch.no_grad():
        out = model(**inputs).logits
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        lm_head_input = {}
        handle = model.lm_head.register_forward_pre_hook(lambda m, args: lm_head_input.setdefault("x", args[0]))
        hidden = model.model(**inputs).last_hidden_state  # the base model's output, before the inverse
        model(**inputs)
        handle.remove()
    block = model.base_model.fused_adapters["hub"]["invertible"]
    torch.testing.assert_close(block(lm_head_input["x"]), hidden, rtol=1e-5, atol=1e-5)  # the inverse ran


@pytest.mark.adapterhub
@pytest.mark.parametrize("d", [32, 33])
def test_nice_block_matches_adapterhub_forward_and_inverse(d: int, launches) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("adapters")
    from adapters.methods.modeling import NICECouplingBlock

    from adapter_fused.hf.modules import NiceCoupling

    theirs = NICECouplingBlock([[d]], non_linearity="swish", reduction_factor=2)
    randomize(theirs.parameters(), seed=8, std=0.3)
    ours = NiceCoupling(d, 2, "silu")
    ours.load_state_dict(theirs.state_dict())
    e = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
    launches.clear()
    forward = ours(e)
    assert len(launches) == (2 if d % 2 == 0 else 0)  # each half-step one fused launch when the halves match
    with torch.no_grad():
        torch.testing.assert_close(forward, theirs(e), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(e, rev=True), theirs(e, rev=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(forward, rev=True), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_own_invertible_config_round_trip(tmp_path: Path, arch: str) -> None:
    config = AdapterConfig("pfeiffer", inv_adapter="nice", inv_adapter_reduction_factor=4)
    other = own_config_round_trip(tmp_path, arch, config)
    assert "invertible" in other.base_model.fused_adapters["task"]
    set_active_adapters(other, None)  # the invertible block runs only while its adapter is active
    inputs = make_inputs()
    torch.testing.assert_close(hidden_states(other, inputs), hidden_states(make_model(arch), inputs), rtol=0, atol=0)


def test_glow_refused() -> None:
    with pytest.raises(ValueError, match="glow"):
        AdapterConfig("pfeiffer", inv_adapter="glow", inv_adapter_reduction_factor=2)
    with pytest.raises(ValueError, match="inv_adapter_reduction_factor"):
        AdapterConfig("pfeiffer", inv_adapter="nice")


@pytest.mark.adapterhub
def test_gradients_match_adapterhub() -> None:
    """Gradients of every adapter parameter (layer norms, gate, channel scale included) through the
    whole model equal AdapterHub's."""
    adapters = pytest.importorskip("adapters")
    from adapter_fused.hf.adapterhub.convert import weights_from_adapterhub

    config = adapters.DoubleSeqBnConfig(ln_before=True, ln_after=True, use_gating=True, scaling="channel",
                                        reduction_factor={"default": 8, "1": 4})
    hub = hub_model("bert", config)
    model = make_model("bert")
    add_adapter(model, "hub", AdapterConfig("houlsby", reduction_factor={"default": 8, "1": 4}, ln_before=True,
                                            ln_after=True, use_gating=True, scale="channel"))
    hub_params = {n: p for n, p in hub.named_parameters() if "adapters.hub." in n}
    _, weights = weights_from_adapterhub({n: p.detach() for n, p in hub_params.items()}, "hub")
    ours = model.base_model.fused_adapters["hub"]
    ours.load_state_dict(weights)
    set_active_adapters(model, "hub")
    inputs = make_inputs()
    probe = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(7))
    (hidden_states(hub, inputs) * probe).sum().backward()
    (hidden_states(model, inputs) * probe).sum().backward()
    _, expected = weights_from_adapterhub({n: p.grad for n, p in hub_params.items()}, "hub grads")
    for name, parameter in ours.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_deep_copy_keeps_norm_skip_and_invertible_hooks() -> None:
    import copy

    model = make_model("bert")
    add_adapter(model, "task", AdapterConfig(Placement(attention=True, ffn=True, original_ln_before=True,
                                                       original_ln_after=False),
                                             inv_adapter="nice", inv_adapter_reduction_factor=2))
    randomize(model.base_model.fused_adapters.parameters(), seed=2, std=0.3)
    set_active_adapters(model, "task")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.base_model.fused_adapters.parameters():
            p.mul_(0.5)
    inputs = make_inputs()
    with torch.no_grad():
        before = hidden_states(model, inputs)
        halved = hidden_states(twin, inputs)
        set_active_adapters(twin, None)
        plain = hidden_states(twin, inputs)
    torch.testing.assert_close(hidden_states(model, inputs), before, rtol=0, atol=0)
    assert (halved - before).abs().max() > 1e-2  # the copy runs its own adapters
    torch.testing.assert_close(plain, hidden_states(make_model("bert"), inputs), rtol=0, atol=0)
