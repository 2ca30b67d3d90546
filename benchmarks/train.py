"""``python -m benchmarks --preset train``: one ``transformers.Trainer`` epoch of a small BERT with Houlsby
adapters (``double_seq_bn``, reduction factor 16), three ways, on the same model, data and seed:

- ``adapterhub``: AdapterHub's own adapters (``adapters.init``, ``add_adapter``, ``train_adapter``);
- ``adapterhub_accelerated``: the same, then ``adapter_fused.accelerate(model)``;
- ``ours``: ``adapter_fused.init(model)``, ``add_adapter``, ``train_adapter``.

The model is a ``BertForSequenceClassification`` with random weights from a config; the task a fixed
synthetic one (random tokens; the label says whether the first token falls in the lower half of the
vocabulary). Before the timed epoch each model runs two untimed Trainer steps at learning rate 0, so
that kernel compilation, tuning and the Trainer's first-use costs stay out of it. Reported: tokens per
second over the epoch (every sample is full length, no padding), the epoch's seconds and training loss,
trainable parameters, and peak memory: on a GPU ``torch.cuda.max_memory_allocated`` during the epoch; on
a CPU the growth of the process's resident memory over the epoch, sampled every 5 ms (Linux). CPU runs
use one torch thread (steadier on a shared machine). On a CPU our op runs its plain PyTorch path (the
kernels are unavailable without a GPU), or Triton's interpreter when ``TRITON_INTERPRET=1`` is set (tiny
sizes only); the table says which. A variant whose package is missing is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .models import ModelSpec

VARIANTS = ("adapterhub", "adapterhub_accelerated", "ours")
RECORD_KEYS = ("variant", "model", "path", "samples", "seq", "batch", "epoch_s", "tokens_per_s", "train_loss",
               "trainable_params", "peak_mem_bytes", "peak_mem_kind", "skipped")


@dataclass(frozen=True)
class TrainSpec:
    """The model (BERT sizes, batch and sequence length; its rank is hidden / 16, the default reduction
    factor of ``double_seq_bn``) and the number of samples in the synthetic data set."""

    model: ModelSpec
    samples: int


CPU_SPEC = TrainSpec(ModelSpec("bert-small", hidden=128, layers=4, heads=4, intermediate=512, vocab=2048, batch=16,
                               seq=64, rank=8), samples=1024)
GPU_SPEC = TrainSpec(ModelSpec("bert-base-sized", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522,
                               batch=32, seq=128, rank=48), samples=8192)
TINY_SPEC = TrainSpec(ModelSpec("bert-tiny", hidden=32, layers=2, heads=2, intermediate=64, vocab=128, batch=4, seq=8,
                                rank=2), samples=16)


class SyntheticTask:
    """``samples`` full-length sequences of random tokens, labelled 1 when the first token is in the lower
    half of the vocabulary (a map-style dataset of dicts, as ``Trainer`` takes)."""

    def __init__(self, spec: TrainSpec, seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, spec.model.vocab, (spec.samples, spec.model.seq), generator=gen)
        self.labels = (self.ids[:, 0] < spec.model.vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": self.ids[i].new_ones(self.ids.shape[1]),
                "labels": self.labels[i]}


def installed(package: str) -> bool:
    """Whether ``package`` imports (imported already, or found: some set no ``__spec__``, which
    ``find_spec`` rejects once they are imported)."""
    return sys.modules.get(package) is not None or importlib.util.find_spec(package) is not None


def unavailable(variant: str) -> str | None:
    """Why ``variant`` cannot run here (None when it can)."""
    if not installed("transformers"):
        return "transformers is not installed (pip install -e '.[hf]')"
    if variant.startswith("adapterhub") and not installed("adapters"):
        return "AdapterHub (adapters) is not installed (pip install -e '.[adapterhub]')"
    return None


def build(spec: TrainSpec, variant: str, seed: int = 0) -> Any:
    """The classification model with Houlsby adapter ``"task"`` set up for training by ``variant``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    size = spec.model
    config = BertConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, intermediate_size=size.intermediate,
                        max_position_embeddings=max(512, size.seq))
    config.num_labels = 2
    torch.manual_seed(seed)
    model: Any = BertForSequenceClassification(config)
    if variant == "ours":
        import adapter_fused

        adapter_fused.init(model)
    else:
        import logging

        import adapters

        logging.getLogger("adapters").setLevel(logging.ERROR)  # a spurious "none are activated" on the first call
        adapters.init(model)
    model.add_adapter("task", config="double_seq_bn")
    model.train_adapter("task")
    if variant == "adapterhub_accelerated":
        import adapter_fused

        adapter_fused.accelerate(model)
    return model


class RssPeak:
    """The peak growth of this process's resident memory while the block runs, sampled every 5 ms from
    /proc/self/statm (``growth`` stays None where that file does not exist)."""

    def __init__(self) -> None:
        self.growth: int | None = None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> None:
        self._start = self._rss()
        self._peak = self._start or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._start is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss() or 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._start is not None:
            self._thread.join()
            self._peak = max(self._peak, self._rss() or 0)
            self.growth = self._peak - self._start


