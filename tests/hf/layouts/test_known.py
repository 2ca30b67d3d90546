"""Every model type supported by type, on tiny random models: no active adapter computes the base model
bit for bit, the adapters change every stack's output, each site's hook runs once per layer call, the
layers are numbered across stacks, and the fused kernel runs. Adapters after cross-attention equal
ones written by hand in float64 on every encoder-decoder type."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused.hf import AdapterConfig, Placement, add_adapter, set_active_adapters
from adapter_fused.hf import model as hf_model
from adapter_fused.hf.layouts import model_layers
from adapter_fused.hf.sites import Site

from ..families import MODEL_TYPES, build, inputs, outputs
from ..models import randomize

# layers per model, across its stacks (ALBERT shares one layer between its 2 layer calls)
LAYERS = {"albert": 1, "bart": 4, "plbart": 4, "mbart": 4, "whisper": 4, "t5": 4, "mt5": 4, "clip": 4,
          "encoder-decoder": 4}


@pytest.fixture(scope="module")
def based() -> Callable[[str], tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]]:
    """Each model type built once per module: (base model, inputs, base outputs)."""
    cache: dict[str, tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]] = {}

    def get(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
        if model_type not in cache:
            model, batch = build(model_type), inputs(model_type)
            with torch.no_grad():
                cache[model_type] = (model, batch, outputs(model, batch))
        return cache[model_type]
    return get


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family(model_type: str, placement: str, based: Callable, launches: Any,
                monkeypatch: pytest.MonkeyPatch) -> None:
    base, batch, plain = based(model_type)
    model = copy.deepcopy(base)
    if model_type == "phi" and placement == "parallel":
        with pytest.raises(ValueError, match="parallel adapter reads the block residual, which the ffn site of "
                                             "PhiDecoderLayer does not have"):
            add_adapter(model, "a", placement)
        assert not hasattr(model, "fused_adapters")
        return
    sites: Counter[tuple[str, str]] = Counter()
    apply = Site.apply

    def counting(self: Site, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        sites[self.key] += 1
        return apply(self, module, args, output)

    monkeypatch.setattr(Site, "apply", counting)
    add_adapter(model, "a", placement)
    with torch.no_grad():
        assert torch.equal(outputs(model, batch), plain)  # no active adapter: the base model, bit for bit
    adapters = model.base_model.fused_adapters["a"]
    _, layers = model_layers(model)
    assert sorted(adapters, key=int) == [str(i) for i in range(LAYERS.get(model_type, 2))]
    assert [layer.index for layer in layers] == list(range(len(adapters)))
    for layer in layers:  # each stack's own width (CLIP's towers differ)
        for adapter in adapters[str(layer.index)].values():
            assert adapter.up.weight.shape[0] == layer.hidden_size
    randomize(adapters.parameters())
    set_active_adapters(model, "a")

    calls: Counter[str] = Counter()
    handles = [layer.module.register_forward_hook(lambda m, a, o, i=str(layer.index): calls.update([i]))
               for layer in layers]
    launches.clear()
    sites.clear()
    with torch.no_grad():
        out = outputs(model, batch)
    for handle in handles:
        handle.remove()
    used = hf_model.adapter_config(model, "a").layout.sites
    # each adapted site's hook once per layer call, and no other site hooked (decoder layers have a site after
    # cross-attention, which holds houlsby's adapter in BERT-style decoders only)
    by_index = {str(layer.index): layer for layer in layers}
    def hooked(i: str, site: str) -> bool:  # adapted, or sharing its output module with an adapted site
        specs = by_index[i].sites
        return site in adapters[i] or any(other in adapters[i] and specs[other].output == specs[site].output
                                          for other in specs)

    assert sites == Counter({(i, s): n for i, n in calls.items() for s in by_index[i].sites if hooked(i, s)})
    crossed = {i for i, layer in by_index.items() if "cross" in layer.sites}
    assert bool(crossed) == (model_type in CROSS_OUTPUT)
    holding = {i for i in adapters if "cross" in adapters[i]}
    assert holding == (crossed if placement == "houlsby" and model_type == "encoder-decoder" else set())
    assert len(launches) >= sum(calls.values()) * len(used)  # the fused kernel ran at every site
    assert (out - plain).abs().max() > 1e-2
    set_active_adapters(model, None)
    with torch.no_grad():
        assert torch.equal(outputs(model, batch), plain)


@pytest.mark.parametrize("model_type", ["vit", "beit"])
def test_vision_sites_match_a_hand_written_adapter_on_this_transformers(model_type: str) -> None:
    """ViT's and BEiT's layers moved between transformers 4 (``encoder.layer``; ViT's feed-forward output in
    its ``output`` module) and 5 (``layers``; ViT's in ``mlp``): on either, houlsby adapters equal ones
    added by hand in float64 after the attention block and after the feed-forward block (BEiT: on the
    first and second output of ``drop_path``, after the layer scale), and AdapterHub's weight names
    (which follow transformers 4) reach the same layers."""
    from adapter_fused.hf.adapterhub.convert import adapterhub_weights_by_layer

    model, batch = build(model_type), inputs(model_type)
    reference = copy.deepcopy(model).double()
    add_adapter(model, "a", "houlsby")
    randomize(model.base_model.fused_adapters.parameters())
    set_active_adapters(model, "a")
    config = hf_model.adapter_config(model, "a")
    assert config.scale == 1.0
    ref_layers = reference.base_model.layers if hasattr(reference.base_model, "layers") else \
        reference.base_model.encoder.layer
    for index, layer in enumerate(ref_layers):
        weights = {site: {k: v.detach().double() for k, v in module.state_dict().items()}
                   for site, module in model.base_model.fused_adapters["a"][str(index)].items()}

        def adapted(out: Any, w: dict[str, torch.Tensor]) -> Any:
            return _hand_written(out, w, config.resolved_activation)

        if model_type == "beit":
            calls = [0]
            layer.register_forward_pre_hook(lambda m, a, calls=calls: calls.__setitem__(0, 0))

            def on_drop_path(m: nn.Module, a: Any, out: Any, calls: list[int] = calls,
                             weights: dict = weights) -> Any:
                calls[0] += 1
                return adapted(out, weights["attention" if calls[0] == 1 else "ffn"])
            layer.drop_path.register_forward_hook(on_drop_path)
            continue
        for site, path in (("attention", "attention"), ("ffn", "mlp" if hasattr(layer, "mlp") else "output.dropout")):
            layer.get_submodule(path).register_forward_hook(lambda m, a, out, w=weights[site]: adapted(out, w))
    with torch.no_grad():
        out = outputs(model, batch)
        expected = outputs(reference, {k: v.double() for k, v in batch.items()})
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)

    weight = torch.zeros(3)
    ffn_location = "output.output_adapters" if model_type == "vit" else "output_adapters"
    names = {f"{model_type}.encoder.layer.1.{ffn_location}.adapters.a.adapter_up.weight": weight,
             f"{model_type}.encoder.layer.0.attention_adapters.adapters.a.adapter_down.0.weight": weight}
    assert adapterhub_weights_by_layer(model, names, "test") == {
        "1.output.adapters.a.adapter_up.weight": weight, "0.attention.adapters.a.adapter_down.0.weight": weight}


# the module whose output is the cross-attention block's output, in each encoder-decoder type's decoder layers
CROSS_OUTPUT = {"bart": "encoder_attn", "plbart": "encoder_attn", "mbart": "encoder_attn", "whisper": "encoder_attn",
                "t5": "layer.1.dropout", "mt5": "layer.1.dropout", "encoder-decoder": "crossattention.output.dropout"}


def _hand_written(out: Any, w: dict[str, torch.Tensor], activation: str) -> Any:
    """``h + up(act(down(h)))`` in float64 on a module output (a tensor or a tuple led by one)."""
    from adapter_fused import ACTIVATIONS

    h = out[0] if isinstance(out, tuple) else out
    down = ACTIVATIONS[activation](torch.nn.functional.linear(h, w["down.weight"], w["down.bias"]))
    new = h + torch.nn.functional.linear(down, w["up.weight"], w["up.bias"])
    return (new, *out[1:]) if isinstance(out, tuple) else new


@pytest.mark.parametrize("model_type", list(CROSS_OUTPUT))
def test_cross_attention_adapters_match_a_hand_written_adapter(model_type: str) -> None:
    """Houlsby adapters with ``cross_adapter=True`` (BERT-style decoders: houlsby alone, as AdapterHub
    places them) sit after the cross-attention block of each decoder layer and nowhere else in addition to
    the attention and feed-forward sites. With the other sites' adapters zeroed, the model equals a
    float64 copy whose cross-attention outputs get ``h + up(act(down(h)))`` by hand: the encoder is
    untouched and the decoder changes."""
    model, batch = build(model_type), inputs(model_type)
    with torch.no_grad():
        plain = model(**batch)
    reference = copy.deepcopy(model).double()
    add_adapter(model, "a", AdapterConfig("houlsby", cross_adapter=model_type != "encoder-decoder"))
    modules = model.base_model.fused_adapters["a"]
    _, layers = model_layers(model)
    crossed = [layer for layer in layers if "cross" in modules[str(layer.index)]]
    assert [layer.index for layer in crossed] == [2, 3]  # the decoder's two layers
    assert all(set(modules[str(layer.index)]) == {"attention", "ffn"} for layer in layers if layer not in crossed)
    randomize(modules.parameters())
    with torch.no_grad():
        for sites in modules.values():
            for site, adapter in sites.items():
                if site != "cross":
                    adapter.up.weight.zero_()
                    adapter.up.bias.zero_()
    set_active_adapters(model, "a")
    activation = hf_model.adapter_config(model, "a").resolved_activation
    for layer in crossed:
        w = {k: v.detach().double() for k, v in modules[str(layer.index)]["cross"].state_dict().items()}
        target = reference.base_model.get_submodule(layer.path).get_submodule(CROSS_OUTPUT[model_type])
        target.register_forward_hook(lambda m, a, out, w=w: _hand_written(out, w, activation))
    with torch.no_grad():
        adapted = model(**batch)
        expected = reference(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()})

    def decoder(out: Any) -> torch.Tensor:  # the decoder's hidden states, or the LM head's logits on them
        return out.last_hidden_state if "last_hidden_state" in out else out.logits

    torch.testing.assert_close(decoder(adapted), decoder(expected).float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(adapted.encoder_last_hidden_state, plain.encoder_last_hidden_state)
    assert (decoder(adapted) - decoder(plain)).abs().max() > 1e-2


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_albert_attention_adapter_matches_a_hand_written_swapped_adapter(placement: str) -> None:
    """ALBERT's attention site is swapped, as AdapterHub's: the adapter reads the block input ``x`` and
    the layer's norm gets ``h + x + f(x)`` (houlsby), or ``h + x + f(h)`` (parallel), where other sites
    give ``h + x + f(h)`` and ``h + x + f(x)``. With the feed-forward adapter zeroed, the model equals a
    float64 copy whose attention norm is handed that sum by hand."""
    model, batch = build("albert"), inputs("albert")
    reference = copy.deepcopy(model).double()
    layout = Placement(attention=True, ffn=True, parallel=True) if placement == "parallel" else placement
    add_adapter(model, "a", AdapterConfig(layout))
    sites = model.base_model.fused_adapters["a"]["0"]
    randomize(sites.parameters())
    with torch.no_grad():
        sites["ffn"].up.weight.zero_()
        sites["ffn"].up.bias.zero_()
    set_active_adapters(model, "a")
    activation = hf_model.adapter_config(model, "a").resolved_activation
    w = {k: v.detach().double() for k, v in sites["attention"].state_dict().items()}
    _, (layer,) = model_layers(model)
    attention = reference.base_model.get_submodule(layer.path).attention
    block_input: list[torch.Tensor] = []
    attention.register_forward_pre_hook(lambda m, args: block_input.append(args[0]))

    def adapted_norm(norm: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        x = block_input.pop()
        total = args[0]  # h + x
        z = x if placement == "houlsby" else total - x
        total = total + _hand_written(z, w, activation) - z
        return torch.nn.functional.layer_norm(total, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    attention.LayerNorm.register_forward_hook(adapted_norm)
    with torch.no_grad():
        out = outputs(model, batch)
        expected = outputs(reference, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
        plain = outputs(build("albert"), batch)
    assert not block_input  # one norm call per attention call (two layer calls share the layer)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)
    assert (out - plain).abs().max() > 1e-2


def test_cross_adapter_without_a_site_for_it_is_refused() -> None:
    """``cross_adapter=True`` on a model where it would add no adapter raises and attaches nothing: an
    encoder-only model, and BERT-style decoders whose cross-attention site follows the attention site."""
    for model_type, message in (("bert-generation", "has no layer with a cross-attention site"),
                                ("encoder-decoder", "cross_adapter=True has no effect.*BertLayer.*attention=True")):
        model = build(model_type)
        with pytest.raises(ValueError, match=message):
            add_adapter(model, "a", AdapterConfig("pfeiffer", cross_adapter=True))
        assert not any("fused_adapters" in name for name, _ in model.named_modules())
