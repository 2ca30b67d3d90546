"""AdapterConfig presets and validation."""

from __future__ import annotations

import pytest

from adapter_fused.hf import AdapterConfig, Placement


@pytest.mark.parametrize(("name", "alias"), [("houlsby", "double_seq_bn"), ("pfeiffer", "seq_bn")])
def test_presets_and_aliases(name: str, alias: str) -> None:
    assert AdapterConfig(name) == AdapterConfig(alias) == AdapterConfig(name.upper())
    config = AdapterConfig(name)
    assert config.reduction_factor == 16 and config.scale == 1.0 and config.init == "bert"
    assert config.bottleneck_for(768) == 48


def test_houlsby_and_pfeiffer_layouts() -> None:
    houlsby, pfeiffer = AdapterConfig("houlsby"), AdapterConfig("pfeiffer")
    assert houlsby.layout.sites == ("attention", "ffn") and houlsby.resolved_activation == "silu"
    assert not houlsby.layout.original_ln_before
    assert pfeiffer.layout.sites == ("ffn",) and pfeiffer.resolved_activation == "relu"
    assert pfeiffer.layout.original_ln_before and pfeiffer.layout.residual_before_ln is True


def test_explicit_values() -> None:
    config = AdapterConfig("houlsby", bottleneck=7, activation="gelu_new", scale=2.0, init="mam")
    assert config.bottleneck_for(768) == 7 and config.resolved_activation == "gelu_tanh"
    assert AdapterConfig("pfeiffer", reduction_factor=3).bottleneck_for(32) == 10
    assert AdapterConfig("pfeiffer", reduction_factor=64).bottleneck_for(32) == 1


@pytest.mark.parametrize("config", [
    AdapterConfig("houlsby", bottleneck=3, scale=0.5),
    AdapterConfig(Placement(attention=True, ffn=False, original_ln_before=True, residual_before_ln="post_add")),
])
def test_dict_round_trip(config: AdapterConfig) -> None:
    assert AdapterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"placement": "lora"}, "unknown placement"),
    ({"placement": "houlsby", "bottleneck": 0}, "bottleneck must be a positive int"),
    ({"placement": "houlsby", "reduction_factor": 0}, "reduction_factor must be a positive number"),
    ({"placement": "houlsby", "activation": "mish"}, "unknown activation"),
    ({"placement": "houlsby", "scale": float("nan")}, "scale must be a finite number"),
    ({"placement": "houlsby", "init": "xavier"}, "init must be one of"),
])
def test_invalid(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_placement_needs_a_site() -> None:
    with pytest.raises(ValueError, match="at least one of attention, ffn"):
        Placement(attention=False, ffn=False)
    with pytest.raises(ValueError, match="from_dict|unknown keys"):
        AdapterConfig.from_dict({"placement": "houlsby", "phm_layer": True})
