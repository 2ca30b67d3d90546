"""Train a fused adapter and its prediction head with transformers.Trainer, AdapterHub style; save
the checkpoint and the adapter, and reload both.

A small BERT is built from a config (no downloads) and saved as the "pretrained" base model. The
synthetic task: classify a random token sequence by whether its first token comes from the upper
half of the vocabulary (the classification head reads the first position). Only the adapter and
the head train; the base model stays frozen.

    python examples/train_adapter.py --steps 200 --output-dir /tmp/adapter-demo
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, Trainer, TrainingArguments

from adapter_fused import AdapterConfig, AutoAdapterModel

VOCAB = 128


def synthetic_dataset(size: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Examples {input_ids (length,), attention_mask (length,), labels ()}; label 1 when the first
    token is >= VOCAB // 2."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (size, length), generator=generator)
    labels = (ids[:, 0] >= VOCAB // 2).long()
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the whole flow; returns the training loss, the eval accuracy and the largest logit
    differences between the trained model and the reloaded adapter and checkpoint (0.0 when they
    agree)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--config", default="houlsby", help="houlsby, pfeiffer, double_seq_bn or seq_bn")
    parser.add_argument("--reduction-factor", type=float, default=4)
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="adapter-demo-"))

    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(out / "base")  # the "pretrained" model

    model = AutoAdapterModel.from_pretrained(out / "base")
    model.add_adapter("task", config=AdapterConfig(args.config, reduction_factor=args.reduction_factor))
    model.add_classification_head("task", num_labels=2)
    model.train_adapter("task")  # freezes the base model; the adapter and its head "task" train
    print(model.adapter_summary())

    train, test = synthetic_dataset(args.train_size, 16, args.seed + 1), synthetic_dataset(args.test_size, 16, args.seed + 2)
    training = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=1e-2, warmup_steps=0,
                                 logging_steps=max(1, args.steps // 5), save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=args.seed)
    trainer = Trainer(model=model, args=training, train_dataset=train)
    result = trainer.train()
    trainer.save_model(str(out / "checkpoint"))  # weights + adapter setup (configs, heads, active adapter)
    model.save_adapter(out / "adapter", "task")  # the adapter and its head alone

    model.eval()
    batch = {k: torch.stack([example[k] for example in test]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([example["labels"] for example in test])
    with torch.no_grad():
        logits = model(**batch).logits
    accuracy = (logits.argmax(-1) == labels).float().mean().item()

    # 1. the whole checkpoint: adapters, heads and the active setup come back with the weights
    restored = AutoAdapterModel.from_pretrained(out / "checkpoint").eval()
    # 2. the adapter and its head loaded into the pretrained base model
    fresh = AutoAdapterModel.from_pretrained(out / "base").eval()
    fresh.load_adapter(out / "adapter", set_active=True)
    with torch.no_grad():
        checkpoint_difference = (restored(**batch).logits - logits).abs().max().item()
        difference = (fresh(**batch).logits - logits).abs().max().item()
    print(f"train loss {result.training_loss:.4f}  test accuracy {accuracy:.3f}  reloaded logits max |diff|: "
          f"checkpoint {checkpoint_difference:.3g}, adapter {difference:.3g}  files in {out}")
    return {"training_loss": result.training_loss, "accuracy": accuracy, "logit_difference": difference,
            "checkpoint_logit_difference": checkpoint_difference}


if __name__ == "__main__":
    main()
