"""AdapterFusion (Fuse): outputs and gradients against the fusion written out by hand in float64 for
every option of its config, adding, training and removing fusions, their files and checkpoints, and
parity with AdapterHub: a fusion trained there loads here with its outputs and gradients, and back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused import (
    Fuse,
    FusionConfig,
    MultiTask,
    Stack,
    add_adapter_fusion,
    delete_adapter_fusion,
    init,
    load_adapter_fusion,
    save_adapter_fusion,
    train_adapter_fusion,
)
from adapter_fused.hf import active_adapter, set_active_adapters
from adapter_fused.hf.fusion import FUSION_PRESETS, fusion_regularization_loss, get_fusion, list_fusions

from .models import make_inputs, make_model
from .test_composition import CONFIGS, adapter_fn, build, hand_composed, ln_sum, weights_of

OPTIONS = {
    "dynamic": FusionConfig(),
    "static": FusionConfig.load("static"),
    "every_option": FusionConfig(query_before_ln=True, residual_before=True, temperature=True,
                                 value_before_softmax=False, value_initialized=False),
    "no_projection": FusionConfig(key=False, query=False, value=False),
}


def randomize_fusion(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.base_model.fused_adapters["fusion"].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64).to(parameter.dtype)
                            * 0.2)


def fusion_fn(p: dict[str, torch.Tensor], config: FusionConfig, query: torch.Tensor, terms: torch.Tensor,
              residual: torch.Tensor) -> torch.Tensor:
    """AdapterHub's fusion attention in float64: p holds the fusion's weights of one site."""
    if config.residual_before:
        terms = terms + residual[..., None, :]
    q = F.linear(query, p["query.weight"], p["query.bias"]) if config.query else query
    k = F.linear(terms, p["key.weight"], p["key.bias"]) if config.key else terms
    v = F.linear(terms, p["value.weight"]) if config.value and config.value_before_softmax else terms
    probs = torch.softmax(torch.einsum("...d,...nd->...n", q, k) / (50.0 if config.temperature else 1.0), dim=-1)
    out = torch.einsum("...n,...nd->...d", probs, v)
    if config.value and not config.value_before_softmax:
        out = F.linear(out, p["value.weight"])
    return out if config.residual_before else out + residual


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(("arch", "names"), [("bert", "pq"), ("bert", "ab"), ("gpt2", "pq"), ("gpt2", "xy"),
                                             ("llama", "ab")])
def test_fuse_matches_hand_written_float64(arch: str, names: str, option: str) -> None:
    """Each adapter's term s f(z) from the kernel, the attention over them, the residual: outputs and
    the gradients of every adapter and fusion parameter equal the float64 computation."""
    config = OPTIONS[option]
    model = build(arch, names)
    add_adapter_fusion(model, Fuse(*names), config)
    randomize_fusion(model)
    reference = copy.deepcopy(make_model(arch)).double()
    w = weights_of(model)
    fusion_w = w.pop("fusion")
    train_adapter_fusion(model, Fuse(*names), unfreeze_adapters=True)
    model.eval()
    parallel = CONFIGS[names[0]].placement == "parallel"

    def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        p = {k.partition(".")[2]: v for k, v in fusion_w[f"{','.join(names)}.{layer}"].items() if k.startswith(name)}
        if parallel:
            terms = torch.stack([adapter_fn(w, n, layer, name)(x) for n in names], dim=-2)
            return h + fusion_fn(p, config, x, terms, x)
        z = ln_sum(h, x, norm) if CONFIGS[names[0]].placement == "pfeiffer" else h
        terms = torch.stack([adapter_fn(w, n, layer, name)(z) for n in names], dim=-2)
        return fusion_fn(p, config, h if config.query_before_ln else z, terms, h)

    ids = make_inputs(batch=2, length=5)["input_ids"]
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=x).last_hidden_state
    x64 = x.detach().double().requires_grad_(True)
    handles = hand_composed(reference, arch, site, w)
    expected = reference(inputs_embeds=x64).last_hidden_state
    for handle in handles:
        handle.remove()
    assert (expected - reference(inputs_embeds=x64).last_hidden_state).abs().max() > 0.05
    torch.testing.assert_close(out, expected.float(), rtol=2e-5, atol=2e-5)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    fused = model.base_model.fused_adapters
    checked = 0
    for key, parameter in fused.named_parameters():
        top, _, rest = key.partition(".")
        if top == "fusion":
            fusion, layer, site_name, part = rest.split(".", 3)
            truth = fusion_w[f"{fusion}.{layer}"][f"{site_name}.{part}"].grad
            if part.startswith("dense."):  # AdapterHub's fusion without Q, K, V has it and never uses it
                assert parameter.grad is None and truth is None
                continue
        else:
            layer, site_name, part = rest.split(".", 2)
            truth = w[top][f"{layer}.{site_name}"][part].grad
        assert parameter.grad is not None and truth is not None, key
        torch.testing.assert_close(parameter.grad, truth.float(), rtol=1e-4, atol=1e-5, msg=key)
        checked += 1
    assert checked == sum(1 for n, _ in fused.named_parameters() if ".dense." not in n)


def test_fusion_layers_sit_where_the_adapters_do() -> None:
    model = build("bert", "apq")
    add_adapter_fusion(model, ["p", "q"])
    add_adapter_fusion(model, "a,a", name="aa", config="static")
    assert list_fusions(model) == ["p,q", "aa"]
    assert {layer: list(sites) for layer, sites in get_fusion(model, "p,q").items()} == {"0": ["ffn"], "1": ["ffn"]}
    assert {layer: list(sites) for layer, sites in get_fusion(model, Fuse("a", "a", name="aa")).items()} == {
        "0": ["attention", "ffn"], "1": ["attention", "ffn"]}
    value = get_fusion(model, "p,q")["0"]["ffn"].value.weight
    assert torch.equal(value, torch.full((32, 32), 1e-6).fill_diagonal_(1.0))  # "dynamic": V starts at the identity
    assert not hasattr(get_fusion(model, "aa")["0"]["ffn"], "value")  # "static" has none
    assert get_fusion(model, "p,q").config == FUSION_PRESETS["dynamic"] and get_fusion(model, "aa").adapter_names == (
        "a", "a")
    with pytest.raises(ValueError, match="sit at different sites"):
        add_adapter_fusion(model, ["a", "p"])
    with pytest.raises(ValueError, match=r"an adapter fusion named 'p,q' already exists"):
        add_adapter_fusion(model, Fuse("p", "q"))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        add_adapter_fusion(model, ["p", "nope"])
    with pytest.raises(ValueError, match=r"Fuse\('q', 'p'\) has no fusion layer named 'q,p' at layer 0 ffn"):
        set_active_adapters(model, Fuse("q", "p"))
    with pytest.raises(ValueError, match="reserved for the model's adapter fusions"):
        from adapter_fused import add_adapter

        add_adapter(model, "fusion")
    set_active_adapters(model, Fuse("p", "q"))
    delete_adapter_fusion(model, "p,q")
    assert active_adapter(model) is None and list_fusions(model) == ["aa"]
    with pytest.raises(KeyError, match=r"no adapter fusion named 'p,q' \(fusions: aa\)"):
        delete_adapter_fusion(model, ["p", "q"])


def test_fusion_config_load() -> None:
    assert FusionConfig.load(None) == FusionConfig() == FusionConfig.load("dynamic")
    assert FusionConfig.load({"key": True, "query": True, "value": False, "query_before_ln": False,
                              "regularization": False, "residual_before": False, "temperature": False,
                              "value_before_softmax": True, "value_initialized": "False",
                              "dropout_prob": None}) == FusionConfig.load("static")
    assert FusionConfig.load(FusionConfig(dropout_prob=0.2)).dropout_prob == 0.2
    with pytest.raises(ValueError, match="unknown fusion config 'big'"):
        FusionConfig.load("big")
    with pytest.raises(ValueError, match="not supported: heads"):
        FusionConfig.load({"heads": 2})
    with pytest.raises(ValueError, match="dropout_prob must be None or in"):
        FusionConfig.load({"dropout_prob": 1.5})
    with pytest.raises(TypeError, match="got int"):
        FusionConfig.load(3)


def test_train_adapter_fusion_trains_the_fusion_and_its_regularization() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = init(transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        num_labels=3)))
    for name in "pqg":
        model.add_adapter(name, config=CONFIGS[name])
    model.add_adapter_fusion(Fuse("p", "q"), set_active=True)
    assert model.active_adapters == Fuse("p", "q")
    model.train_adapter_fusion(Fuse("p", "q"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bert.fused_adapters.fusion.p,q.", "classifier.")) for n in trainable)
    assert model.training and model.active_adapters == Fuse("p", "q")
    # V starts at the identity plus 1e-6 off the diagonal: 0.01 * 32 * 31 * 1e-12 per layer
    torch.testing.assert_close(fusion_regularization_loss(model), torch.tensor(2 * 0.01 * 32 * 31 * 1e-12),
                               rtol=1e-3, atol=0)
    with torch.no_grad():
        for block in model.bert.fused_adapters["fusion"]["p,q"].values():
            block["ffn"].value.weight.add_(0.1)
    expected = sum(0.01 * (torch.eye(32) - layer["ffn"].value.weight).pow(2).sum()
                   for layer in model.bert.fused_adapters["fusion"]["p,q"].values())
    torch.testing.assert_close(model.get_fusion_regularization_loss(), expected)
    model.train_adapter_fusion(Stack("g", Fuse("p", "q")), unfreeze_adapters=True)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and "fused" in n}
    assert trainable == {"g", "p", "q", "fusion"}
    model.eval()
    loss = model(**make_inputs(), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="needs a setup holding a Fuse block"):
        model.train_adapter_fusion(Stack("p", "q"))


@pytest.mark.parametrize("safetensors", [True, False])
def test_fusion_files_and_checkpoints_round_trip(tmp_path: Path, safetensors: bool) -> None:
    """save_adapter_fusion writes AdapterHub's files; loading them, or a checkpoint of the model, gives
    the same outputs, with MultiTask over a Fuse too."""
    from adapter_fused import AutoAdapterModel

    model = init(build("bert", "ab"))
    model.add_adapter_fusion(Fuse("a", "b", name="ab"), config=OPTIONS["every_option"])
    randomize_fusion(model)
    model.set_active_adapters(MultiTask(Fuse("a", "b", name="ab"), "a"))
    inputs = make_inputs(batch=2, length=5)
    with torch.no_grad():
        expected = model(**inputs, task_ids=[0, 1]).last_hidden_state
    model.save_adapter_fusion(tmp_path / "fusion", "ab", use_safetensors=safetensors)
    written = sorted(p.name for p in (tmp_path / "fusion").iterdir())
    weights = "model_adapter_fusion.safetensors" if safetensors else "pytorch_model_adapter_fusion.bin"
    assert written == ["adapter_fusion_config.json", weights]
    meta = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text())
    assert meta["name"] == "ab" and meta["adapter_names"] == ["a", "b"] and meta["config"]["temperature"] is True
    other = init(build("bert", "ab"))
    assert load_adapter_fusion(other, tmp_path / "fusion", load_as="other") == "other"
    assert other.load_adapter_fusion(tmp_path / "fusion", set_active=True) == "ab"
    assert other.active_adapters == Fuse("a", "b", name="ab")
    other.set_active_adapters(MultiTask(Fuse("a", "b", name="ab"), "a"))
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs, task_ids=[0, 1]).last_hidden_state, expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "checkpoint")
    restored = AutoAdapterModel.from_pretrained(tmp_path / "checkpoint")
    assert restored.active_adapters == MultiTask(Fuse("a", "b", name="ab"), "a")
    with torch.no_grad():
        torch.testing.assert_close(restored(**inputs, task_ids=[0, 1]).last_hidden_state, expected, rtol=0, atol=0)
    save_adapter_fusion(restored, "ab", tmp_path / "fusion", use_safetensors=not safetensors)  # replaces the other
    assert sorted(p.name for p in (tmp_path / "fusion").iterdir()) == sorted(
        ["adapter_fusion_config.json", "pytorch_model_adapter_fusion.bin" if safetensors else
         "model_adapter_fusion.safetensors"])


def test_multi_task_of_a_fuse() -> None:
    """MultiTask(Fuse(a, b), a) on houlsby adapters: the samples of task 0 get the fusion's output,
    those of task 1 adapter a's, each as when run alone."""
    model = init(build("bert", "ab"))
    model.add_adapter_fusion(["a", "b"])
    randomize_fusion(model)
    inputs = make_inputs(batch=3, length=4)
    with torch.no_grad():
        model.set_active_adapters(Fuse("a", "b"))
        fused = model(**inputs).last_hidden_state
        model.set_active_adapters("a")
        alone = model(**inputs).last_hidden_state
        model.set_active_adapters(MultiTask(Fuse("a", "b"), "a"))
        out = model(**inputs, task_ids=[1, 0, 0]).last_hidden_state
    assert (fused - alone).abs().max() > 0.05
    torch.testing.assert_close(out, torch.stack([alone[0], fused[1], fused[2]]), rtol=1e-5, atol=1e-5)