def run_variant(spec: TrainSpec, variant: str, device: str, seed: int = 0) -> dict[str, Any]:
    """One epoch of ``variant``; its record (keys ``RECORD_KEYS``)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from adapter_fused.ops import kernels_available

    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(variant=variant, model=spec.model.name, samples=spec.samples, seq=spec.model.seq,
                  batch=spec.model.batch)
    reason = unavailable(variant)
    if reason is not None:
        record["skipped"] = reason
        return record
    cuda = device == "cuda"
    if variant != "adapterhub":
        kernels = kernels_available(torch.device(device))
        record["path"] = ("Triton kernels" if cuda else "Triton interpreter") if kernels else "plain PyTorch"
    else:
        record["path"] = "AdapterHub's own"
    model = build(spec, variant, seed).to(device)
    record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = SyntheticTask(spec, seed)
    with tempfile.TemporaryDirectory() as out:
        def trainer(**options: Any) -> Any:
            arguments = TrainingArguments(
                output_dir=out, num_train_epochs=1, per_device_train_batch_size=spec.model.batch, seed=seed,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, **options)
            return Trainer(model=model, args=arguments, train_dataset=data)

        # Two steps at learning rate 0 (the weights stay as they are): kernel compilation and tuning, and the
        # Trainer's own first-use costs, stay out of the timed epoch.
        trainer(learning_rate=0.0, max_steps=2).train()
        timed = trainer(learning_rate=1e-3)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss = RssPeak()
        with rss:
            start = time.perf_counter()
            output = timed.train()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    record.update(epoch_s=seconds, tokens_per_s=spec.samples * spec.model.seq / seconds,
                  train_loss=output.training_loss)
    if cuda:
        record.update(peak_mem_bytes=torch.cuda.max_memory_allocated(), peak_mem_kind="cuda max_memory_allocated")
    elif rss.growth is not None:
        record.update(peak_mem_bytes=rss.growth, peak_mem_kind="CPU resident memory growth (sampled)")
    return record


def markdown(records: list[dict[str, Any]], spec: TrainSpec, head: str) -> str:
    """The results as a markdown table, with each variant's tokens/s against AdapterHub's."""
    from .report import md_table

    hub = next((r["tokens_per_s"] for r in records if r["variant"] == "adapterhub" and r["tokens_per_s"]), None)
    rows = []
    for r in records:
        if r["skipped"]:
            rows.append((r["variant"], "skipped: " + r["skipped"], "", "", "", "", "", ""))
            continue
        ratio = f"{r['tokens_per_s'] / hub:.2f}×" if hub else ""
        memory = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "not measured"
        rows.append((r["variant"], r["path"], f"{r['epoch_s']:.1f}", f"{r['tokens_per_s']:.0f}", ratio, memory,
                     f"{r['trainable_params']:,}", f"{r['train_loss']:.4f}"))
    m = spec.model
    size = f"{m.name}: {m.layers} layers, d {m.hidden}, r {m.rank}; {spec.samples} samples × {m.seq} tokens, batch " \
        f"{m.batch}, one epoch"
    return f"{head}\n{size}\n\n" + md_table(
        ("variant", "our op runs", "epoch s", "tokens/s", "vs AdapterHub", "peak MiB", "trainable", "loss"), rows)


def main(device: str, tiny: bool, out: Path | None, command: str, seed: int = 0) -> int:
    """Run every variant, print the table, write the results file into ``out``; exit status 1 when a
    variant that could run failed."""
    import torch

    from . import harness, report

    spec = TINY_SPEC if tiny else GPU_SPEC if device == "cuda" else CPU_SPEC
    if device == "cpu":
        torch.set_num_threads(1)
    when = datetime.now(timezone.utc)
    label = torch.cuda.get_device_name() if device == "cuda" else (
        f"CPU ({harness.cpu_model()}, {torch.get_num_threads()} torch thread); CPU timings, not comparable with GPU "
        "figures")
    records, failed = [], []
    for variant in VARIANTS:
        print(f"train: {variant} ({spec.model.name}, {spec.samples} samples) ...", flush=True)
        try:
            records.append(run_variant(spec, variant, device, seed))
        except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
            failed.append(variant)
            records.append({**dict.fromkeys(RECORD_KEYS), "variant": variant, "model": spec.model.name,
                            "skipped": f"failed: {harness._short(exc)}"})
    versions = {name: _version(name) for name in ("transformers", "adapters")}
    head = (f"{label} · {when:%Y-%m-%d %H:%M} UTC · torch {torch.__version__} · transformers "
            f"{versions['transformers']} · adapters {versions['adapters']} · `{command}`")
    print(markdown(records, spec, head), flush=True)
    if out is not None:
        result: dict[str, Any] = {"device": label, **harness.versions(), "date": when.isoformat(timespec="seconds"),
                  "command": command, "copy_bw_gbps": None, "records": [], "models": [], "grouped": [],
                  "host_cost": None, "train": {"spec": asdict(spec), "versions": versions, "records": records}}
        print(f"wrote {report.write_json(out / f'{report.file_stem(label, when)}.json', result)}")
    return int(bool(failed))


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

