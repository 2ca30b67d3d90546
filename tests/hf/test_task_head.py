"""What ``train_adapter`` trains and ``save_adapter`` writes of a task model's own head: the head
outside ``base_model`` but never the output embeddings (an ``lm_head``, tied or not; the decoder of
BERT's masked-LM head and its bias), as AdapterHub 1.3's ``train_adapter`` freezes them; and no head
at all after ``train_adapter(..., train_head=False)``, so a save never writes frozen pretrained weights.
tests/convergence/test_adapterhub_training.py compares the trained sets with AdapterHub itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused.hf import add_adapter, load_adapter, save_adapter, set_active_adapters, train_adapter
from adapter_fused.hf.model import head_parameters

from .models import HIDDEN, LAYERS, VOCAB, make_inputs, randomize

transformers = pytest.importorskip("transformers")

HEAD_FILES = ["head_config.json", "head_model.safetensors"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def task_model(kind: str, seed: int = 0) -> nn.Module:
    t = transformers
    torch.manual_seed(seed)
    bert = t.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "bert-classifier":
        return t.BertForSequenceClassification(bert)
    if kind == "bert-mlm":
        return t.BertForMaskedLM(bert)
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=VOCAB,
                                              n_positions=64))
    assert kind == "llama-untied"
    return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                            num_key_value_heads=1, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                            max_position_embeddings=64, tie_word_embeddings=False))


# What AdapterHub 1.3 trains outside the adapters after adapters.init(model) and
# model.train_adapter(name) on these models (transformers 4.57).
ADAPTERHUB_TRAINS = {
    "bert-classifier": {"classifier.weight", "classifier.bias"},
    "bert-mlm": {"cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                 "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"},
    "gpt2": set(),
    "llama-untied": set(),
}


def trained_outside_adapters(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and "fused_adapters." not in n}


@pytest.mark.parametrize("kind", list(ADAPTERHUB_TRAINS))
def test_train_adapter_leaves_output_embeddings_frozen(kind: str) -> None:
    model = task_model(kind)
    add_adapter(model, "a", "pfeiffer")
    train_adapter(model, "a")
    assert trained_outside_adapters(model) == ADAPTERHUB_TRAINS[kind]
    assert {n for n, _ in head_parameters(model)} == ADAPTERHUB_TRAINS[kind]
    output = model.get_output_embeddings()
    assert output is None or not any(p.requires_grad for p in output.parameters())
    train_adapter(model, "a", train_head=False)
    assert trained_outside_adapters(model) == set()


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**make_inputs(batch=2)).logits


def train_steps(model: nn.Module, steps: int = 2) -> None:
    """SGD steps on a fixed random projection of the logits (dropout off)."""
    model.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = make_inputs(batch=2)
    for _ in range(steps):
        out = model(**inputs).logits
        projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        optimizer.zero_grad()
        (out * projection).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["bert-mlm", "llama-untied"])
def test_save_writes_the_trained_head_and_not_the_output_embeddings(kind: str, tmp_path: Path) -> None:
    model: Any = task_model(kind)
    add_adapter(model, "a", "pfeiffer")
    randomize([p for n, p in model.named_parameters() if "fused_adapters." in n], std=0.05)
    train_adapter(model, "a")
    output_before = {n: p.detach().clone() for n, p in model.get_output_embeddings().named_parameters()}
    train_steps(model)
    assert all(torch.equal(p, output_before[n]) for n, p in model.get_output_embeddings().named_parameters())
    expected = logits(model)
    save_adapter(model, "a", tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    if kind == "bert-mlm":  # the trained transform of the MLM head, not the decoder or its bias
        assert files == sorted(ADAPTER_FILES + HEAD_FILES)
        from safetensors.torch import load_file

        assert set(load_file(tmp_path / "head_model.safetensors")) == ADAPTERHUB_TRAINS[kind]
    else:
        assert files == ADAPTER_FILES
    fresh = task_model(kind)
    assert not torch.equal(logits(fresh), expected)
    load_adapter(fresh, tmp_path)
    set_active_adapters(fresh, "a")
    assert torch.equal(logits(fresh), expected)


@pytest.mark.parametrize("kind", ["bert-classifier", "bert-mlm"])
def test_no_head_is_saved_after_train_head_false(kind: str, tmp_path: Path) -> None:
    model = task_model(kind)
    add_adapter(model, "a", "pfeiffer")
    save_adapter(model, "a", tmp_path / "before")  # before train_adapter the head is saved, as it was
    assert sorted(p.name for p in (tmp_path / "before").iterdir()) == sorted(ADAPTER_FILES + HEAD_FILES)
    train_adapter(model, "a", train_head=False)
    save_adapter(model, "a", tmp_path / "frozen")
    assert sorted(p.name for p in (tmp_path / "frozen").iterdir()) == ADAPTER_FILES
    save_adapter(model, "a", tmp_path / "before")  # a save over a directory with a head removes it
    assert sorted(p.name for p in (tmp_path / "before").iterdir()) == ADAPTER_FILES

    # a head trained anyway (unfrozen by hand after train_adapter) is saved
    for _, parameter in head_parameters(model):
        parameter.requires_grad_(True)
    save_adapter(model, "a", tmp_path / "unfrozen")
    assert sorted(p.name for p in (tmp_path / "unfrozen").iterdir()) == sorted(ADAPTER_FILES + HEAD_FILES)
    # and so is the head once train_adapter trains it again
    train_adapter(model, "a", train_head=False)
    train_adapter(model, "a")
    save_adapter(model, "a", tmp_path / "trained")
    assert sorted(p.name for p in (tmp_path / "trained").iterdir()) == sorted(ADAPTER_FILES + HEAD_FILES)


def test_a_frozen_head_still_loads(tmp_path: Path) -> None:
    """load_adapter copies a saved head into a model whose head train_adapter(train_head=False) froze."""
    model = task_model("bert-classifier")
    add_adapter(model, "a", "pfeiffer")
    train_adapter(model, "a")
    train_steps(model)
    expected = logits(model)
    save_adapter(model, "a", tmp_path)
    other = task_model("bert-classifier")
    randomize([p for _, p in head_parameters(other)], seed=9)
    add_adapter(other, "b", "pfeiffer")
    train_adapter(other, "b", train_head=False)
    load_adapter(other, tmp_path)
    trained = dict(head_parameters(model))
    assert all(torch.equal(p, trained[n]) for n, p in head_parameters(other))
    set_active_adapters(other, "a")
    assert torch.equal(logits(other), expected)
