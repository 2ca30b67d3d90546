"""Task heads: train_adapter trains the head outside the base model with the adapter, save_adapter
keeps it beside the adapter and load_adapter restores it, so a fresh model gives the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused.hf import add_adapter, load_adapter, save_adapter, set_active_adapters, train_adapter
from adapter_fused.hf.model import head_parameters

from .models import HIDDEN, LAYERS, VOCAB, make_inputs, randomize

transformers = pytest.importorskip("transformers")
LABELS = 3


def classifier(seed: int = 0, labels: int = LABELS) -> nn.Module:
    """A tiny BertForSequenceClassification; the same seed gives the same weights (head included)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64,
                                     num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def trained(steps: int = 3) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A classifier whose adapter and head took ``steps`` SGD steps of cross-entropy on random
    labels; returns it in eval mode and the head's values before training."""
    model = classifier()
    add_adapter(model, "task", "houlsby")
    randomize(model.bert.fused_adapters.parameters(), std=0.05)
    before = {n: p.detach().clone() for n, p in head_parameters(model)}
    before.update({n: p.detach().clone() for n, p in model.bert.fused_adapters.named_parameters()})
    train_adapter(model, "task")
    model.eval()  # no dropout: the steps are deterministic; requires_grad decides what trains
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = make_inputs(batch=4)
    labels = torch.randint(0, LABELS, (4,), generator=torch.Generator().manual_seed(5))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
    return model, before


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(batch=4)).logits


def test_train_adapter_trains_the_head() -> None:
    model = classifier()
    add_adapter(model, "task", "pfeiffer")
    train_adapter(model, "task")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith(("classifier.", "bert.fused_adapters.task.")) for n in trainable)
    assert any(n.startswith("bert.fused_adapters.task.") for n in trainable)
    assert not any(p.requires_grad for n, p in model.bert.named_parameters() if "fused_adapters" not in n)
    train_adapter(model, "task", train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("bert.fused_adapters.task.") for n in trainable)


def test_training_changes_the_head_and_adapter() -> None:
    model, before = trained()
    for name, parameter in head_parameters(model):
        assert not torch.equal(parameter, before[name]), name
    adapters = dict(model.bert.fused_adapters.named_parameters())
    assert any(not torch.equal(adapters[n], before[n]) for n in adapters)
    assert all(not p.requires_grad for n, p in model.bert.named_parameters() if "fused_adapters" not in n)


def test_tied_output_layer_is_not_a_head() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                                                                 vocab_size=VOCAB, n_positions=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert list(head_parameters(model)) == []
    add_adapter(model, "task", "pfeiffer")
    train_adapter(model, "task")
    assert not model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad


def test_save_and_load_restore_the_logits(tmp_path: Path) -> None:
    model, _ = trained()
    expected = logits(model)
    save_adapter(model, "task", tmp_path / "task")
    files = sorted(p.name for p in (tmp_path / "task").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "head_config.json", "head_model.safetensors"]
    meta = json.loads((tmp_path / "task" / "head_config.json").read_text())
    assert meta["parameters"] == {"classifier.weight": [LABELS, HIDDEN], "classifier.bias": [LABELS]}
    assert meta["config"] is None  # the task model's own head, not a prediction head

    fresh = classifier()  # same base weights, the untrained head
    untrained = {n: p.detach().clone() for n, p in head_parameters(fresh)}
    assert load_adapter(fresh, tmp_path / "task") == "task"
    set_active_adapters(fresh, "task")
    assert torch.equal(logits(fresh), expected)

    other = classifier()
    load_adapter(other, tmp_path / "task", with_head=False)
    assert all(torch.equal(p, untrained[n]) for n, p in head_parameters(other))
    set_active_adapters(other, "task")
    assert not torch.equal(logits(other), expected)

    # a bare encoder has no head to restore into: the adapter alone loads
    bare = classifier().bert
    assert load_adapter(bare, tmp_path / "task") == "task"


def to_legacy_layout(directory: Path) -> None:
    """Rewrite the task head saved in ``directory`` as this package wrote it before (``adapter_head.json``
    of format 1 and ``adapter_head.safetensors``)."""
    meta = json.loads((directory / "head_config.json").read_text())
    legacy = {"format": "adapter_fused_head", "format_version": 1, "model_class": meta["model_class"],
              "parameters": meta["parameters"]}
    (directory / "adapter_head.json").write_text(json.dumps(legacy))
    (directory / "head_model.safetensors").rename(directory / "adapter_head.safetensors")
    (directory / "head_config.json").unlink()


def test_a_head_saved_in_the_earlier_layout_still_loads(tmp_path: Path) -> None:
    model, _ = trained()
    expected = logits(model)
    save_adapter(model, "task", tmp_path)
    to_legacy_layout(tmp_path)
    fresh = classifier()
    assert load_adapter(fresh, tmp_path) == "task"
    set_active_adapters(fresh, "task")
    assert torch.equal(logits(fresh), expected)
    # saving again writes the one current layout and removes the earlier one
    save_adapter(model, "task", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "head_config.json", "head_model.safetensors"]
    save_adapter(model, "task", tmp_path / "again")
    to_legacy_layout(tmp_path / "again")
    save_adapter(model, "task", tmp_path / "again", with_head=False)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]


def test_head_file_that_disagrees_with_its_weights_is_refused(tmp_path: Path) -> None:
    model, _ = trained(steps=1)
    save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "head_config.json").read_text())
    meta["parameters"]["classifier.bias"] = [LABELS + 1]
    (tmp_path / "head_config.json").write_text(json.dumps(meta))
    fresh = classifier()
    with pytest.raises(ValueError, match=r"head_model\.safetensors: tensor classifier\.bias does not match "
                                         r"head_config\.json"):
        load_adapter(fresh, tmp_path)
    assert not hasattr(fresh.bert, "fused_adapters")


def test_without_head_writes_none_and_removes_stale_head(tmp_path: Path) -> None:
    model, _ = trained(steps=1)
    save_adapter(model, "task", tmp_path)
    save_adapter(model, "task", tmp_path, with_head=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_mismatched_head_refused_and_model_untouched(tmp_path: Path) -> None:
    model, _ = trained(steps=1)
    save_adapter(model, "task", tmp_path)
    wider = classifier(labels=LABELS + 2)
    with pytest.raises(ValueError, match=r"classifier\.weight has shape \(3, 32\), this model expects \(5, 32\)"):
        load_adapter(wider, tmp_path)
    assert not hasattr(wider.bert, "fused_adapters")
    load_adapter(wider, tmp_path, with_head=False)
    assert wider.classifier.weight.shape == (LABELS + 2, HIDDEN)
