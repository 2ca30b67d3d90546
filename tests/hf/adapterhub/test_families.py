"""Parity with AdapterHub on every model type both support: an adapter AdapterHub saved, loaded into a
plain transformers model of the same weights, reproduces AdapterHub's outputs on every stack; on
encoder-decoder types also with adapters after cross-attention (``cross_adapter=True``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused.hf import load_adapter, set_active_adapters

from ..families import MODEL_TYPES, build, encoder_decoder, inputs, outputs
from ..models import randomize

adapters = pytest.importorskip("adapters")

pytestmark = pytest.mark.adapterhub
CONFIGS = ["double_seq_bn", "seq_bn", "par_bn"]
# AdapterHub's own models of these types compute other outputs than transformers' on the same weights
# with no adapter active (their attention differs), so the adapter is loaded into a copy of AdapterHub's
# model, beside AdapterHub's own inactive adapter: the sites and their arithmetic are compared there.
HUB_BASE_DIFFERS = ("deberta", "modernbert")
# Adapters that AdapterHub places where no site of ours is; loading them is refused.
REFUSED = {
    ("phi", "par_bn"): "a parallel adapter reads the block residual",
}


def _silence_language_adapters(model: nn.Module) -> None:
    """Zero the up-projections of X-MOD's own language adapters, which then add nothing: AdapterHub
    deletes them, so only then do its X-MOD models and transformers' compute the same."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapter_modules." in name and ".dense2." in name:
                parameter.zero_()