def test_fusion_files_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    model = build("bert", "ab")
    add_adapter_fusion(model, ["a", "b"])
    save_adapter_fusion(model, "a,b", tmp_path, use_safetensors=True)
    wider = make_model("bert", hidden=48)
    with pytest.raises(ValueError, match="saved for hidden size 32, the model has 48"):
        load_adapter_fusion(wider, tmp_path)
    pfeiffer_only = build("bert", "pq")
    meta = json.loads((tmp_path / "adapter_fusion_config.json").read_text())
    meta["adapter_names"] = ["p", "q"]
    (tmp_path / "adapter_fusion_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unexpected 0.attention.key.bias"):
        load_adapter_fusion(pfeiffer_only, tmp_path)
    assert list_fusions(pfeiffer_only) == []
    (tmp_path / "model_adapter_fusion.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no fusion weights"):
        load_adapter_fusion(model, tmp_path)


# -- parity with AdapterHub: a fusion trained there loads here, and back --

HUB_FUSE_SETUPS = ["Fuse", "Fuse(Stack)", "Stack(Fuse)", "Fuse(name)"]


def _hub_setup(composition, kind: str):  # type: ignore[no-untyped-def]
    c = composition
    return {"Fuse": c.Fuse("a", "b"), "Fuse(Stack)": c.Fuse(c.Stack("b", "a"), "b"),
            "Stack(Fuse)": c.Stack("a", c.Fuse("a", "b")), "Fuse(name)": c.Fuse("b", "a", name="a,b")}[kind]


