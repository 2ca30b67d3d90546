"""A decode step with a static KV cache, traced whole by torch.compile (``fullgraph=True``: a graph break
is an error) with adapters active, one for the batch or one per row; on a GPU this is the step that
runs as a CUDA graph. Each compiled step equals the eager step from the same cache."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from .models import HIDDEN, LAYERS, randomize

from adapter_fused import add_adapter, per_sample_adapters, set_active_adapters  # noqa: E402

transformers = pytest.importorskip("transformers")
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
"""The keyword of the key/value cache (transformers 5.25 renamed it)."""


def decoder():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=2 * HIDDEN, vocab_size=97, max_position_embeddings=64)).eval()
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", "pfeiffer")
    randomize(model.model.fused_adapters.parameters(), seed=4, std=0.3)
    return model


def prefilled(model, batch: int):  # type: ignore[no-untyped-def]
    """A static cache holding a 5-token prompt, and the next token of each row."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(3, 97, (batch, 5), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True, cache_position=torch.arange(5), **{CACHE: cache})
    return cache, out.logits[:, -1:].argmax(-1)


def step(model, token: torch.Tensor, cache) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return model(input_ids=token, cache_position=torch.tensor([5]), use_cache=True, **{CACHE: cache}).logits


@pytest.mark.parametrize("rows", [None, ["a", "b"], ["b", None]])
def test_decode_step_compiles_without_graph_breaks(rows: list[str | None] | None) -> None:
    model = decoder()
    batch = 1 if rows is None else len(rows)
    if rows is None:
        set_active_adapters(model, "a")
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with torch.no_grad(), (per_sample_adapters(model, rows) if rows else torch.no_grad()):
        cache, token = prefilled(model, batch)
        want = step(model, token, copy.deepcopy(cache))
        got = compiled(model, token, copy.deepcopy(cache))
        set_active_adapters(model, None)
        plain = step(model, token, copy.deepcopy(cache)) if rows is None else None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if plain is not None:
        assert (want - plain).abs().max() > 1e-2  # the adapter ran in the compiled step


def test_compiled_step_follows_the_rows_of_each_block() -> None:
    """One compiled step, called under blocks naming other adapters per row: each call runs its own rows
    (the compiled code is guarded on what it read, not reused blindly)."""
    model = decoder()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with torch.no_grad():
        with per_sample_adapters(model, ["a", "b"]):
            cache, token = prefilled(model, 2)
        for rows in (["a", "b"], ["b", "a"], [None, "a"]):
            with per_sample_adapters(model, rows):
                want = step(model, token, copy.deepcopy(cache))
                got = compiled(model, token, copy.deepcopy(cache))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_code_follows_adapters_added_and_switched_after_compiling() -> None:
    """torch.compile does not watch hooks being added or removed: compiled code must still see a model's
    first adapter (added after compiling), a change of the active adapter, deactivation and new weights."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=2 * HIDDEN, vocab_size=97, max_position_embeddings=64)).eval()
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))

    def logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return model(input_ids=ids).logits

    compiled = torch.compile(logits, fullgraph=True, backend="eager")
    with torch.no_grad():
        base = compiled(model, ids)
        add_adapter(model, "a", "houlsby")
        add_adapter(model, "b", "pfeiffer")
        randomize(model.model.fused_adapters.parameters(), seed=4, std=0.3)
        for setup in ("a", "b", None, "a"):
            set_active_adapters(model, setup)
            want = logits(model, ids)
            torch.testing.assert_close(compiled(model, ids), want, rtol=1e-5, atol=1e-5)
            assert (setup is None) == torch.allclose(want, base, atol=1e-5)
        for p in model.model.fused_adapters["a"].parameters():
            p.mul_(2.0)
        torch.testing.assert_close(compiled(model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
