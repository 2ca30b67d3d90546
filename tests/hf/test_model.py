"""Adding, activating, training and deleting adapters on each architecture: parity with adapters
computed by hand in float64, exact base outputs without an active adapter, trainable parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .models import ARCHITECTURES, HIDDEN, LAYERS, hidden_states, make_inputs, make_model, randomize

from adapter_fused import ACTIVATIONS  # noqa: E402
from adapter_fused.hf import (  # noqa: E402
    AdapterConfig,
    Placement,
    active_adapter,
    adapter_summary,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_active_adapters,
    train_adapter,
)

# Written out independently of the library: per architecture, for the attention and FFN sites,
# (module whose output is h, module whose first input is the residual x, layer norm of LN(h + x) or None).
SITES = {
    "bert": {"attention": ("attention.output.dropout", "attention.output", 1, "attention.output.LayerNorm"),
             "ffn": ("output.dropout", "output", 1, "output.LayerNorm")},
    "distilbert": {"attention": ("attention", "attention", 0, "sa_layer_norm"),
                   "ffn": ("ffn", "ffn", 0, "output_layer_norm")},
    "gpt2": {"attention": ("attn", "ln_1", 0, None), "ffn": ("mlp", "ln_2", 0, None)},
    "llama": {"attention": ("self_attn", "input_layernorm", 0, None),
              "ffn": ("mlp", "post_attention_layernorm", 0, None)},
}
SITES["roberta"] = SITES["bert"]
SITES["mistral"] = SITES["qwen2"] = SITES["llama"]

PLACEMENTS = {
    "houlsby": ("houlsby", ("attention", "ffn")),
    "pfeiffer": ("pfeiffer", ("ffn",)),
    "post_ln_residual": (Placement(attention=True, ffn=True, original_ln_before=True, residual_before_ln=False),
                         ("attention", "ffn")),
    "parallel": ("parallel", ("ffn",)),
}


def eager_site(kind: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None, w: dict, act: str,
               scale: float) -> torch.Tensor:
    """What the layer should see as its sub-block output, by hand."""
    def f(z: torch.Tensor) -> torch.Tensor:
        return F.linear(ACTIVATIONS[act](F.linear(z, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

    if kind == "houlsby":
        return h + scale * f(h)
    if kind == "pfeiffer":
        total = h + x
        return h + scale * f(norm(total) if norm is not None else total)
    if kind == "post_ln_residual":
        z = norm(h + x) if norm is not None else h + x
        return z + scale * f(z)
    if kind == "parallel":
        return h + scale * f(x)
    raise AssertionError(kind)


def layers_of(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "h", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise AssertionError("no layers")


def hand_adapted(model: nn.Module, arch: str, kind: str, sites: tuple[str, ...], weights: dict, act: str,
                 scale: float) -> list:
    """Hooks on ``model`` (a float64 copy of the base model) applying the adapters by hand."""
    handles = []
    for index, layer in enumerate(layers_of(model)):
        for site in sites:
            out_path, res_path, res_pos, norm_path = SITES[arch][site]
            get = lambda p: layer.get_submodule(p)  # noqa: E731
            box: dict = {}

            def pre(module, args, kwargs, box=box, res_pos=res_pos):  # type: ignore[no-untyped-def]
                box["x"] = args[res_pos] if len(args) > res_pos else next(iter(v for k, v in kwargs.items()
                                                                                 if k in ("query", "hidden_states",
                                                                                          "input_tensor", "input")))

            def post(module, args, output, box=box, w=weights[f"{index}.{site}"],  # type: ignore[no-untyped-def]
                     norm=get(norm_path) if norm_path else None):
                h = output[0] if isinstance(output, tuple) else output
                new = eager_site(kind, h, box.pop("x"), norm, w, act, scale)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(get(res_path).register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(get(out_path).register_forward_hook(post))
    return handles


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parity_with_hand_computed_adapters(arch: str, placement: str) -> None:
    config_placement, sites = PLACEMENTS[placement]
    model = make_model(arch)
    reference = copy.deepcopy(model).double()
    config = AdapterConfig(placement=config_placement, reduction_factor=4, scale=0.7)
    add_adapter(model, "task", config)
    randomize(model.base_model.fused_adapters.parameters())
    train_adapter(model, "task")
    model.eval()
    weights = {f"{layer}.{site}": {k: v.detach().double() for k, v in module.state_dict().items()}
               for layer, block in model.base_model.fused_adapters["task"].items() for site, module in block.items()}
    assert sorted(weights) == sorted(f"{i}.{s}" for i in range(LAYERS) for s in sites)
    act = config.resolved_activation
    inputs = make_inputs()

    out = hidden_states(model, inputs)
    for tensor in weights.values():
        for t in tensor.values():
            t.requires_grad_(True)
    handles = hand_adapted(reference, arch, placement, sites, weights, act, config.scale)
    expected = hidden_states(reference, inputs)
    base = hidden_states(make_model(arch), inputs)
    assert (expected.float() - base).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(out, expected.float(), rtol=2e-5, atol=2e-5)

    # gradients of every adapter parameter
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    for layer, block in model.base_model.fused_adapters["task"].items():
        for site, module in block.items():
            for key, parameter in module.named_parameters():
                torch.testing.assert_close(parameter.grad, weights[f"{layer}.{site}"][key].grad.float(),
                                           rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_active_adapter_is_the_base_model(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs()
    base = hidden_states(model, inputs)
    names = [name for name, _ in model.named_parameters()]
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", "pfeiffer")
    randomize(model.base_model.fused_adapters.parameters())
    assert torch.equal(hidden_states(model, inputs), base)  # added, not active
    set_active_adapters(model, "b")
    assert not torch.allclose(hidden_states(model, inputs), base, atol=1e-3)
    set_active_adapters(model, None)
    assert torch.equal(hidden_states(model, inputs), base)
    # base parameters keep their names and values
    current = dict(model.named_parameters())
    assert [n for n in current if "fused_adapters" not in n] == names
    assert all(torch.equal(current[n], values[n]) for n in names)
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert [n for n, _ in model.named_parameters()] == names
    assert torch.equal(hidden_states(model, inputs), base)


@pytest.mark.parametrize(("preset", "sites"), [("houlsby", 2), ("double_seq_bn", 2), ("pfeiffer", 1), ("seq_bn", 1)])
def test_train_adapter_freezes_everything_else(preset: str, sites: int) -> None:
    model = make_model("bert")
    add_adapter(model, "other", "pfeiffer")
    add_adapter(model, "task", preset)
    train_adapter(model, "task")
    assert model.training
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fused_adapters.task.") for n in trainable)
    d, r = HIDDEN, HIDDEN // 16
    per_adapter = 2 * d * r + r + d
    assert sum(p.numel() for p in trainable.values()) == LAYERS * sites * per_adapter
    summary = {row.name: row for row in adapter_summary(model).adapters}
    assert summary["task"].parameters == LAYERS * sites * per_adapter
    assert summary["task"].active and summary["task"].trainable and not summary["other"].trainable
    base = sum(p.numel() for n, p in model.named_parameters() if "fused_adapters" not in n)
    assert summary["task"].share == pytest.approx(LAYERS * sites * per_adapter / base)
    assert "task" in str(adapter_summary(model))
    assert list_adapters(model) == ["other", "task"]


def test_headed_model_and_base_model_share_adapters() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        num_labels=3)).eval()
    add_adapter(model, "task", "houlsby")
    assert list_adapters(model.bert) == ["task"]
    train_adapter(model, "task")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(("bert.fused_adapters.task.", "classifier.")) for n in trainable)
    assert model.classifier.weight.requires_grad
    train_adapter(model, "task", train_head=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("bert.fused_adapters.task.") for n in trainable)
    assert not model.classifier.weight.requires_grad


def test_errors() -> None:
    model = make_model("bert")
    add_adapter(model, "task", "pfeiffer")
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "task", "houlsby")
    with pytest.raises(KeyError, match="no adapter named 'missing'"):
        set_active_adapters(model, "missing")
    with pytest.raises(ValueError, match="without dots"):
        add_adapter(model, "a.b", "pfeiffer")
    with pytest.raises(ValueError, match="unknown placement"):
        add_adapter(model, "x", "lora")


def test_unsupported_model_lists_supported_ones() -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.XLNetModel(transformers.XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=64,
                                                             vocab_size=97))
    with pytest.raises(ValueError, match=r"model type 'xlnet' is not supported; supported model types: bert, .*gpt2"):
        add_adapter(model, "task", "pfeiffer")
    assert not hasattr(model, "fused_adapters")
    with pytest.raises(ValueError, match="not a transformers model"):
        add_adapter(nn.Linear(3, 3), "task", "pfeiffer")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_parallel_placement_is_one_pass(arch: str, launches) -> None:  # type: ignore[no-untyped-def]
    """A parallel adapter reads the block input x and adds s * f(x) to the sub-block output h in the
    kernel: one launch per site, called as adapter(x, residual=h), with no difference formed."""
    model = make_model(arch)
    add_adapter(model, "task", "parallel")
    randomize(model.base_model.fused_adapters.parameters())
    set_active_adapters(model, "task")
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for module in model.base_model.fused_adapters.modules():
        if type(module).__name__ == "FusedAdapter":
            module.register_forward_pre_hook(
                lambda m, args, kwargs: calls.append((args[0], kwargs.get("residual"))), with_kwargs=True)
    launches.clear()
    with torch.no_grad():
        hidden_states(model, make_inputs())
    assert len(calls) == LAYERS and len(launches) == LAYERS
    assert all(residual is not None and residual is not z for z, residual in calls)


def hooks(model: nn.Module) -> int:
    """All forward hooks and pre-hooks registered on the model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_adapter_added_while_training_another_is_frozen() -> None:
    model = make_model("bert")
    add_adapter(model, "a", "pfeiffer")
    assert all(p.requires_grad for p in model.fused_adapters["a"].parameters())  # no training state yet
    train_adapter(model, "a")
    add_adapter(model, "b", "houlsby")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fused_adapters.a.") for n in trainable)
    train_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fused_adapters.b.") for n in trainable)
    delete_adapter(model, "b")
    add_adapter(model, "c", "pfeiffer")  # the trained adapter is gone: new ones train by default again
    assert all(p.requires_grad for p in model.fused_adapters["c"].parameters())