def _grads(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: object) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    hidden = model(**inputs, **kwargs).last_hidden_state
    (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", HUB_FUSE_SETUPS)
@pytest.mark.parametrize(("arch", "config", "fusion"), [("bert", "seq_bn", "dynamic"), ("bert", "double_seq_bn", "static"),
                                                        ("gpt2", "seq_bn", "dynamic"), ("llama", "double_seq_bn", "dynamic"),
                                                        ("bert", "par_bn", "dynamic"), ("bert", "options", "dynamic")])
def test_fusion_trained_in_adapterhub_loads_with_its_outputs_and_gradients(tmp_path: Path, arch: str, config: str,
                                                                          fusion: str, kind: str) -> None:
    adapters = pytest.importorskip("adapters")
    composition = pytest.importorskip("adapters.composition")
    from adapter_fused.hf.adapterhub.convert import (
        adapterhub_weights_by_layer,
        fusion_weights_from_adapterhub,
        weights_from_adapterhub,
    )

    if config == "par_bn" and "Stack" in kind:
        pytest.skip("a Stack holds one parallel-placement adapter per site (AdapterHub keeps only its output)")
    if config == "options":  # the fusion reads s f(LN(z)) with the learned scale; gate and norm after count in Stacks
        config = adapters.SeqBnConfig(ln_before=True, ln_after=True, scaling="learned", use_gating=True)
    hub = make_model(arch)
    adapters.init(hub)
    for name in "ab":
        hub.add_adapter(name, config=config)
    hub.add_adapter_fusion(composition.Fuse("a", "b"), config=fusion)
    from .models import randomize

    randomize([p for n, p in hub.named_parameters() if ".adapters." in n], std=0.2)
    hub.train_adapter_fusion(composition.Fuse("a", "b"))  # a few steps of training there
    optimizer = torch.optim.SGD([p for p in hub.parameters() if p.requires_grad], lr=0.5)
    inputs = make_inputs(batch=3, length=5)
    hub.eval()  # no dropout: the steps and the comparison are deterministic
    for _ in range(2):
        optimizer.zero_grad()
        hidden = hub(**inputs).last_hidden_state
        (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        optimizer.step()
    for name in "ab":
        hub.save_adapter(str(tmp_path / name), name)
    hub.save_adapter_fusion(str(tmp_path / "fusion"), "a,b", use_safetensors=arch == "gpt2")

    model = init(make_model(arch))
    for name in "ab":
        model.load_adapter(tmp_path / name)
    assert model.load_adapter_fusion(tmp_path / "fusion") == "a,b"
    setup = _hub_setup(composition, kind)
    tasks: dict[str, torch.Tensor] = {}
    for m in (hub, model):
        m.train_adapter_fusion(setup, unfreeze_adapters=True)
        m.eval()
    expected, hub_grads = _grads(hub, inputs, **tasks)
    out, grads = _grads(model, inputs, **tasks)
    assert (expected - make_model(arch)(**inputs).last_hidden_state).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)

    fusion_grads = fusion_weights_from_adapterhub(hub, {k: v for k, v in hub_grads.items() if "fusion" in k}, "a,b",
                                                  "grads")
    adapter_grads = {}
    for name in "ab":
        named = {k: v for k, v in hub_grads.items() if f".adapters.{name}." in k}
        adapter_grads[name] = weights_from_adapterhub(adapterhub_weights_by_layer(hub, named, "grads"), "grads")[1]
    compared = 0
    for key, grad in grads.items():
        top, _, rest = key.removeprefix(f"{type(model).base_model_prefix}.").removeprefix("fused_adapters.").partition(".")
        truth = fusion_grads[rest.partition(".")[2]] if top == "fusion" else adapter_grads[top][rest]
        torch.testing.assert_close(grad, truth, rtol=1e-4, atol=1e-5, msg=key)
        compared += 1
    assert compared == len(hub_grads) > 0
    reference = hub.base_model.get_fusion_regularization_loss()
    if reference is not None:
        torch.testing.assert_close(model.get_fusion_regularization_loss(), reference, rtol=1e-5, atol=1e-7)

    # and back: AdapterHub loads the fusion as this package saves it
    model.save_adapter_fusion(tmp_path / "ours", "a,b")  # a torch state dict, as AdapterHub reads by default
    back = make_model(arch)
    adapters.init(back)
    for name in "ab":
        back.load_adapter(str(tmp_path / name))
    back.load_adapter_fusion(str(tmp_path / "ours"))
    back.set_active_adapters(setup)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs, **tasks).last_hidden_state, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.adapterhub
def test_fusion_presets_are_adapterhubs() -> None:
    adapters = pytest.importorskip("adapters")
    for name, preset in FUSION_PRESETS.items():
        assert preset.to_dict() == adapters.AdapterFusionConfig.load(name).to_dict()
        assert FusionConfig.load(adapters.AdapterFusionConfig.load(name)) == preset


@pytest.mark.adapterhub
def test_multi_task_of_a_fuse_where_adapterhub_fails() -> None:
    """AdapterHub 1.3 allows a Fuse in a MultiTask but runs MultiTask through a BatchSplit, which
    refuses it; here the samples of the Fuse's task get the fusion's output."""
    adapters = pytest.importorskip("adapters")
    composition = pytest.importorskip("adapters.composition")
    hub = make_model("bert")
    adapters.init(hub)
    for name in "ab":
        hub.add_adapter(name, config="double_seq_bn")
    hub.add_adapter_fusion(composition.Fuse("a", "b"))
    hub.set_active_adapters(composition.MultiTask(composition.Fuse("a", "b"), "b"))
    with pytest.raises(ValueError, match="Cannot nest Fuse inside BatchSplit"):
        hub(**make_inputs(), task_ids=torch.tensor([0, 1]))