@pytest.fixture(scope="module")
def based() -> Callable[[str], tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]]:
    """Each model type built once per module: (base model, inputs, base outputs)."""
    cache: dict[str, tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]] = {}

    def get(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
        if model_type not in cache:
            if model_type == "encoder-decoder/xmod":  # X-MOD encoder and decoder
                torch.manual_seed(0)
                model, batch = encoder_decoder("xmod").eval(), inputs("encoder-decoder")
            else:
                model, batch = build(model_type), inputs(model_type)
            if "xmod" in model_type:
                _silence_language_adapters(model)
            with torch.no_grad():
                cache[model_type] = (model, batch, outputs(model, batch))
        return cache[model_type]
    return get


# where AdapterHub keeps the adapters after cross-attention, by model type
CROSS_LOCATIONS = {"bart": "cross_attention_adapters", "plbart": "cross_attention_adapters",
                   "mbart": "cross_attention_adapters", "whisper": "cross_attention_adapters", "t5": "layer.1",
                   "mt5": "layer.1"}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_adapterhub_adapter_reproduces_its_outputs(model_type: str, config: str, tmp_path: Path,
                                                   based: Callable) -> None:
    hub = _hub_model(model_type, config, based)
    if model_type == "encoder-decoder" and config == "double_seq_bn":  # BERT decoders: also after cross-attention
        assert any(".crossattention.output.adapters.hub." in n for n, _ in hub.named_parameters())
    _check_parity(hub, model_type, config, tmp_path, based)


@pytest.mark.parametrize("config", CONFIGS)
def test_xmod_encoder_decoder(config: str, tmp_path: Path, based: Callable) -> None:
    """An encoder-decoder of X-MOD models: houlsby's adapters also after the decoder's cross-attention."""
    hub = _hub_model("encoder-decoder/xmod", config, based)
    crossed = any(".crossattention.output.adapters.hub." in n for n, _ in hub.named_parameters())
    assert crossed == (config == "double_seq_bn")
    _check_parity(hub, "encoder-decoder/xmod", config, tmp_path, based)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("model_type", list(CROSS_LOCATIONS))
def test_adapterhub_cross_adapter_reproduces_its_outputs(model_type: str, config: str, tmp_path: Path,
                                                         based: Callable) -> None:
    hub_config = adapters.AdapterConfig.load(config, cross_adapter=True)
    hub = _hub_model(model_type, hub_config, based)
    crossed = {n.split(".adapters.")[0] for n, _ in hub.named_parameters()
               if "decoder." in n and f".{CROSS_LOCATIONS[model_type]}.adapters.hub." in n}
    assert len(crossed) == 2  # one per decoder layer (T5's encoder keeps its feed-forward adapter at layer.1)
    _check_parity(hub, model_type, config, tmp_path, based)


# AdapterHub's ALBERT attention adapter reads the block input and takes the attention output as its
# residual: each placement there, also with the layer's own norm skipped (original_ln_after=False)
ALBERT_ATTENTION = {
    "seq_bn": {"mh_adapter": True},
    "par_bn": {"mh_adapter": True},
    "double_seq_bn": {"original_ln_after": False},
    "seq_bn/no-ln-after": {"mh_adapter": True, "original_ln_after": False},
}


@pytest.mark.parametrize("variant", list(ALBERT_ATTENTION))
def test_albert_attention_adapters_reproduce_adapterhub(variant: str, tmp_path: Path, based: Callable) -> None:
    config = variant.split("/")[0]
    hub = _hub_model("albert", adapters.AdapterConfig.load(config, **ALBERT_ATTENTION[variant]), based)
    assert any(".attention.attention_adapters.adapters.hub." in n for n, _ in hub.named_parameters())
    _check_parity(hub, "albert", config, tmp_path, based)


def test_albert_gradients_match_adapterhub(tmp_path: Path, based: Callable) -> None:
    """Through ALBERT's swapped attention site and its feed-forward site, every adapter parameter gets
    AdapterHub's gradient (houlsby, a loss along a fixed random projection of the outputs)."""
    from adapter_fused.hf.adapterhub.convert import adapterhub_weights_by_layer, weights_from_adapterhub

    base, batch, plain = based("albert")
    hub = _hub_model("albert", "double_seq_bn", based)
    hub.save_adapter(str(tmp_path), "hub")
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    set_active_adapters(model, "hub")
    hub.set_active_adapters("hub")
    probe = torch.randn(plain.shape, generator=torch.Generator().manual_seed(7))
    (outputs(hub, batch) * probe).sum().backward()
    (outputs(model, batch) * probe).sum().backward()
    grads = {n: p.grad for n, p in hub.named_parameters() if "adapters.hub." in n}
    _, expected = weights_from_adapterhub(adapterhub_weights_by_layer(model, grads, "grads"), "grads")
    ours = dict(model.base_model.fused_adapters["hub"].named_parameters())
    assert sorted(ours) == sorted(expected) and any(".attention." in name for name in ours)
    for name, parameter in ours.items():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_phi_parallel_adapter_fails_in_adapterhub_too(based: Callable) -> None:
    """Phi's feed-forward block has no residual of its own; AdapterHub's parallel adapter there reads
    that missing residual and its forward fails, so refusing such an adapter loses nothing."""
    hub = _hub_model("phi", "par_bn", based)
    hub.set_active_adapters("hub")
    with pytest.raises(TypeError, match="must be Tensor, not NoneType"), torch.no_grad():
        outputs(hub, based("phi")[1])


def _hub_model(model_type: str, config: Any, based: Callable) -> nn.Module:
    """An AdapterHub copy of the base model of ``model_type`` with adapter "hub" of ``config``, random."""
    base, _, _ = based(model_type)
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter("hub", config=config)
    randomize([p for n, p in hub.named_parameters() if "adapters.hub." in n])
    return hub


def _check_parity(hub: nn.Module, model_type: str, config: str, tmp_path: Path, based: Callable) -> None:
    """Save the AdapterHub adapter, load it into a copy of the base model, and compare outputs."""
    base, batch, plain = based(model_type)
    hub.eval()
    with torch.no_grad():
        hub_base = outputs(hub, batch)
    base_gap = (hub_base - plain).abs().max().item()
    if model_type in HUB_BASE_DIFFERS:
        assert base_gap > 1e-4  # when AdapterHub matches transformers again, compare on transformers' model
        model, plain = copy.deepcopy(hub), hub_base
    else:
        assert base_gap <= 1e-5
        model = copy.deepcopy(base)
    hub.save_adapter(str(tmp_path), "hub")
    if (model_type, config) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(model_type, config)]):
            load_adapter(model, tmp_path)
        assert not any("fused_adapters" in name for name, _ in model.named_modules())
        return
    hub.set_active_adapters("hub")
    with torch.no_grad():
        expected = outputs(hub, batch)
    assert (expected - plain).abs().max() > 0.05  # the adapters matter
    assert load_adapter(model, tmp_path) == "hub"
    set_active_adapters(model, "hub")
    with torch.no_grad():
        out = outputs(model, batch)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    set_active_adapters(model, None)
    with torch.no_grad():
        assert torch.equal(outputs(model, batch), plain)


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn"])
def test_xmod_with_its_own_adapter_layer_norm(config: str, tmp_path: Path) -> None:
    """X-MOD built with ``adapter_layer_norm=True`` gives its language adapters their own norm, which
    AdapterHub's feed-forward adapter then reads: the layout picks that norm, and outputs match."""
    from adapter_fused.hf.layouts import model_layers

    from ..families import CONFIGS

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model("xmod", **CONFIGS["xmod"], adapter_layer_norm=True),
        attn_implementation="eager").eval()
    _silence_language_adapters(base)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if "adapter_layer_norm" in name:  # not the identity it starts as
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    batch = inputs("xmod")
    with torch.no_grad():
        plain = outputs(base, batch)
    hub = copy.deepcopy(base)
    adapters.init(hub)
    hub.add_adapter("hub", config=config)
    randomize([p for n, p in hub.named_parameters() if "adapters.hub." in n])
    hub.set_active_adapters("hub")
    hub.eval()
    with torch.no_grad():
        expected = outputs(hub, batch)
    hub.save_adapter(str(tmp_path), "hub")
    model = copy.deepcopy(base)
    assert model_layers(model)[1][0].ffn.norm == "output.adapter_layer_norm"
    load_adapter(model, tmp_path)
    set_active_adapters(model, "hub")
    with torch.no_grad():
        out = outputs(model, batch)
    assert (expected - plain).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
