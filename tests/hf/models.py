"""Tiny transformers models (random weights, no downloads) for the hf tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from adapter_fused import set_active_adapters  # noqa: E402
from adapter_fused.hf.model import adapter_modules  # noqa: E402

HIDDEN = 32
LAYERS = 2
VOCAB = 97
ARCHITECTURES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")


def make_model(arch: str, seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """A 2-layer model of width ``hidden`` in eval mode, with the same weights for the same seed."""
    t = transformers
    torch.manual_seed(seed)
    common_decoder = dict(hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "bert":
        model = t.BertModel(t.BertConfig(hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2,
                                         intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=64))
    elif arch == "roberta":
        model = t.RobertaModel(t.RobertaConfig(hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2,
                                               intermediate_size=2 * hidden, vocab_size=VOCAB,
                                               max_position_embeddings=64, pad_token_id=1))
    elif arch == "distilbert":
        model = t.DistilBertModel(t.DistilBertConfig(dim=hidden, n_layers=LAYERS, n_heads=2, hidden_dim=2 * hidden,
                                                     vocab_size=VOCAB, max_position_embeddings=64))
    elif arch == "gpt2":
        model = t.GPT2Model(t.GPT2Config(n_embd=hidden, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=64))
    elif arch == "llama":
        model = t.LlamaModel(t.LlamaConfig(**common_decoder))
    elif arch == "mistral":
        model = t.MistralModel(t.MistralConfig(**common_decoder))
    elif arch == "qwen2":
        model = t.Qwen2Model(t.Qwen2Config(**common_decoder))
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


def make_inputs(seed: int = 1, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def randomize(parameters: object, seed: int = 3, std: float = 0.2) -> None:
    """Give adapter parameters (zero-initialised biases included) large random values so a wrong
    placement changes the output by far more than the tolerances."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:  # type: ignore[attr-defined]
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * std)


def assert_row_gradients_match(model: nn.Module, inputs: dict[str, torch.Tensor], names: list[str | None],
                               probe: torch.Tensor, got: dict[str, list[torch.Tensor]]) -> None:
    """``got`` (adapter name -> its parameters' gradients) came from one batch whose row i ran
    ``names[i]``, loss ``(hidden_states * probe).sum()``: they equal the gradients of the same loss
    run one row at a time with that row's adapter active (rows named None skipped), within 1e-4 of
    the largest, and each is a gradient, not rounding noise."""
    model.zero_grad()
    for i, name in enumerate(names):
        if name is None:
            continue
        set_active_adapters(model, name)
        (hidden_states(model, {k: v[i : i + 1] for k, v in inputs.items()}) * probe[i : i + 1]).sum().backward()
    for name, grads in got.items():
        for g, p in zip(grads, adapter_modules(model, name).parameters()):
            assert p.grad is not None
            scale = p.grad.abs().max().item()
            assert scale > 1e-3, name  # a gradient, not rounding noise
            assert (g - p.grad).abs().max().item() <= 1e-4 * scale, name
