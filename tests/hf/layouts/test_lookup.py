"""register_model_layout: adapters on a model the library does not know, described once by the user;
outputs checked against the adapters added by hand in float64."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapter_fused
from adapter_fused import ACTIVATIONS, ModelLayout, SiteSpec, register_model_layout, unregister_model_layout
from adapter_fused.hf import AdapterConfig, Placement, add_adapter, set_active_adapters
from adapter_fused.hf.layouts import model_layers
from adapter_fused.hf.model import adapter_config

from ..models import randomize

D = 16


class Block(nn.Module):
    """A pre-norm layer: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class MixBlock(Block):
    """A hybrid model's other kind of layer: ``Block`` whose token mixer is ``mix`` instead of ``attn``."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = self.attn
        del self.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.ff(self.norm2(x))


class PostNormBlock(nn.Module):
    """A post-norm layer: ln1(x + attn(x)), then ln2(x + ff(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.ln1 = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.ln2 = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff(x))


class CrossBlock(nn.Module):
    """A pre-norm decoder layer: x + attn(norm1(x)), then x + cross(norm_c(x), memory), then x + ff(norm2(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.norm_c = nn.LayerNorm(D)
        self.cross = nn.Bilinear(D, D, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.attn(b.norm1(x))
        x = x + self.cross(self.norm_c(x), memory)
        return x + b.ff(b.norm2(x))


class Tiny(nn.Module):
    """Two pre-norm ``blocks``, then (``two_stacks``) two post-norm ``head_blocks``; with ``decoder``, two
    ``CrossBlock`` layers reading the blocks' output as memory (the output is then the decoder's)."""

    def __init__(self, two_stacks: bool = False, decoder: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="tiny-test", hidden_size=D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head_blocks = nn.ModuleList([PostNormBlock(), PostNormBlock()]) if two_stacks else None
        self.decoder = nn.ModuleList([CrossBlock(), CrossBlock()]) if decoder else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        for block in self.head_blocks or ():
            x = block(x)
        if self.decoder is None:
            return x
        assert y is not None
        for layer in self.decoder:
            y = layer(y, x)
        return y


PRE_NORM = ModelLayout(layers="blocks", attention=SiteSpec("attn", residual="norm1", residual_keywords="input"),
                       ffn=SiteSpec("ff", residual="norm2", residual_keywords="input"))
POST_NORM = ModelLayout(layers="head_blocks", attention=SiteSpec("attn", residual="attn", norm="ln1"),
                        ffn=SiteSpec("ff", residual="ff", norm="ln2"))


@pytest.fixture
def registered() -> Iterator[None]:
    register_model_layout(Tiny, [PRE_NORM, POST_NORM])
    yield
    unregister_model_layout(Tiny)


def hand(model: Tiny, x: torch.Tensor, placement: str, y: torch.Tensor | None = None,
         swapped: bool = False) -> torch.Tensor:
    """``model``'s forward in float64 with the adapters of ``"a"`` added by hand where it has them;
    ``swapped``: the attention adapters take the block residual as input and the attention output as
    residual."""
    weights = {k: v.detach().double() for k, v in model.fused_adapters["a"].state_dict().items()}
    act = ACTIVATIONS[adapter_config(model, "a").resolved_activation]
    ref = copy.deepcopy(model).double()
    set_active_adapters(ref, None)  # the copy's own hooks stay out of the way

    def f(index: int, site: str, z: torch.Tensor) -> torch.Tensor:
        w = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"{index}.{site}.")}
        return F.linear(act(F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

    def site(index: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """The adapted sum that the layer normalizes (post-norm) or passes on (pre-norm)."""
        if not any(k.startswith(f"{index}.{name}.") for k in weights):
            return h + x
        if swapped and name == "attention":
            h, x = x, h
        if placement == "houlsby":
            h = h + f(index, name, h)
        elif placement == "pfeiffer":
            h = h + f(index, name, norm(h + x) if norm is not None else h + x)
        elif placement == "parallel":
            h = h + f(index, name, x)
        return h + x

    x = x.double()
    for i, block in enumerate(ref.blocks):
        mixer = block.mix if isinstance(block, MixBlock) else block.attn
        x = site(i, "attention", mixer(block.norm1(x)), x, None)
        x = site(i, "ffn", block.ff(block.norm2(x)), x, None)
    for j, block in enumerate(ref.head_blocks or (), start=len(ref.blocks)):
        x = block.ln1(site(j, "attention", block.attn(x), x, block.ln1))
        x = block.ln2(site(j, "ffn", block.ff(x), x, block.ln2))
    if ref.decoder is None:
        return x
    assert y is not None
    y = y.double()
    for k, layer in enumerate(ref.decoder, start=len(ref.blocks) + len(ref.head_blocks or ())):
        b = layer.block
        y = site(k, "attention", b.attn(b.norm1(y)), y, None)
        y = site(k, "cross", layer.cross(layer.norm_c(y), x), y, None)
        y = site(k, "ffn", b.ff(b.norm2(y)), y, None)
    return y


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_registered_layout_matches_adapters_added_by_hand(registered: None, placement: str) -> None:
    torch.manual_seed(0)
    model = Tiny(two_stacks=True).eval()
    x = torch.randn(2, 5, D)
    base = model(x)
    add_adapter(model, "a", placement)
    assert sorted(model.fused_adapters["a"], key=int) == ["0", "1", "2", "3"]  # numbered across both stacks
    assert torch.equal(model(x), base)
    randomize(model.fused_adapters.parameters())
    set_active_adapters(model, "a")
    with torch.no_grad():
        out = model(x)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, hand(model, x, placement).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_swapped_sites_match_adapters_added_by_hand(placement: str) -> None:
    """Attention sites marked ``swapped``, in a pre-norm stack (the layer adds the residual itself) and a
    post-norm one (its norm is handed the sum): each adapter reads the block residual where unswapped
    sites read the sub-block output, and the reverse."""
    swap = {"attention": dataclasses.replace(PRE_NORM.attention, swapped=True)}
    layouts = [dataclasses.replace(PRE_NORM, **swap),
               dataclasses.replace(POST_NORM, attention=dataclasses.replace(POST_NORM.attention, swapped=True))]
    register_model_layout(Tiny, layouts)
    try:
        torch.manual_seed(0)
        model = Tiny(two_stacks=True).eval()
        x = torch.randn(2, 5, D)
        layout = placement if placement != "parallel" else Placement(attention=True, ffn=True, parallel=True)
        add_adapter(model, "a", AdapterConfig(layout))
        randomize(model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out, hand(model, x, placement, swapped=True).float(), rtol=1e-5, atol=1e-5)
        if placement != "pfeiffer":  # pfeiffer's adapter reads h + x, the same either way round
            assert (out - hand(model, x, placement).float()).abs().max() > 1e-2
    finally:
        unregister_model_layout(Tiny)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_layers_of_two_kinds_with_output_alternatives(placement: str) -> None:
    """``output_alternatives``: each layer's site is after the first of its modules the layer has (``mix`` in
    the first, ``attn`` in the second); outputs equal adapters added by hand in float64."""
    attention = dataclasses.replace(PRE_NORM.attention, output_alternatives="mix")
    register_model_layout(Tiny, dataclasses.replace(PRE_NORM, attention=attention))
    try:
        torch.manual_seed(0)
        model = Tiny().eval()
        model.blocks = nn.ModuleList([MixBlock(), Block()])
        x = torch.randn(2, 5, D)
        base = model(x)
        add_adapter(model, "a", placement)
        assert [layer.attention.output for layer in model_layers(model)[1]] == ["mix", "attn"]
        randomize(model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        with torch.no_grad():
            out = model(x)
        assert (out - base).abs().max() > 1e-2
        torch.testing.assert_close(out, hand(model, x, placement).float(), rtol=1e-5, atol=1e-5)
    finally:
        unregister_model_layout(Tiny)


DECODER = ModelLayout(layers="decoder", attention=SiteSpec("block.attn", residual="block.norm1", residual_keywords="input"),
                      ffn=SiteSpec("block.ff", residual="block.norm2", residual_keywords="input"),
                      cross=SiteSpec("cross", residual="norm_c", residual_keywords="input"))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("with_cross", [True, False])
def test_registered_decoder_with_a_cross_attention_site(placement: str, with_cross: bool) -> None:
    """A described decoder stack with a ``cross`` site: ``cross_adapter=True`` adds an adapter there in the
    decoder layers only, placed like the others; outputs equal adapters added by hand in float64."""
    register_model_layout(Tiny, [PRE_NORM, DECODER])
    try:
        torch.manual_seed(0)
        model = Tiny(decoder=True).eval()
        x, y = torch.randn(2, 5, D), torch.randn(2, 5, D)
        base = model(x, y)
        add_adapter(model, "a", AdapterConfig(placement, cross_adapter=with_cross))
        modules = model.fused_adapters["a"]
        assert {i: "cross" in modules[i] for i in modules} == {"0": False, "1": False, "2": with_cross,
                                                                "3": with_cross}
        randomize(modules.parameters())
        set_active_adapters(model, "a")
        with torch.no_grad():
            out = model(x, y)
        assert (out - base).abs().max() > 1e-2
        torch.testing.assert_close(out, hand(model, x, placement, y).float(), rtol=1e-5, atol=1e-5)
    finally:
        unregister_model_layout(Tiny)


def test_layout_registered_by_model_type() -> None:
    register_model_layout("tiny-test", PRE_NORM)
    try:
        model = Tiny().eval()
        add_adapter(model, "a", "houlsby")
        randomize(model.fused_adapters.parameters())
        set_active_adapters(model, "a")
        x = torch.randn(2, 5, D)
        torch.testing.assert_close(model(x), hand(model, x, "houlsby").float(), rtol=1e-5, atol=1e-5)
    finally:
        unregister_model_layout("tiny-test")


def test_unknown_model_points_to_the_layout_api() -> None:
    model = Tiny()
    with pytest.raises(ValueError, match=r"model type 'tiny-test' is not supported.*its layer class Block has the "
                                         r"modules of no known layout; describe its layers with "
                                         r"adapter_fused.register_model_layout"):
        add_adapter(model, "a", "houlsby")
    assert not hasattr(model, "fused_adapters")
    bare = nn.Module()
    bare.config = SimpleNamespace(model_type="tiny-test", hidden_size=D)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"no non-empty layer list.*register_model_layout"):
        add_adapter(bare, "a", "houlsby")


def test_layout_naming_missing_modules_is_refused() -> None:
    register_model_layout(Tiny, ModelLayout("blocks", SiteSpec("attn", "norm1"), SiteSpec("mlp", "norm2")))
    try:
        model = Tiny()
        with pytest.raises(ValueError, match=r"Block \(at blocks.0\) lacks the modules mlp"):
            add_adapter(model, "a", "pfeiffer")
        assert not hasattr(model, "fused_adapters") and not model._forward_hooks
    finally:
        unregister_model_layout(Tiny)


def test_model_without_a_width_is_refused(registered: None) -> None:
    model = Tiny()
    del model.config
    with pytest.raises(ValueError, match="cannot find the hidden size of Tiny, which has no config: give it a config "
                                         "with hidden_size"):
        add_adapter(model, "a", "houlsby")
    assert not hasattr(model, "fused_adapters")


def test_bad_descriptions_are_refused() -> None:
    with pytest.raises(ValueError, match="SiteSpec.output must be a dotted module path"):
        SiteSpec("", "norm1")
    with pytest.raises(ValueError, match="SiteSpec.residual_position must be a non-negative int"):
        SiteSpec("attn", "norm1", residual_position=-1)
    with pytest.raises(ValueError, match="without a residual module can have neither norm"):
        SiteSpec("attn", None, norm="ln1")
    with pytest.raises(ValueError, match="a swapped site needs a residual module"):
        SiteSpec("attn", None, swapped=True)
    with pytest.raises(TypeError, match="SiteSpec.swapped must be True or False"):
        SiteSpec("attn", "norm1", swapped=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SiteSpec.output_alternatives must be a dotted module path"):
        SiteSpec("attn", "norm1", output_alternatives=("mix", ""))
    with pytest.raises(ValueError, match="SiteSpec.output_alternatives must name other modules than output"):
        SiteSpec("attn", "norm1", output_alternatives=("mix", "attn"))
    with pytest.raises(TypeError, match="SiteSpec.output_alternatives must be a module path or a tuple"):
        SiteSpec("attn", "norm1", output_alternatives=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ModelLayout.layers must be a dotted module path"):
        ModelLayout("blocks..x", SiteSpec("attn", "norm1"), SiteSpec("ff", "norm2"))
    with pytest.raises(TypeError, match="ModelLayout.ffn must be a SiteSpec"):
        ModelLayout("blocks", SiteSpec("attn", "norm1"), "ff")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ModelLayout.cross must be a SiteSpec or None"):
        ModelLayout("blocks", SiteSpec("attn", "norm1"), SiteSpec("ff", "norm2"), cross="cross")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cross_with_attention needs a cross site"):
        ModelLayout("blocks", SiteSpec("attn", "norm1"), SiteSpec("ff", "norm2"), cross_with_attention=True)
    with pytest.raises(TypeError, match="layout must be a ModelLayout"):
        register_model_layout(Tiny, [])
    with pytest.raises(KeyError, match="no layout registered"):
        unregister_model_layout(Tiny)
    assert adapter_fused.register_model_layout is register_model_layout


class SharedOutputBlock(nn.Module):
    """Both sub-block outputs pass through one ``out`` module: x + out(attn(norm1(x))), then x + out(ff(norm2(x)))."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.block.attn(self.block.norm1(x)))
        return x + self.out(self.block.ff(self.block.norm2(x)))


