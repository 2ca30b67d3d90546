"""Compositions of adapters (Stack, Parallel, Average, BatchSplit, Split, MultiTask, None for the base
model): outputs and gradients against the compositions written out by hand in float64, launches per site,
training, errors, a key/value cache under Parallel, and parity with AdapterHub's own compositions on
adapters it saved."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused import ACTIVATIONS, Average, BatchSplit, Fuse, MultiTask, Parallel, Split, Stack
from adapter_fused.hf import (
    AdapterConfig,
    active_adapter,
    adapter_summary,
    add_adapter,
    delete_adapter,
    load_adapter,
    per_sample_adapters,
    set_active_adapters,
    train_adapter,
)
from adapter_fused.hf.compose import given_task_ids

from .models import LAYERS, make_inputs, make_model, randomize
from .test_model import SITES, layers_of

Weights = dict[str, dict[str, dict[str, torch.Tensor]]]  # adapter -> "layer.site" -> parameter -> float64 tensor
Site = Callable[[int, str, torch.Tensor, torch.Tensor, nn.Module | None], torch.Tensor]

CONFIGS = {
    "a": AdapterConfig("houlsby", bottleneck=4, scale=0.7),
    "b": AdapterConfig("houlsby", bottleneck=6, scale=1.3),
    "c": AdapterConfig("houlsby", bottleneck=4, activation="relu"),
    "p": AdapterConfig("pfeiffer", bottleneck=4, scale=0.8),
    "q": AdapterConfig("pfeiffer", bottleneck=8, scale=1.1),
    "g": AdapterConfig("pfeiffer", bottleneck=4, activation="gelu"),
    "x": AdapterConfig("parallel", bottleneck=4, scale=0.9),
    "y": AdapterConfig("parallel", bottleneck=2, scale=1.2),
    "z": AdapterConfig("parallel", bottleneck=4, scale=0.6, activation="gelu"),
}


def build(arch: str, names: str) -> nn.Module:
    model = make_model(arch)
    for name in names:
        add_adapter(model, name, CONFIGS[name])
    randomize(model.base_model.fused_adapters.parameters())
    return model


def weights_of(model: nn.Module) -> Weights:
    out: Weights = {}
    for name, layers in model.base_model.fused_adapters.items():
        out[name] = {f"{layer}.{site}": {k: v.detach().double().requires_grad_(True)
                                         for k, v in module.state_dict().items()}
                     for layer, block in layers.items() for site, module in block.items()}
    return out


def adapter_fn(w: Weights, name: str, layer: int, site: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """s * up(act(down(z))) of adapter ``name`` at a site, in float64; None where it has no adapter."""
    p = w[name].get(f"{layer}.{site}")
    if p is None:
        return None
    config = CONFIGS[name]
    act = ACTIVATIONS[config.resolved_activation]
    return lambda z: config.scale * F.linear(act(F.linear(z, p["down.weight"], p["down.bias"])), p["up.weight"],
                                             p["up.bias"])


def ln_sum(h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    return norm(h + x) if norm is not None else h + x


# Each case: adapters to add, the composition, the batch, and the site written out by hand.
def stack_mixed(w: Weights) -> Site:
    def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        out = h + adapter_fn(w, "a", layer, name)(h)  # houlsby: both sites
        if name == "ffn":  # pfeiffer "p" reads LN(out + x), adds to out
            out = out + adapter_fn(w, "p", layer, name)(ln_sum(out, x, norm))
        return out
    return site


def average_fused(w: Weights) -> Site:
    def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        z = ln_sum(h, x, norm)
        wp, wq = 0.25, 0.75  # weights [1, 3] normalized; AdapterHub then takes the mean over the 2 adapters
        return (wp * (h + adapter_fn(w, "p", layer, name)(z)) + wq * (h + adapter_fn(w, "q", layer, name)(z))) / 2
    return site


def madx_average(w: Weights) -> Site:
    """Stack(p, Average(q, g)): g has another activation, so the average runs each adapter."""
    def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        out = h + adapter_fn(w, "p", layer, name)(ln_sum(h, x, norm))
        z = ln_sum(out, x, norm)
        return (0.5 * (out + adapter_fn(w, "q", layer, name)(z)) + 0.5 * (out + adapter_fn(w, "g", layer, name)(z))) / 2
    return site


def rows(names: list[str | None], sizes: list[int], parallel: bool = False, dim: int = 0) -> Callable[[Weights], Site]:
    """Consecutive slices of rows (``dim=1``: of positions), each through one houlsby or pfeiffer adapter
    (or a parallel one, reading x); None leaves its slice as it is (the base model)."""
    def make(w: Weights) -> Site:
        def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
            pieces, start = [], 0
            for adapter, size in zip(names, sizes):
                hs, xs = h.narrow(dim, start, size), x.narrow(dim, start, size)
                start += size
                f = adapter_fn(w, adapter, layer, name) if adapter is not None else None
                if f is None:
                    pieces.append(hs)
                elif parallel:
                    pieces.append(hs + f(xs))
                else:
                    pieces.append(hs + f(ln_sum(hs, xs, norm) if CONFIGS[adapter].placement == "pfeiffer" else hs))
            return torch.cat(pieces, dim)
        return site
    return make


TASKS = [1, 0, 1]
"""The task id of each sample in the MultiTask cases."""


def tasks(names: list[str]) -> Callable[[Weights], Site]:
    """Sample b through adapter ``names[TASKS[b]]``. A pfeiffer adapter reads ``LN(z + x)`` with
    ``z = LN(h + x)`` and adds its output to z: AdapterHub 1.3's MultiTask runs the input step twice."""
    def make(w: Weights) -> Site:
        def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
            out = []
            for b, task in enumerate(TASKS):
                adapter, hb, xb = names[task], h[b:b + 1], x[b:b + 1]
                f = adapter_fn(w, adapter, layer, name)
                if f is None:
                    out.append(hb)
                elif CONFIGS[adapter].placement == "pfeiffer":
                    z = ln_sum(hb, xb, norm)
                    out.append(z + f(ln_sum(z, xb, norm)))
                else:
                    out.append(hb + f(hb))
            return torch.cat(out)
        return site
    return make