def test_failed_add_leaves_the_model_intact() -> None:
    model = make_model("bert")
    inputs = make_inputs()
    base, names, count = hidden_states(model, inputs), [n for n, _ in model.named_parameters()], hooks(model)
    with pytest.raises(ValueError, match="unknown placement"):
        add_adapter(model, "a", "lora")
    with pytest.raises(ValueError, match="without dots"):
        add_adapter(model, "a.b", "pfeiffer")
    assert not hasattr(model, "fused_adapters") and hooks(model) == count
    assert [n for n, _ in model.named_parameters()] == names
    add_adapter(model, "a", "pfeiffer")
    names, count = [n for n, _ in model.named_parameters()], hooks(model)
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "a", "houlsby")
    with pytest.raises(ValueError, match="unknown placement"):
        add_adapter(model, "b", "lora")
    assert [n for n, _ in model.named_parameters()] == names and hooks(model) == count
    assert list_adapters(model) == ["a"]
    delete_adapter(model, "a")
    assert hooks(model) == 0 and torch.equal(hidden_states(model, inputs), base)


def test_set_active_adapters_accepts_a_list_of_one() -> None:
    model = make_model("bert")
    add_adapter(model, "a", "pfeiffer")
    add_adapter(model, "b", "pfeiffer")
    randomize(model.fused_adapters.parameters())
    inputs = make_inputs()
    set_active_adapters(model, "a")
    expected = hidden_states(model, inputs)
    set_active_adapters(model, None)
    set_active_adapters(model, ["a"])
    assert active_adapter(model) == "a" and torch.equal(hidden_states(model, inputs), expected)
    set_active_adapters(model, ("b",))
    assert active_adapter(model) == "b"
    set_active_adapters(model, ["a", "b"])  # several names: their Stack
    assert str(active_adapter(model)) == "Stack('a', 'b')"
    set_active_adapters(model, "b")
    with pytest.raises(ValueError, match="empty list"):
        set_active_adapters(model, [])
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        set_active_adapters(model, ["c"])
    with pytest.raises(TypeError, match="expects an adapter name"):
        set_active_adapters(model, 3)  # type: ignore[arg-type]


@pytest.mark.adapterhub
def test_set_active_adapters_with_adapterhub_compositions() -> None:
    composition = pytest.importorskip("adapters.composition")
    model = make_model("bert")
    add_adapter(model, "a", "pfeiffer")
    add_adapter(model, "b", "pfeiffer")
    set_active_adapters(model, composition.Stack("a"))
    assert active_adapter(model) == "a"
    with pytest.raises(ValueError, match=r"Fuse\('a', 'b'\) has no fusion layer named 'a,b'"):
        set_active_adapters(model, composition.Fuse("a", "b"))
    assert active_adapter(model) == "a"
    set_active_adapters(model, composition.Parallel("a", "b"))
    assert str(active_adapter(model)) == "Parallel('a', 'b')"