def test_one_module_serving_both_sites_by_call() -> None:
    """``output_call`` picks the call of a module shared by the sites; the adapters match a hand-written
    float64 computation, and two sites on the same call are refused before anything is attached."""
    model = Tiny()
    model.blocks = nn.ModuleList([SharedOutputBlock(), SharedOutputBlock()])
    reference = copy.deepcopy(model).double()
    same_call = ModelLayout("blocks", SiteSpec("out", "block.norm1", residual_keywords="input"),
                            SiteSpec("out", "block.norm2", residual_keywords="input"))
    register_model_layout(Tiny, same_call)
    try:
        with pytest.raises(ValueError, match=r"two sites of SharedOutputBlock \(at blocks.0\) take call 0 of out; "
                                             r"give each its own SiteSpec.output_call"):
            add_adapter(model, "a", "houlsby")
        assert not hasattr(model, "fused_adapters")
        register_model_layout(Tiny, ModelLayout(
            "blocks", SiteSpec("out", "block.norm1", residual_keywords="input"),
            SiteSpec("out", "block.norm2", residual_keywords="input", output_call=1)))
        add_adapter(model, "a", "pfeiffer")
        add_adapter(model, "b", "houlsby")
    finally:
        unregister_model_layout(Tiny)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    randomize(model.fused_adapters.parameters())
    for name in ("a", "b"):
        set_active_adapters(model, name)
        config = adapter_config(model, name)
        with torch.no_grad():
            out = model(x)
        h = x.double()
        for index, layer in enumerate(reference.blocks):
            sites = {s: {k: v.double() for k, v in m.state_dict().items()}
                     for s, m in model.fused_adapters[name][str(index)].items()}

            def f(z: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
                act = ACTIVATIONS[config.resolved_activation]
                return F.linear(act(F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])
            a = layer.block.attn(layer.block.norm1(h))
            if "attention" in sites:  # houlsby: h + s f(h)
                a = a + config.scale * f(a, sites["attention"])
            h = h + a
            m = layer.block.ff(layer.block.norm2(h))
            # houlsby: m + s f(m); pfeiffer: m + s f(m + x)
            m = m + config.scale * f(m if "attention" in sites else m + h, sites["ffn"])
            h = h + m
        torch.testing.assert_close(out, h.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SiteSpec.output_call must be a non-negative int"):
        SiteSpec("out", None, output_call=-1)
