"""Checkpoints keep their adapters: save_pretrained / Trainer.save_model / Trainer's periodic
checkpoints of an init-ed model or an AutoAdapterModel record the adapters, heads and active
setup, and AutoAdapterModel.from_pretrained or restore_adapters bring them back with bit-identical
outputs; Trainer resumes from such a checkpoint to the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from .models import HIDDEN, LAYERS, VOCAB, make_inputs, randomize

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from adapter_fused import AutoAdapterModel, init, restore_adapters
from adapter_fused.hf import list_adapters
from adapter_fused.hf.formats import SETUP_FILE

LABELS = 3


def bert_config() -> object:
    return transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                   intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64,
                                   num_labels=LABELS)


def classifier_with_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = init(transformers.BertForSequenceClassification(bert_config()).eval())
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("b")
    randomize(model.bert.fused_adapters.parameters(), std=0.1)
    model.set_active_adapters("b")
    return model


def flexible_with_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = AutoAdapterModel.from_config(bert_config()).eval()
    model.add_adapter("a", config="double_seq_bn")
    model.add_classification_head("a", num_labels=LABELS)
    model.add_adapter("b")
    model.add_tagging_head("b", num_labels=4)
    randomize(model.fused_adapters.parameters(), std=0.1)
    randomize(model.heads.parameters(), seed=4, std=0.1)
    model.set_active_adapters("a")
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(batch=3)).logits


def dataset(size: int = 8, length: int = 6) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    labels = torch.randint(0, LABELS, (size,), generator=generator)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def arguments(out: Path, steps: int = 2, **extra: object) -> object:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.05, warmup_steps=0,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, logging_steps=1, **extra)


def test_save_pretrained_then_restore_into_plain_model(tmp_path: Path) -> None:
    model = classifier_with_adapters()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / SETUP_FILE).read_text())
    assert meta["active"] == "b" and list(meta["adapters"]) == ["a", "b"]
    assert meta["adapters_module"] == "bert.fused_adapters"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]

    logger = logging.getLogger("transformers")  # the package's loggers report to it
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    finally:
        logger.removeHandler(handler)
    # transformers reports the adapter weights it did not load (4.57 lists the keys; 5.x groups the
    # layer indices), and the report says how to get them back
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("bert.fused_adapters.a." in m and "attention.down.weight" in m and "restore_adapters" in m
               for m in warned)
    assert list_adapters(plain) == []
    assert not torch.equal(logits(plain), expected)

    assert restore_adapters(plain, tmp_path) == ["a", "b"]
    assert plain.active_adapters == "b"
    assert torch.equal(logits(plain), expected)
    plain.set_active_adapters("a")
    model.set_active_adapters("a")
    assert torch.equal(logits(plain), logits(model))
    # the restored model is init-ed: its own checkpoints keep the adapters
    plain.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / SETUP_FILE).is_file()


def test_restore_errors_leave_the_model_unchanged(tmp_path: Path) -> None:
    model = classifier_with_adapters()
    model.save_pretrained(tmp_path)
    target = init(transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval())
    target.add_adapter("b")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="already has adapters named b"):
        restore_adapters(target, tmp_path)
    assert list_adapters(target) == ["b"]
    assert before.keys() == target.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(FileNotFoundError, match=SETUP_FILE):
        restore_adapters(target, tmp_path / "nowhere")
    # a damaged weight file is reported before anything changes
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    fresh = transformers.BertForSequenceClassification(bert_config())
    with pytest.raises(ValueError, match="model.safetensors"):
        restore_adapters(fresh, tmp_path)
    assert list_adapters(fresh) == []


def test_auto_adapter_model_round_trip_with_heads(tmp_path: Path) -> None:
    model = flexible_with_adapters()
    expected_a = logits(model)
    model.set_active_adapters("b")
    expected_b = logits(model)
    assert expected_b.shape == (3, 7, 4)
    model.save_pretrained(tmp_path)
    loaded = AutoAdapterModel.from_pretrained(tmp_path).eval()
    assert list_adapters(loaded) == ["a", "b"] and list(loaded.heads) == ["a", "b"]
    assert loaded.active_adapters == "b" and loaded.active_head == "b"
    assert torch.equal(logits(loaded), expected_b)
    loaded.set_active_adapters("a")
    assert loaded.active_head == "a"
    assert torch.equal(logits(loaded), expected_a)


def test_auto_adapter_model_reads_an_init_ed_task_model_checkpoint(tmp_path: Path) -> None:
    """A BertForSequenceClassification with adapters saved by save_pretrained: AutoAdapterModel
    turns its classifier into the head "default" and restores the adapters under the base model."""
    model = classifier_with_adapters()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = AutoAdapterModel.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "BertModel" and loaded.active_head == "default"
    assert list_adapters(loaded) == ["a", "b"] and loaded.active_adapters == "b"
    assert torch.equal(logits(loaded), expected)


def test_trainer_save_model_then_reload(tmp_path: Path) -> None:
    model = flexible_with_adapters()
    model.train_adapter("a")
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    expected = logits(model)
    loaded = AutoAdapterModel.from_pretrained(tmp_path / "final").eval()
    assert loaded.active_adapters == "a" and loaded.active_head == "a"
    assert torch.equal(logits(loaded), expected)
    # the periodic checkpoint of the same run carries the setup too
    assert (tmp_path / "run" / "checkpoint-2" / SETUP_FILE).is_file()


def train_run(out: Path, resume: str | None = None) -> dict[str, torch.Tensor]:
    model = flexible_with_adapters()
    model.train_adapter("a")
    trainer = transformers.Trainer(model=model, args=arguments(out, save_steps=1, save_strategy="steps"),
                                   train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_resume_from_checkpoint_gives_the_same_weights(tmp_path: Path) -> None:
    full = train_run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-1"
    assert (checkpoint / SETUP_FILE).is_file()
    resumed = train_run(tmp_path / "resumed", resume=str(checkpoint))
    assert full.keys() == resumed.keys()
    start = flexible_with_adapters().state_dict()
    changed = [k for k in full if not torch.equal(full[k], start[k])]
    assert changed and all(k.startswith(("fused_adapters.a.", "heads.a.")) for k in changed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # the checkpoint itself reloads with its adapters, heads and active setup
    loaded = AutoAdapterModel.from_pretrained(checkpoint).eval()
    assert loaded.active_adapters == "a" and list(loaded.heads) == ["a", "b"]
