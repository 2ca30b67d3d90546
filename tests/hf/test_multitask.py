"""per_sample_adapters: a batch mixing adapters equals each sample run alone with its adapter."""

from __future__ import annotations

import pytest
import torch

from .models import HIDDEN, assert_row_gradients_match, hidden_states, make_inputs, make_model, randomize

from adapter_fused import add_adapter, per_sample_adapters, set_active_adapters  # noqa: E402
from adapter_fused.hf.model import adapter_modules  # noqa: E402

NAMES = ["a", None, "c", "a", "b"]


def build(arch: str, placement: str):  # type: ignore[no-untyped-def]
    model = make_model(arch)
    for i, name in enumerate(("a", "b", "c", "unused")):
        add_adapter(model, name, placement)
        randomize(adapter_modules(model, name).parameters(), seed=10 + i)
    return model


def one_by_one(model, inputs: dict[str, torch.Tensor], names: list[str | None]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows = []
    for i, name in enumerate(names):
        set_active_adapters(model, name)
        rows.append(hidden_states(model, {k: v[i : i + 1] for k, v in inputs.items()}))
    set_active_adapters(model, None)
    return torch.cat(rows)


@pytest.mark.parametrize("arch, placement", [("bert", "houlsby"), ("bert", "pfeiffer"), ("llama", "houlsby"),
                                             ("llama", "pfeiffer")])
def test_mixed_batch_equals_each_sample_alone(arch: str, placement: str) -> None:
    model = build(arch, placement)
    inputs = make_inputs(batch=len(NAMES), length=6)
    want = one_by_one(model, inputs, NAMES)
    with torch.no_grad(), per_sample_adapters(model, NAMES):
        got = hidden_states(model, inputs)
    assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    base = hidden_states(model, inputs)  # the block is over: no adapter is active again
    set_active_adapters(model, "a")
    assert not torch.equal(base, hidden_states(model, inputs))


def test_launches_equal_a_single_adapter_batch(launches) -> None:  # type: ignore[no-untyped-def]
    model = build("bert", "houlsby")
    inputs = make_inputs(batch=len(NAMES), length=6)
    set_active_adapters(model, "a")
    with torch.no_grad():
        hidden_states(model, inputs)
    single = list(launches.names)
    set_active_adapters(model, None)
    launches.clear()
    with torch.no_grad(), per_sample_adapters(model, NAMES):
        hidden_states(model, inputs)
    assert launches.names == single and len(single) == 4  # 2 layers x 2 sites, one launch each


def test_gradients_reach_each_adapter() -> None:
    # The loss is a fixed random projection of the output: the output ends in a layer norm, so a
    # loss such as the sum of its squares would be constant and its gradients rounding noise.
    model = build("bert", "houlsby")
    inputs = make_inputs(batch=len(NAMES), length=5)
    probe = torch.randn(len(NAMES), 5, HIDDEN, generator=torch.Generator().manual_seed(6))
    with per_sample_adapters(model, NAMES):
        (hidden_states(model, inputs) * probe).sum().backward()
    got = {n: [p.grad.clone() for p in adapter_modules(model, n).parameters()] for n in ("a", "b", "c")}
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in adapter_modules(model, "unused").parameters())
    assert_row_gradients_match(model, inputs, NAMES, probe, got)  # the same loss, one row at a time


def test_refusals() -> None:
    model = build("bert", "houlsby")
    add_adapter(model, "p", "pfeiffer")
    inputs = make_inputs(batch=3, length=4)
    with pytest.raises(KeyError, match="nope"):
        with per_sample_adapters(model, ["a", "nope", None]):
            pass
    with pytest.raises(ValueError, match="2 adapter names were given"):
        with per_sample_adapters(model, ["a", "b"]):
            hidden_states(model, inputs)


def test_mixed_batch_with_cross_attention_adapters() -> None:
    """On BART with adapters after cross-attention too, a mixed batch equals each sample alone; an adapter
    without them cannot share the batch."""
    from adapter_fused.hf import AdapterConfig

    from .families import VOCAB
    from .families import build as build_family

    model = build_family("bart")
    for i, name in enumerate(("a", "b", "c")):
        add_adapter(model, name, AdapterConfig("pfeiffer", cross_adapter=True))
        randomize(adapter_modules(model, name).parameters(), seed=10 + i)
    generator = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(3, VOCAB, (len(NAMES), 6), generator=generator),
              "decoder_input_ids": torch.randint(3, VOCAB, (len(NAMES), 4), generator=generator)}
    rows = []
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            set_active_adapters(model, name)
            rows.append(model(**{k: v[i : i + 1] for k, v in inputs.items()}).last_hidden_state)
        set_active_adapters(model, None)
        want = torch.cat(rows)
        with per_sample_adapters(model, NAMES):
            got = model(**inputs).last_hidden_state
    assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item()


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_mixed_batch_on_albert_swapped_attention_site(placement: str) -> None:
    """ALBERT's attention adapter reads the block input (its site is swapped): a mixed batch, samples
    without adapter included, equals each sample alone."""
    from adapter_fused.hf import AdapterConfig, Placement

    from .families import VOCAB
    from .families import build as build_family

    model = build_family("albert")
    layout = Placement(attention=True, ffn=True, parallel=True) if placement == "parallel" else placement
    for i, name in enumerate(("a", "b", "c")):
        add_adapter(model, name, AdapterConfig(layout))
        randomize(adapter_modules(model, name).parameters(), seed=10 + i)
    inputs = {"input_ids": torch.randint(3, VOCAB, (len(NAMES), 6), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        want = one_by_one(model, inputs, NAMES)
        with per_sample_adapters(model, NAMES):
            got = hidden_states(model, inputs)
        base = hidden_states(model, inputs)
    assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    assert (want[0] - base[0]).abs().max() > 1e-2  # "a" matters; sample 1 has no adapter
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["a", "a"], ["a", "b"]])
def test_a_block_entered_again_after_its_hooks_were_removed_installs_them_again(names: list[str]) -> None:
    """Entering a block checks its hooks once per change of the model's hooks: deactivating every
    adapter between two entries of the same (cached) block removes them, and the second entry puts
    them back."""
    model = build("bert", "houlsby")
    inputs = make_inputs(batch=2, length=6)
    want = one_by_one(model, inputs, names)
    with torch.no_grad():
        with per_sample_adapters(model, names):
            first = hidden_states(model, inputs)
        set_active_adapters(model, None)  # the block's hooks outlive it until the setup changes
        base = hidden_states(model, inputs)
        with per_sample_adapters(model, names):
            again = hidden_states(model, inputs)
    assert torch.equal(first, again)
    assert (again - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    assert not torch.allclose(base, want)


def test_a_deleted_adapter_is_not_kept_by_a_block_entered_before() -> None:
    """What blocks cache (their plans, the stacked bank, the block whose hooks were checked last) is
    dropped when the adapters change: a deleted adapter's modules are freed."""
    import gc
    import weakref

    from adapter_fused import delete_adapter

    model = build("bert", "houlsby")
    inputs = make_inputs(batch=2, length=6)
    with torch.no_grad(), per_sample_adapters(model, ["a", "b"]):
        hidden_states(model, inputs)
    held = [weakref.ref(m) for m in adapter_modules(model, "b").modules()]
    delete_adapter(model, "b")
    gc.collect()
    assert [ref() for ref in held] == [None] * len(held)
