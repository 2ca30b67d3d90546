"""accelerate() runs AdapterHub's bottleneck adapters on the fused kernel: on each architecture with
unchanged outputs and gradients, and under AdapterHub's compositions and options, where converted
adapters (alone or beside adapters left on their own forward) give the outputs, gradients, gating
scores and fusion attentions of the same model left unaccelerated."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from adapter_fused import fused_adapter
from adapter_fused.hf import accelerate

from ..models import hidden_states, make_inputs, make_model, randomize
from .hub import CONFIGS, adapterhub_model

adapters = pytest.importorskip("adapters")
composition = pytest.importorskip("adapters.composition")

pytestmark = pytest.mark.adapterhub
TOL = {"rtol": 2e-5, "atol": 2e-5}


def gated() -> object:
    return adapters.SeqBnConfig(use_gating=True)


def dropped(parallel: bool = False) -> object:
    """A config accelerate leaves to AdapterHub (dropout inside the adapter; the tests run in eval mode)."""
    return (adapters.ParBnConfig if parallel else adapters.SeqBnConfig)(dropout=0.1)


def hub_model(configs: Mapping[str, object], arch: str = "bert", fusion: tuple[str, ...] = ()) -> torch.nn.Module:
    """A tiny model with AdapterHub adapters ``configs`` (name -> config), every adapter (and fusion)
    parameter random and trainable, in eval mode."""
    model = make_model(arch)
    adapters.init(model)
    for i, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config=config)
        randomize([p for n, p in model.named_parameters() if f"adapters.{name}." in n], seed=20 + i)
    if fusion:
        model.add_adapter_fusion(composition.Fuse(*fusion))
        randomize([p for n, p in model.named_parameters() if "adapter_fusion_layer" in n], seed=9, std=0.1)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("adapters." in name or "adapter_fusion_layer" in name)
    return model.eval()


def activate(setup: object, *models: torch.nn.Module) -> None:
    for model in models:
        model.set_active_adapters(setup)


def accelerated(model: torch.nn.Module) -> tuple[torch.nn.Module, object]:
    """A deep copy of ``model`` passed through accelerate (warnings silenced), and the report."""
    fast = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fast, accelerate(fast)


def run(model: torch.nn.Module, **kwargs: object) -> tuple[object, torch.Tensor, dict[str, torch.Tensor]]:
    """Model output, its last hidden state and the gradients of a fixed random projection of it."""
    model.zero_grad(set_to_none=True)
    out = model(**make_inputs(), **kwargs)
    hidden = out.last_hidden_state
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5))
    (hidden * probe).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, hidden.detach(), grads


def assert_same(model: torch.nn.Module, fast: torch.nn.Module, arch: str = "bert",
                **kwargs: object) -> tuple[object, object]:
    """Outputs and every trainable parameter's gradient of ``fast`` equal ``model``'s."""
    out, hidden, grads = run(model, **kwargs)
    fast_out, fast_hidden, fast_grads = run(fast, **kwargs)
    with torch.no_grad():
        base = make_model(arch)(**make_inputs()).last_hidden_state
    if base.shape == hidden.shape:
        assert (hidden - base).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(fast_hidden, hidden, **TOL)
    assert grads and fast_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if grad is None:
            assert fast_grads[name] is None, name
        else:
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    return out, fast_out


def assert_nested_close(actual: object, expected: object) -> None:
    """Equal nested dicts of arrays / tensors (gating scores, fusion attentions)."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and actual.keys() == expected.keys()
        for key in expected:
            assert_nested_close(actual[key], expected[key])
    else:
        np.testing.assert_allclose(np.asarray(torch.as_tensor(actual).detach()),
                                   np.asarray(torch.as_tensor(expected).detach()), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_gating_scores_with_converted_adapters(arch: str, launches) -> None:  # type: ignore[no-untyped-def]
    """output_adapter_gating_scores=True: AdapterHub records each adapter's last returned item (the
    gate of a gated adapter, the scaled up-projection of one without); converted adapters return it,
    gated ones computing the gate as AdapterHub does."""
    configs = {"plain": "seq_bn", "par": "par_bn", "gate": gated(), "pgate": adapters.ParBnConfig(use_gating=True),
               "drop": dropped()}
    model = hub_model(configs, arch)
    model.set_active_adapters(composition.Stack("plain", "gate"))
    fast, report = accelerated(model)
    assert len(report.converted) == 8 and {p.split(".")[-1] for p, _ in report.skipped} == {"drop"}
    for setup in (composition.Stack("plain", "gate"), composition.Stack("par"), composition.Stack("pgate"),
                  composition.Stack("drop", "gate")):
        activate(setup, model, fast)
        launches.clear()
        out, fast_out = assert_same(model, fast, arch, output_adapter_gating_scores=True)
        assert launches  # the converted adapters ran the kernel
        scores = out.adapter_gating_scores
        assert set(scores) >= set(setup.flatten()) and all(scores[name] for name in setup.flatten())
        assert_nested_close(fast_out.adapter_gating_scores, scores)
        assert_same(model, fast, arch)  # and without scores, the usual path


@pytest.mark.parametrize("unconverted_first", [True, False])
@pytest.mark.parametrize(("block", "kind"), [("parallel", "seq_bn"), ("batch_split", "seq_bn"),
                                             ("batch_split", "par_bn"),  # AdapterHub runs no Parallel of par_bn
                                             ("multi_task", "seq_bn")])
def test_concatenating_compositions_mixing_converted_and_unconverted(block: str, kind: str,
                                                                     unconverted_first: bool) -> None:
    """Parallel, BatchSplit and MultiTask: AdapterHub concatenates the adapters' up-projections there,
    so converted adapters return theirs when an adapter of the composition was left on its own forward."""
    model = hub_model({"fast": kind, "slow": dropped(kind == "par_bn")})
    names = ("slow", "fast") if unconverted_first else ("fast", "slow")
    setup = {"parallel": composition.Parallel(*names),
             "batch_split": composition.BatchSplit(*names, batch_sizes=[1, 1]),
             "multi_task": composition.MultiTask(*names)}[block]
    model.set_active_adapters(setup)
    fast, report = accelerated(model)
    assert [p.split(".")[-1] for p in report.converted] == ["fast", "fast"]
    assert [p.split(".")[-1] for p, _ in report.skipped] == ["slow", "slow"]
    assert_same(model, fast, **({"task_ids": torch.tensor([1, 0])} if block == "multi_task" else {}))
    if kind == "seq_bn":  # nested, after an unconverted adapter
        activate(composition.Stack("slow", composition.Parallel("fast", "slow")), model, fast)
        assert_same(model, fast)


@pytest.mark.parametrize("block", ["parallel", "batch_split", "multi_task"])
@pytest.mark.parametrize("order", ["two_pass_first", "one_pass_first"])
def test_concatenating_compositions_mixing_one_pass_and_two_pass_adapters(block: str, order: str,
                                                                          launches) -> None:  # type: ignore[no-untyped-def]
    """A converted adapter with a gate (or a layer norm after the bottleneck taken before the residual)
    always returns its up-projection; beside it in Parallel, BatchSplit or MultiTask, the one-pass
    converted adapters return theirs too, or AdapterHub's pad_and_concat would meet a None."""
    model = hub_model({"gate": gated(), "norm": adapters.SeqBnConfig(ln_after=True), "plain": "seq_bn",
                       "learned": adapters.SeqBnConfig(scaling="learned")})
    pairs = [("gate", "plain"), ("norm", "learned"), ("gate", "learned")]
    fast, report = accelerated(model)
    assert report.skipped == () and len(report.converted) == 8
    for two_pass, one_pass in pairs:
        names = (two_pass, one_pass) if order == "two_pass_first" else (one_pass, two_pass)
        setup = {"parallel": composition.Parallel(*names),
                 "batch_split": composition.BatchSplit(*names, batch_sizes=[1, 1]),
                 "multi_task": composition.MultiTask(*names)}[block]
        activate(setup, model, fast)
        launches.clear()
        assert_same(model, fast, **({"task_ids": torch.tensor([1, 0])} if block == "multi_task" else {}))
        assert launches


@pytest.mark.parametrize("second", ["seq_bn", "gated", "dropped"])
def test_fuse_with_converted_adapters(second: str, launches) -> None:  # type: ignore[no-untyped-def]
    """Fuse reads each adapter's scaled up-projection; converted adapters give it from the kernel,
    beside an adapter left unconverted too. Fusion attentions and the fusion's gradients agree."""
    model = hub_model({"a": "seq_bn", "b": {"seq_bn": "seq_bn", "gated": gated(), "dropped": dropped()}[second]},
                      fusion=("a", "b"))
    fuse = composition.Fuse("a", "b")
    model.set_active_adapters(fuse)
    fast, report = accelerated(model)
    assert len(report.converted) == (2 if second == "dropped" else 4)
    launches.clear()
    out, fast_out = assert_same(model, fast, output_adapter_fusion_attentions=True)
    assert launches
    assert_nested_close(fast_out.adapter_fusion_attentions, out.adapter_fusion_attentions)
    assert any("adapter_fusion_layer" in n for n, p in fast.named_parameters() if p.grad is not None)
    activate(composition.Stack(fuse), model, fast)
    assert_same(model, fast)
    activate("a", model, fast)  # a fusion layer present but not active: the one-pass path
    launches.clear()
    assert_same(model, fast)
    assert launches


def test_fuse_of_parallel_adapters() -> None:
    model = hub_model({"a": "par_bn", "b": "par_bn"}, fusion=("a", "b"))
    model.set_active_adapters(composition.Fuse("a", "b"))
    fast, report = accelerated(model)
    assert len(report.converted) == 4
    assert_same(model, fast)


@pytest.mark.parametrize("setup", ["stack", "average", "split", "stack_average"])
@pytest.mark.parametrize("kind", ["seq_bn", "double_seq_bn", "par_bn"])
def test_stack_average_split_of_converted_adapters(setup: str, kind: str) -> None:
    model = hub_model({"a": kind, "b": kind, "c": kind})
    chosen = {"stack": composition.Stack("a", "b"),
              "average": composition.Average("a", "b", weights=[0.25, 0.75]),
              "split": composition.Split("a", "b", splits=[3, 4]),
              "stack_average": composition.Stack("c", composition.Average("a", "b"))}[setup]
    model.set_active_adapters(chosen)
    fast, report = accelerated(model)
    assert report.skipped == () and len(report.converted) == 3 * 2 * (2 if kind == "double_seq_bn" else 1)
    assert_same(model, fast)


@pytest.mark.parametrize("scaling", ["learned", "channel"])
@pytest.mark.parametrize("kind", ["seq", "par"])
def test_learned_scaling_is_folded_into_the_up_projection(  # type: ignore[no-untyped-def]
        kind: str, scaling: str, launches) -> None:
    config = (adapters.SeqBnConfig if kind == "seq" else adapters.ParBnConfig)(scaling=scaling)
    model = hub_model({"a": config, "b": "seq_bn"}, fusion=("a", "b"))
    model.set_active_adapters("a")
    fast, report = accelerated(model)
    assert len(report.converted) == 4 and report.skipped == ()
    launches.clear()
    assert_same(model, fast)
    assert launches
    grads = {n: p.grad for n, p in fast.named_parameters() if n.endswith("adapters.a.scaling")}
    assert len(grads) == 2 and all(g is not None and g.abs().max() > 0 for g in grads.values())
    activate(composition.Fuse("a", "b"), model, fast)
    assert_same(model, fast)


def test_every_option_is_converted_exactly_or_left_with_its_reason(launches) -> None:  # type: ignore[no-untyped-def]
    """Each AdapterHub option either runs the kernel with AdapterHub's outputs and gradients or is
    left to AdapterHub's own forward with the reason reported."""
    par = adapters.ParBnConfig
    configs = {
        "plain": "seq_bn",
        "ln_before": adapters.SeqBnConfig(ln_before=True),
        "ln_after": adapters.SeqBnConfig(ln_after=True),
        "ln_after_then_add": adapters.SeqBnConfig(ln_after=True, adapter_residual_before_ln=False),
        "ln_both_gated": adapters.SeqBnConfig(ln_before=True, ln_after=True, use_gating=True, scaling="channel"),
        "gating": gated(),
        "par_ln_after": par(ln_after=True),
        "par_ln_before": par(ln_before=True, scaling="learned"),
        "par_gated": par(use_gating=True, ln_after=True),
        "dropout": dropped(),
        "phm": adapters.CompacterConfig(reduction_factor=8),
        "leave_out": adapters.SeqBnConfig(leave_out=[0]),
        "per_layer": adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 8}),
        "gelu": adapters.SeqBnConfig(non_linearity="gelu"),
        "not_ln_before": adapters.SeqBnConfig(original_ln_before=False, residual_before_ln=False),
        "post_add": adapters.SeqBnConfig(residual_before_ln="post_add", scaling=0.5),
        "houlsby": adapters.DoubleSeqBnConfig(non_linearity="relu"),
    }
    model = hub_model(configs)
    layer = model.encoder.layer[1].output
    layer.adapters["plain"].DropPath = torch.nn.Identity()  # as AdapterHub's stochastic depth would add
    fast, report = accelerated(model)
    reasons = {path.split(".adapters.")[-1]: why for path, why in report.skipped}
    assert reasons == {"dropout": "dropout 0.1", "phm": "PHM or other non-linear projections",
                       "plain": "stochastic depth"}
    assert "encoder.layer.1.output.adapters.plain" in dict(report.skipped)
    done = set(report.converted)
    assert "encoder.layer.0.output.adapters.leave_out" not in done
    assert "encoder.layer.1.output.adapters.leave_out" in done
    assert "encoder.layer.0.output.adapters.plain" in done
    for name in configs:
        if name not in ("dropout", "phm", "plain", "leave_out", "houlsby"):
            assert {f"encoder.layer.{i}.output.adapters.{name}" for i in range(2)} <= done, name
    assert sum(".houlsby" in p for p in done) == 4
    for name in configs:
        activate(name, model, fast)
        launches.clear()
        assert_same(model, fast)
        assert bool(launches) == (name not in ("dropout", "phm")), name
    activate(composition.Fuse("ln_both_gated", "par_gated"), model, fast)
    model.add_adapter_fusion(composition.Fuse("ln_both_gated", "par_gated"))
    fast.add_adapter_fusion(composition.Fuse("ln_both_gated", "par_gated"))
    fast.load_state_dict(model.state_dict())
    assert_same(model, fast)
    activate(composition.Stack("ln_both_gated", "par_gated"), model, fast)
    out, fast_out = assert_same(model, fast, output_adapter_gating_scores=True)
    assert_nested_close(fast_out.adapter_gating_scores, out.adapter_gating_scores)


