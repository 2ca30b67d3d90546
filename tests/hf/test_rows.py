"""One adapter per row: adapters that differ in placement, width, activation, scale and layers share a
batch (``per_sample_adapters``, ``adapter_names=``), and every row equals running it alone.

The draws below are random but seeded: each builds adapters with a random placement, width, activation,
scale and left-out layers, and a batch of names mixing them with rows of the base model. Each is run on the
kernels (the Triton interpreter here) and on the plain PyTorch path the library takes where the kernels do
not run.
"""

from __future__ import annotations

import random

import pytest
import torch

from .models import HIDDEN, LAYERS, assert_row_gradients_match, hidden_states, make_inputs, make_model, randomize

from adapter_fused import AdapterConfig, add_adapter, per_sample_adapters, set_active_adapters  # noqa: E402
from adapter_fused import ops  # noqa: E402
from adapter_fused.hf.model import adapter_modules  # noqa: E402

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def draw(seed: int) -> tuple[dict[str, AdapterConfig], list[str | None]]:
    """Three adapter configs and six row names (each adapter, None and "__base__" among them), from ``seed``."""
    rng = random.Random(seed)
    configs = {}
    for name in ("a", "b", "c"):
        leave = [rng.randrange(LAYERS)] if rng.random() < 0.3 else []
        configs[name] = AdapterConfig(rng.choice(PLACEMENTS), reduction_factor=rng.choice((2, 4, 8)),
                                      activation=rng.choice(ACTIVATIONS), scale=rng.choice((0.5, 1.0, 2.0)),
                                      leave_out=leave)
    names: list[str | None] = ["a", "b", "c", None, "__base__", rng.choice(["a", "b", "c"])]
    rng.shuffle(names)
    return configs, names


def build(arch: str, configs: dict[str, AdapterConfig]):  # type: ignore[no-untyped-def]
    model = make_model(arch)
    for i, (name, config) in enumerate(configs.items()):
        add_adapter(model, name, config)
        randomize(adapter_modules(model, name).parameters(), seed=20 + i)
    return model