def parallel_average(other: str, weights: tuple[float, float]) -> Callable[[Weights], Site]:
    """Parallel-placement adapters: AdapterHub averages their outputs s_i f_i(x), then adds them to h."""
    def make(w: Weights) -> Site:
        def site(layer: int, name: str, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
            fx, fo = adapter_fn(w, "x", layer, name), adapter_fn(w, other, layer, name)
            return h + (weights[0] * fx(x) + weights[1] * fo(x)) / 2
        return site
    return make


B = 3
CASES: dict[str, tuple[str, object, int, int, Callable[[Weights], Site]]] = {
    # name: (adapters, composition, batch in, copies out, hand-written site)
    "stack_mixed_placements": ("ap", Stack("a", "p"), B, 1, stack_mixed),
    "average_one_launch": ("pq", Average("p", "q", weights=[1, 3]), B, 1, average_fused),
    "madx_stack_average": ("pqg", Stack("p", Average("q", "g")), B, 1, madx_average),
    "parallel": ("ab", Parallel("a", "b"), B, 2, rows(["a", "b"], [B, B])),
    "batch_split": ("ab", BatchSplit("a", "b", batch_sizes=[1, 2]), B, 1, rows(["a", "b"], [1, 2])),
    "batch_split_two_activations": ("ac", BatchSplit("c", "a", batch_sizes=[2, 1]), B, 1, rows(["c", "a"], [2, 1])),
    "parallel_placement_average": ("xy", Average("x", "y", weights=[0.4, 0.6]), B, 1, parallel_average("y", (0.4, 0.6))),
    "parallel_placement_average_two_activations": ("xz", Average("x", "z", weights=[1, 2], normalize_weights=False), B,
                                                   1, parallel_average("z", (1.0, 2.0))),
    "parallel_placement_split_two_activations": ("xz", BatchSplit("z", "x", batch_sizes=[1, 2]), B, 1,
                                                 rows(["z", "x"], [1, 2], parallel=True)),
    "parallel_placement_split": ("xy", BatchSplit("y", "x", batch_sizes=[2, 1]), B, 1,
                                 rows(["y", "x"], [2, 1], parallel=True)),
    "parallel_with_base": ("a", Parallel("a", None), B, 2, rows(["a", None], [B, B])),
    "parallel_with_base_first": ("ac", Parallel(None, "c", "a"), B, 3, rows([None, "c", "a"], [B, B, B])),
    "batch_split_with_base": ("b", BatchSplit(None, "b", batch_sizes=[1, 2]), B, 1, rows([None, "b"], [1, 2])),
    "pfeiffer_batch_split_with_base": ("p", BatchSplit("p", None, batch_sizes=[2, 1]), B, 1, rows(["p", None], [2, 1])),
    "parallel_placement_with_base": ("x", BatchSplit(None, "x", batch_sizes=[1, 2]), B, 1,
                                     rows([None, "x"], [1, 2], parallel=True)),
    "split": ("ab", Split("a", "b", splits=[2, 3]), B, 1, rows(["a", "b"], [2, 3], dim=1)),
    "split_two_activations": ("ac", Split("c", "a", splits=[4, 1]), B, 1, rows(["c", "a"], [4, 1], dim=1)),
    "pfeiffer_split": ("pq", Split("p", "q", splits=[3, 2]), B, 1, rows(["p", "q"], [3, 2], dim=1)),
    "parallel_placement_split_positions": ("xy", Split("x", "y", splits=[1, 4]), B, 1,
                                           rows(["x", "y"], [1, 4], parallel=True, dim=1)),
    "multi_task": ("ab", MultiTask("a", "b"), B, 1, tasks(["a", "b"])),
    "multi_task_two_activations": ("ac", MultiTask("c", "a"), B, 1, tasks(["c", "a"])),
    "pfeiffer_multi_task": ("pq", MultiTask("p", "q"), B, 1, tasks(["p", "q"])),
}


def hand_composed(model: nn.Module, arch: str, site_fn: Site, w: Weights) -> list:
    """Hooks on ``model`` (a float64 copy of the base model) applying ``site_fn`` at every site
    where one of the adapters of ``w`` is."""
    handles = []
    for index, layer in enumerate(layers_of(model)):
        for site in ("attention", "ffn"):
            if not any(f"{index}.{site}" in sites for sites in w.values()):
                continue
            out_path, res_path, res_pos, norm_path = SITES[arch][site]
            box: dict = {}

            def pre(module, args, kwargs, box=box, res_pos=res_pos):  # type: ignore[no-untyped-def]
                box["x"] = args[res_pos] if len(args) > res_pos else next(
                    v for k, v in kwargs.items() if k in ("hidden_states", "input_tensor", "input"))

            layer_norm = layer.get_submodule(norm_path) if norm_path else None

            def post(module, args, output, box=box, index=index, site=site,  # type: ignore[no-untyped-def]
                     norm=layer_norm):
                h = output[0] if isinstance(output, tuple) else output
                new = site_fn(index, site, h, box.pop("x"), norm)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(layer.get_submodule(res_path).register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.get_submodule(out_path).register_forward_hook(post))
    return handles


@pytest.mark.parametrize(("arch", "case"), [(arch, case) for arch in ("bert", "gpt2") for case in CASES] + [
    ("llama", case) for case in ("madx_stack_average", "parallel", "parallel_placement_average", "parallel_with_base",
                                 "split", "pfeiffer_multi_task")])
def test_composition_matches_hand_written_float64(arch: str, case: str) -> None:
    names, setup, batch, copies, make_site = CASES[case]
    model = build(arch, names)
    reference = copy.deepcopy(make_model(arch)).double()
    w = weights_of(model)
    train_adapter(model, setup)
    model.eval()
    ids = make_inputs(batch=batch, length=5)["input_ids"]
    embed = model.get_input_embeddings()
    x = embed(ids).detach().requires_grad_(True)
    with given_task_ids(torch.tensor(TASKS)):
        out = model(inputs_embeds=x).last_hidden_state
    assert out.shape[0] == copies * batch
    x64 = x.detach().double().requires_grad_(True)
    handles = hand_composed(reference, arch, make_site(w), w)
    expected = reference(inputs_embeds=torch.cat([x64] * copies)).last_hidden_state
    for handle in handles:
        handle.remove()
    base = reference(inputs_embeds=torch.cat([x64] * copies)).last_hidden_state
    assert (expected - base).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(out, expected.float(), rtol=2e-5, atol=2e-5)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    checked = 0
    for name, layers in model.base_model.fused_adapters.items():
        for layer, block in layers.items():
            for site, module in block.items():
                for key, parameter in module.named_parameters():
                    truth = w[name][f"{layer}.{site}"][key].grad
                    assert parameter.grad is not None and truth is not None, (name, layer, site, key)
                    torch.testing.assert_close(parameter.grad, truth.float(), rtol=1e-4, atol=1e-5)
                    checked += 1
    assert checked == sum(1 for _ in model.base_model.fused_adapters.parameters())


def count_launches(model: nn.Module, launches, batch: int = 2) -> list[str]:  # type: ignore[no-untyped-def]
    launches.clear()
    with torch.no_grad():
        model(**make_inputs(batch=batch, length=4))
    return list(launches.names)


def test_average_is_one_launch_per_site_and_parallel_one_grouped_launch(launches) -> None:  # type: ignore[no-untyped-def]
    model = build("bert", "ab")
    sites = 2 * LAYERS
    set_active_adapters(model, "a")
    single = count_launches(model, launches)
    assert len(single) == sites
    set_active_adapters(model, Average("a", "b", weights=[2, 1]))
    assert count_launches(model, launches) == single  # r_a + r_b wide, one launch
    set_active_adapters(model, Stack("a", "b"))
    assert len(count_launches(model, launches)) == 2 * sites
    # the grouped kernel takes the launches of one adapter (as per_sample_adapters does)
    set_active_adapters(model, None)
    with per_sample_adapters(model, ["a", "a"]):
        assert count_launches(model, launches) == single
    set_active_adapters(model, Parallel("a", "b"))
    assert count_launches(model, launches) == single
    set_active_adapters(model, BatchSplit("b", "a", batch_sizes=[1, 1]))
    assert count_launches(model, launches) == single


def test_average_of_different_activations_runs_each_adapter(launches) -> None:  # type: ignore[no-untyped-def]
    model = build("bert", "pqg")
    set_active_adapters(model, Average("q", "g"))
    assert len(count_launches(model, launches)) == 2 * LAYERS  # pfeiffer: one site per layer, two adapters
    set_active_adapters(model, Average("q", "p"))
    assert len(count_launches(model, launches)) == LAYERS


def test_training_a_composition() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        num_labels=3)).eval()
    for name in "apq":
        add_adapter(model, name, CONFIGS[name])
    train_adapter(model, Stack("a", Average("p", "q")))
    assert model.training and active_adapter(model) == Stack("a", Average("p", "q"))
    trainable = sorted({n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and "fused" in n})
    assert trainable == ["a", "p", "q"] and model.classifier.weight.requires_grad
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    add_adapter(model, "b", CONFIGS["b"])  # adding an adapter does not change what trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    summary = {row.name: row for row in adapter_summary(model).adapters}
    assert [summary[n].active for n in "apqb"] == [True, True, True, False]
    assert [summary[n].trainable for n in "apqb"] == [True, True, True, False]
    out = model(**make_inputs()).logits
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # a failed train_adapter leaves everything as it was
    with pytest.raises(ValueError, match=r"Average\('a', 'p'.*'p' has no adapter there"):
        train_adapter(model, Average("a", "p"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    assert active_adapter(model) == Stack("a", Average("p", "q"))
    delete_adapter(model, "q")  # the composition cannot run any more
    assert active_adapter(model) is None
    add_adapter(model, "c", CONFIGS["a"])  # "a" and "p" still train: new adapters still start frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".fused_adapters.c." in n)


@pytest.mark.adapterhub
def test_setups_lists_and_adapterhub_blocks() -> None:
    model = build("bert", "ab")
    set_active_adapters(model, ["a", "b"])
    assert active_adapter(model) == Stack("a", "b") and str(active_adapter(model)) == "Stack('a', 'b')"
    set_active_adapters(model, Stack("b"))
    assert active_adapter(model) == "b"
    composition = pytest.importorskip("adapters.composition")
    set_active_adapters(model, composition.Stack("a", composition.Average("a", "b", weights=[1, 3])))
    assert active_adapter(model) == Stack("a", Average("a", "b", weights=[0.25, 0.75]))
    set_active_adapters(model, composition.BatchSplit("a", "b", batch_sizes=2))
    assert active_adapter(model) == BatchSplit("a", "b", batch_sizes=[2, 2])
    set_active_adapters(model, composition.Stack(composition.Split("a", "b", splits=[2, 3])))
    assert active_adapter(model) == Stack(Split("a", "b", splits=[2, 3]))
    set_active_adapters(model, composition.MultiTask("b", "a"))
    assert active_adapter(model) == MultiTask("b", "a")
    set_active_adapters(model, composition.Parallel("a", None))  # AdapterHub builds it, and refuses to run it
    assert active_adapter(model) == Parallel("a", None)


def test_blocks_nesting_and_none() -> None:
    """None (the base model) sits in Parallel and BatchSplit only; Split, MultiTask and Fuse nest as in
    AdapterHub; a block needs at least one adapter."""
    model = build("bert", "ab")
    for setup in (Stack("a", Split("b", "a", splits=2)), Split(BatchSplit("a", "b", batch_sizes=1), "b", splits=[1, 4]),
                  MultiTask(Stack("a", "b"), Average("a", "b")), BatchSplit(None, Split("a", "b", splits=3),
                                                                           batch_sizes=[1, 2])):
        set_active_adapters(model, setup)
        assert active_adapter(model) == setup
    assert BatchSplit("a", None, batch_sizes=2).flatten() == ["a"] and Parallel(None, "b").first() == "b"
    with pytest.raises(ValueError, match=r"Parallel\(\) needs at least one adapter besides None"):
        Parallel(None, None)
    for block in (lambda: Stack("a", None), lambda: Average("a", None), lambda: Split("a", None, splits=1)):
        with pytest.raises(TypeError, match=r"takes adapter names and composition blocks, got NoneType"):
            block()
    with pytest.raises(TypeError, match=r"or None for the base model, got int"):
        Parallel("a", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 2 non-negative splits"):
        Split("a", "b", splits=[1, -1])
    for message, setup in {r"MultiTask cannot be nested in Parallel": Parallel(MultiTask("a", "b"), "a"),
                           r"Split cannot be nested in MultiTask": MultiTask(Split("a", "b", splits=1), "a"),
                           r"Average cannot be nested in Fuse": Stack(Fuse(Average("a", "b"), "a"))}.items():
        with pytest.raises(ValueError, match=message):
            set_active_adapters(model, setup)


def test_split_multi_task_and_none_take_the_launches_of_one_adapter(launches) -> None:  # type: ignore[no-untyped-def]
    """Split runs one launch per site with an adapter per token, MultiTask one with an adapter per sample."""
    model = build("bert", "ab")
    set_active_adapters(model, "a")
    single = count_launches(model, launches)
    set_active_adapters(model, Split("a", "b", splits=[1, 3]))
    assert count_launches(model, launches) == single
    set_active_adapters(model, MultiTask("b", "a"))
    with given_task_ids([1, 0]):
        assert count_launches(model, launches) == single
    set_active_adapters(model, Parallel(None, "a"))
    assert count_launches(model, launches) == single


def test_task_ids_given_with_the_call() -> None:
    """``task_ids=`` on a model with the methods: positions or names; without them, or with the wrong
    number or values, MultiTask says what it needs."""
    from adapter_fused import init

    model = init(build("bert", "ab"))
    inputs = make_inputs(batch=3, length=4)
    alone = {}
    with torch.no_grad():
        for name in "ab":
            model.set_active_adapters(name)
            alone[name] = model(**inputs).last_hidden_state
        model.set_active_adapters(MultiTask("a", "b"))  # houlsby adapters: each sample as its adapter alone
        expected = torch.stack([alone["b"][0], alone["a"][1], alone["b"][2]])
        torch.testing.assert_close(model(**inputs, task_ids=torch.tensor([1, 0, 1])).last_hidden_state, expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(**inputs, task_ids=["b", "a", "b"]).last_hidden_state, expected,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"MultiTask\('a', 'b'\) needs the task of each sample: call the model "
                                             r"with task_ids="):
            model(**inputs)
        with pytest.raises(ValueError, match=r"task_ids \[1, 0\] .* must give each of the 3 samples"):
            model(**inputs, task_ids=torch.tensor([1, 0]))
        with pytest.raises(ValueError, match=r"in \[0, 2\)"):
            model(**inputs, task_ids=[0, 2, 1])
        with pytest.raises(ValueError, match=r"child positions or the names of its adapter children"):
            model(**inputs, task_ids=["a", "c", "b"])


def test_errors_name_the_composition_and_leave_the_model_alone() -> None:
    model = build("bert", "apxy")
    set_active_adapters(model, "a")
    inputs = make_inputs()
    expected = model(**inputs).last_hidden_state
    bad = {
        r"Parallel cannot be nested in Average": Average("a", Parallel("a", "p")),
        r"nested too deeply": Parallel(BatchSplit("a", Average("a", "a"), batch_sizes=1), "a"),
        r"differ in placement": BatchSplit("a", "p", batch_sizes=1),
        r"mixes parallel-placement and sequential": Stack("p", "x"),
        r"stacks several parallel-placement adapters": Stack("x", "y"),
        r"2 Parallel blocks": Stack(Parallel("a", "p"), Parallel("a", "p")),
    }
    for message, setup in bad.items():
        with pytest.raises(ValueError, match=message):
            set_active_adapters(model, setup)
    with pytest.raises(ValueError, match=r"cannot average at layer 0 attention: 'p' has no adapter"):
        set_active_adapters(model, Average("a", "p"))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_active_adapters(model, Stack("a", "nope"))
    with pytest.raises(ValueError, match="needs 2 finite weights"):
        Average("a", "p", weights=[1.0])
    with pytest.raises(ValueError, match="needs 2 non-negative batch sizes"):
        BatchSplit("a", "p", batch_sizes=[1])
    assert active_adapter(model) == "a"
    torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    set_active_adapters(model, BatchSplit("a", "a", batch_sizes=[1, 2]))
    with pytest.raises(ValueError, match=r"BatchSplit\('a', 'a', batch_sizes=\[1, 2\]\) splits 3 rows but the batch"):
        model(**inputs)


def test_parallel_copies_equal_each_adapter_alone() -> None:
    """Copy i of a Parallel output is child i run alone; a deep copy of the model runs it too."""
    model = build("gpt2", "ab")
    inputs = make_inputs(batch=2, length=5)
    alone = {}
    with torch.no_grad():
        for name in "ab":
            set_active_adapters(model, name)
            alone[name] = model(**inputs).last_hidden_state
        set_active_adapters(model, Parallel("a", Stack("b")))
        both = model(**inputs).last_hidden_state
        twin = copy.deepcopy(model)
        again = twin(**inputs).last_hidden_state
    torch.testing.assert_close(both, torch.cat([alone["a"], alone["b"]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, both, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_parallel_continues_from_a_filled_cache(arch: str) -> None:
    """The first call fills a cache of n*B rows; the next ones continue it, with inputs of B rows
    (repeated) or of n*B rows (as picked from the n*B rows of logits), each copy as its child alone."""
    model = build(arch, "ab")
    ids = make_inputs(batch=2, length=6)["input_ids"]
    prompt, step = ids[:, :4], ids[:, 4:]
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # left padding in the first sample
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.2x: cache
    alone = []
    with torch.no_grad():
        for name in ("a", None):
            set_active_adapters(model, name)
            alone.append(model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 4:])
        expected = torch.cat(alone)
        set_active_adapters(model, Parallel("a", None))
        for repeated in (False, True):
            cache = model(input_ids=prompt, attention_mask=mask[:, :4], use_cache=True).past_key_values
            for i in range(2):
                token = step[:, i:i + 1].repeat(2, 1) if repeated else step[:, i:i + 1]
                out = model(input_ids=token, attention_mask=mask[:, :5 + i], use_cache=True, **{keyword: cache})
                cache = out.past_key_values
                torch.testing.assert_close(out.last_hidden_state[:, 0], expected[:, i], rtol=1e-5, atol=1e-5)
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"the key/value cache holds 4 rows, which is neither the 3 rows"):
            model(input_ids=torch.cat([step[:, :1], step[:1, :1]]), **{keyword: cache})


# -- parity with AdapterHub's own compositions, on adapters it saved --

HUB_SETUPS = ["Stack", "Parallel", "Average", "BatchSplit", "Stack(Average)", "Parallel(Stack)", "MultiTask",
              "MultiTask(Stack)", "Split", "Stack(Split)"]
HUB_TASK_IDS = [1, 0, 1]


def hub_setup(composition, kind: str):  # type: ignore[no-untyped-def]
    c = composition
    return {
        "Stack": c.Stack("a", "b"),
        "Parallel": c.Parallel("a", "b"),
        "Average": c.Average("a", "b", weights=[0.3, 0.9]),
        "BatchSplit": c.BatchSplit("b", "a", batch_sizes=[1, 2]),
        "Stack(Average)": c.Stack("a", c.Average("b", "a", weights=[2, 1])),
        "Parallel(Stack)": c.Parallel(c.Stack("a", "b"), "b"),
        "MultiTask": c.MultiTask("a", "b"),
        "MultiTask(Stack)": c.MultiTask(c.Stack("b", "a"), c.Average("a", "b", weights=[1, 2])),
        "Split": c.Split("a", "b", splits=[2, 3]),
        "Stack(Split)": c.Stack("b", c.Split("b", "a", splits=[4, 1])),
    }[kind]


def _matches_adapterhub(tmp_path: Path, make: Callable[[], nn.Module], config: object, kind: str,
                        inputs: dict[str, torch.Tensor]) -> nn.Module:
    """Adapters "a" and "b" of ``config`` added by AdapterHub to a model from ``make``, saved and loaded
    into another: under the composition ``kind`` both compute the same last hidden state, which the
    adapters move away from the base model's. Returns the model the adapters were loaded into."""
    adapters = pytest.importorskip("adapters")
    composition = pytest.importorskip("adapters.composition")
    from adapter_fused import init

    hub = make()
    adapters.init(hub)
    for name in "ab":
        hub.add_adapter(name, config=config)
    randomize([p for n, p in hub.named_parameters() if ".adapters." in n])
    hub.eval()
    model = init(make())  # with the methods: called with task_ids= as AdapterHub's models are
    for name in "ab":
        hub.save_adapter(str(tmp_path / name), name)
        assert load_adapter(model, tmp_path / name) == name
    setup = hub_setup(composition, kind)
    hub.set_active_adapters(setup)
    set_active_adapters(model, setup)
    tasks = {"task_ids": torch.tensor(HUB_TASK_IDS)} if kind.startswith("MultiTask") else {}
    with torch.no_grad():
        expected = hub(**inputs, **tasks).last_hidden_state
        out = model(**inputs, **tasks).last_hidden_state
        base = make()(**inputs).last_hidden_state
    assert out.shape == expected.shape
    assert (expected - base.repeat(expected.shape[0] // base.shape[0], 1, 1)).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    return model


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", HUB_SETUPS)
@pytest.mark.parametrize(("arch", "config"), [("bert", "seq_bn"), ("bert", "double_seq_bn"), ("gpt2", "seq_bn"),
                                              ("llama", "double_seq_bn")])
def test_matches_adapterhub_compositions(tmp_path: Path, arch: str, config: str, kind: str) -> None:
    _matches_adapterhub(tmp_path, lambda: make_model(arch), config, kind, make_inputs(batch=3, length=5))


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", HUB_SETUPS)
def test_compositions_on_albert_match_adapterhub(tmp_path: Path, kind: str) -> None:
    """ALBERT's attention adapters read the block input and take the attention output as residual, in
    AdapterHub and here; composed, they still compute AdapterHub's outputs."""
    from .families import VOCAB, build

    inputs = {"input_ids": torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))}
    model = _matches_adapterhub(tmp_path, lambda: build("albert"), "double_seq_bn", kind, inputs)
    assert "attention" in model.base_model.fused_adapters["a"]["0"]


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", [kind for kind in HUB_SETUPS if "Split" not in kind])  # encoder, decoder: 2 lengths
@pytest.mark.parametrize(("model_type", "config"), [("bart", "seq_bn"), ("t5", "double_seq_bn")])
def test_compositions_with_cross_attention_adapters_match_adapterhub(tmp_path: Path, model_type: str, config: str,
                                                                      kind: str) -> None:
    """The same compositions on encoder-decoder models whose adapters also sit after cross-attention
    (``cross_adapter=True``): the decoder's outputs equal AdapterHub's."""
    adapters = pytest.importorskip("adapters")
    from .families import VOCAB, build

    generator = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, VOCAB, (3, 6), generator=generator),
              "decoder_input_ids": torch.randint(3, VOCAB, (3, 4), generator=generator)}
    model = _matches_adapterhub(tmp_path, lambda: build(model_type),
                                adapters.AdapterConfig.load(config, cross_adapter=True), kind, inputs)
    assert all("cross" in model.base_model.fused_adapters["a"][str(i)] for i in (2, 3))


@pytest.mark.adapterhub
@pytest.mark.parametrize("setup", ["Parallel(a, None)", "BatchSplit(None, a)"])
def test_none_where_adapterhub_refuses_it(setup: str) -> None:
    """AdapterHub 1.3 builds Parallel and BatchSplit blocks holding None but refuses to activate them
    ("Cannot nest None") and fails in the forward pass if one is set anyway; here those rows run the
    base model, the others their adapter (checked against running each alone)."""
    adapters = pytest.importorskip("adapters")
    composition = pytest.importorskip("adapters.composition")
    block = {"Parallel(a, None)": composition.Parallel("a", None),
             "BatchSplit(None, a)": composition.BatchSplit(None, "a", batch_sizes=[1, 2])}[setup]
    hub = make_model("bert")
    adapters.init(hub)
    hub.add_adapter("a", config="seq_bn")
    with pytest.raises(ValueError, match="Cannot nest None"):
        hub.set_active_adapters(block)
    hub.adapters_config.active_setup = block
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'flatten'"):
        hub(**make_inputs(batch=3, length=5))
    model = build("bert", "a")
    inputs = make_inputs(batch=3, length=5)
    with torch.no_grad():
        base = make_model("bert")(**inputs).last_hidden_state
        set_active_adapters(model, "a")
        alone = model(**inputs).last_hidden_state
        set_active_adapters(model, block)
        out = model(**inputs).last_hidden_state
    expected = torch.cat([alone, base]) if setup.startswith("Parallel") else torch.cat([base[:1], alone[1:]])
    assert (alone - base).abs().max() > 0.05
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