def test_repeated_accelerate_warns_once_per_adapter_and_converts_adapters_added_since() -> None:
    model = hub_model({"plain": "seq_bn", "gate": dropped()})
    twin = copy.deepcopy(model)

    def call() -> tuple[object, list[str]]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            report = accelerate(model)
        return report, [str(w.message) for w in record if "adapter_fused.accelerate" in str(w.message)]

    first, messages = call()
    assert len(messages) == 1 and "left 2 adapter(s)" in messages[0] and ".gate (dropout 0.1)" in messages[0]
    assert len(first.converted) == 2 and [p.split(".")[-1] for p, _ in first.skipped] == ["gate", "gate"]
    second, messages = call()
    assert messages == [] and second.converted == () and second.skipped == first.skipped
    for i, (name, config) in enumerate((("late", "par_bn"), ("normed", dropped()))):
        for m in (model, twin):
            m.add_adapter(name, config=config)
            randomize([p for n, p in m.named_parameters() if f"adapters.{name}." in n], seed=40 + i)
    third, messages = call()
    assert len(messages) == 1 and "left 2 adapter(s)" in messages[0]
    assert ".normed (dropout 0.1)" in messages[0] and ".gate" not in messages[0]
    assert [p.split(".")[-1] for p in third.converted] == ["late", "late"]
    assert len(third.skipped) == 4
    assert call()[1] == []
    for name in ("plain", "gate", "late", "normed"):
        activate(name, model, twin)
        assert_same(twin, model)
    activate(composition.Parallel("late", "normed", "gate"), model, twin)
    assert_same(twin, model)


# -- one adapter config on each architecture --

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