def one_by_one(model, inputs: dict[str, torch.Tensor], names: list[str | None]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows = []
    for i, name in enumerate(names):
        set_active_adapters(model, None if name == "__base__" else name)
        rows.append(hidden_states(model, {k: v[i : i + 1] for k, v in inputs.items()}))
    set_active_adapters(model, None)
    return torch.cat(rows)


@pytest.fixture(params=["kernels", "plain"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernels (interpreter), or the plain PyTorch path the library takes where they do not run."""
    if request.param == "plain":
        monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    return request.param


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("seed", range(5))
def test_any_mix_equals_each_row_alone(arch: str, seed: int, path: str, launches) -> None:  # type: ignore[no-untyped-def]
    configs, names = draw(seed)
    model = build(arch, configs)
    inputs = make_inputs(batch=len(names), length=5)
    with torch.no_grad():
        want = one_by_one(model, inputs, names)
        launches.clear()
        with per_sample_adapters(model, names):
            got = hidden_states(model, inputs)
        base = hidden_states(model, inputs)
    assert (launches.names != []) == (path == "kernels")
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale, (configs, names)
    for i, name in enumerate(names):  # the adapters matter, and base rows are the base model's
        if name in (None, "__base__"):
            torch.testing.assert_close(got[i], base[i], rtol=1e-5, atol=1e-5 * scale)
    assert any((got[i] - base[i]).abs().max() > 1e-2 for i, n in enumerate(names) if n not in (None, "__base__"))


def test_launches_one_per_site_and_activation(launches) -> None:  # type: ignore[no-untyped-def]
    """Adapters sharing an activation share one launch per site, whatever their placement and width."""
    model = build("bert", {"a": AdapterConfig("houlsby", reduction_factor=4, activation="relu"),
                           "b": AdapterConfig("pfeiffer", reduction_factor=8, activation="relu", scale=2.0),
                           "c": AdapterConfig("parallel", reduction_factor=2, activation="gelu")})
    inputs = make_inputs(batch=4, length=5)
    with torch.no_grad():
        launches.clear()
        with per_sample_adapters(model, ["a", "b", "c", None]):
            hidden_states(model, inputs)
    # per layer: the attention site holds "a" only (one launch); the ffn site "a", "b" (relu) and "c" (gelu)
    assert len(launches) == LAYERS * 3


def test_adapter_names_keyword(path: str) -> None:
    configs, names = draw(7)
    model = build("bert", configs)
    inputs = make_inputs(batch=len(names), length=5)
    with torch.no_grad():
        want = one_by_one(model, inputs, names)
        got = model(**inputs, adapter_names=names).last_hidden_state
        plain = hidden_states(model, inputs)  # the keyword held for that call only
        set_active_adapters(model, "b")
        assert torch.equal(model(**inputs, adapter_names=None).last_hidden_state, hidden_states(model, inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(plain, one_by_one(model, inputs, [None] * len(names)), rtol=0, atol=0)
    with pytest.raises(KeyError, match="nope"):
        model(**inputs, adapter_names=["a", "nope", None, None, None, None])


def test_one_name_for_every_row_takes_the_single_adapter_plan(launches) -> None:  # type: ignore[no-untyped-def]
    model = build("bert", {"a": AdapterConfig("pfeiffer"), "b": AdapterConfig("houlsby")})
    inputs = make_inputs(batch=3, length=4)
    set_active_adapters(model, "a")
    with torch.no_grad():
        launches.clear()
        want = hidden_states(model, inputs)
        single = list(launches.names)
        set_active_adapters(model, None)
        launches.clear()
        with per_sample_adapters(model, ["a", "a", "a"]):
            got = hidden_states(model, inputs)
    assert torch.equal(got, want) and launches.names == single


def test_changed_weights_are_restacked() -> None:
    """Without autograd the stacked banks are kept; a weight changed in place (or replaced) is seen."""
    model = build("bert", {"a": AdapterConfig("houlsby"), "b": AdapterConfig("houlsby", activation="gelu")})
    inputs = make_inputs(batch=2, length=4)
    with torch.no_grad():
        with per_sample_adapters(model, ["a", "b"]):
            before = hidden_states(model, inputs)
        adapter_modules(model, "b")["0"]["ffn"].up.weight.mul_(3.0)
        with per_sample_adapters(model, ["a", "b"]):
            after = hidden_states(model, inputs)
        want = one_by_one(model, inputs, ["a", "b"])
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_gradients_of_a_mixed_batch_reach_each_adapter() -> None:
    # The loss is a fixed random projection of the output: the output ends in a layer norm, so the sum of
    # its squares would be constant and its gradients rounding noise.
    configs = {"a": AdapterConfig("houlsby", reduction_factor=4), "b": AdapterConfig("pfeiffer", scale=2.0),
               "c": AdapterConfig("parallel", activation="gelu", reduction_factor=8)}
    model = build("bert", configs)
    names = ["a", "b", None, "c"]
    inputs = make_inputs(batch=len(names), length=5)
    probe = torch.randn(len(names), 5, HIDDEN, generator=torch.Generator().manual_seed(6))
    with per_sample_adapters(model, names):
        (hidden_states(model, inputs) * probe).sum().backward()
    got = {n: [p.grad.clone() for p in adapter_modules(model, n).parameters()] for n in configs}
    assert_row_gradients_match(model, inputs, names, probe, got)  # the same loss, one row at a time


def lm(arch: str, configs: dict[str, AdapterConfig]):  # type: ignore[no-untyped-def]
    """A tiny causal LM (random weights) with the adapters of ``configs``, given the adapter methods."""
    import transformers

    import adapter_fused

    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                                                                     vocab_size=97, n_positions=64))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=2 * HIDDEN, vocab_size=97, max_position_embeddings=64))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always the full length
    adapter_fused.init(model)
    for i, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config)
        randomize(adapter_modules(model, name).parameters(), seed=30 + i, std=0.5)
    return model.eval()


MIXED = {"a": AdapterConfig("houlsby", reduction_factor=4), "b": AdapterConfig("pfeiffer", activation="gelu"),
         "c": AdapterConfig("parallel", reduction_factor=8, scale=2.0)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("sampling", [False, True])
def test_generate_with_mixed_adapters_equals_each_prompt_alone(arch: str, sampling: bool) -> None:
    """``generate(adapter_names=...)`` with a KV cache: each prompt's tokens (greedy) and the logits of every
    step equal generating or scoring that prompt alone with its adapter active. For sampling, each row's
    sampled tokens are scored alone (teacher-forced) and its logits compared step by step."""
    model = lm(arch, MIXED)
    names = ["a", "b", None, "c", "a"]
    prompts = torch.randint(3, 97, (len(names), 6), generator=torch.Generator().manual_seed(5))
    options = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True, use_cache=True)
    torch.manual_seed(11)
    with torch.no_grad():
        out = model.generate(prompts, adapter_names=names, do_sample=sampling, top_k=0, **options)
    logits = torch.stack(out.logits, dim=1)  # (rows, steps, vocab)
    changed = 0
    for i, name in enumerate(names):
        model.set_active_adapters(name)
        with torch.no_grad():
            if not sampling:
                alone = model.generate(prompts[i : i + 1], do_sample=False, **options)
                assert torch.equal(alone.sequences[0], out.sequences[i]), name
                want = torch.stack(alone.logits, dim=1)[0]
            else:  # the sampled continuation, scored alone: the logits that predicted each new token
                full = model(out.sequences[i : i + 1]).logits[0]
                want = full[prompts.shape[1] - 1 : -1]
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        model.set_active_adapters(None)
        with torch.no_grad():
            base = model(out.sequences[i : i + 1]).logits[0, prompts.shape[1] - 1 : -1]
        changed += int((base - want).abs().max() > 1e-2)
    assert changed == 4  # every row with an adapter differs from the base model


def test_generate_with_beams_expands_the_names() -> None:
    """Beam search repeats each prompt's rows: each prompt still runs its own adapter."""
    model = lm("gpt2", MIXED)
    names = ["b", "c"]
    prompts = torch.randint(3, 97, (len(names), 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = model.generate(prompts, adapter_names=names, num_beams=3, num_return_sequences=2, max_new_tokens=4,
                             do_sample=False)
        for i, name in enumerate(names):
            model.set_active_adapters(name)
            alone = model.generate(prompts[i : i + 1], num_beams=3, num_return_sequences=2, max_new_tokens=4,
                                   do_sample=False)
            assert torch.equal(alone, out[2 * i : 2 * i + 2]), name
