"""Host cost per adapter site inside a model: ``python -m benchmarks.host_cost --sites``.

Two workloads, random weights from configs, no_grad, one torch thread:

- ``gpt2-decode``: a GPT-2 of 24 layers, d 64 (4 heads, vocabulary 1024), one decode step (one new
  token per sequence) over a 32-token KV cache; the cache is cut back to 32 tokens after each step,
  outside the timed region.
- ``bert-forward``: a BERT of 12 layers, d 64 (4 heads, FFN 256), one forward of 8 tokens.

Variants, each on its own copy of the model (same weights): the base model; a hand-written eager adapter
(Linear-SiLU-Linear plus the residual, in an ``nn.Sequential`` after each Houlsby site's module); ours,
built with the public API only, ``add_adapter(model, "a", P)`` for P in houlsby, pfeiffer, parallel
(r = d / 16 = 4); ours inside ``per_sample_adapters(model, ["a"])`` with the block held across steps and
entered every step; two adapters, one per row (``["a", "b"]``, batch 2, against the base and the eager
adapter at batch 2); an added adapter that is not active (the hooks alone); and, when ``adapters`` is
installed, AdapterHub's ``double_seq_bn`` and the same accelerated by ``adapter_fused.accelerate``.

Each repetition runs one step of every variant in turn (round-robin) and times it in CPU thread time
(``time.thread_time_ns``); a variant's figure is the median over the repetitions, after three untimed
rounds; denormals are flushed to zero (a stubbed launch leaves its output uninitialized). µs per site =
(variant − base at the same batch) / the variant's adapter sites. Each workload and path runs in a fresh
process without ``TRITON_INTERPRET``; paths: ``plain`` (CPU tensors, the kernels unavailable: our op runs
its plain PyTorch reference) and ``gpu`` (``host_cost.gpu_launch_path``: the kernels reported available,
Triton's launch a stub that only allocates the output; ``launches_per_step`` counts what reached it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

import torch
from torch import nn

WORKLOADS = ("gpt2-decode", "bert-forward")
PATHS = {"plain": "CPU tensors, plain PyTorch (no interpreter: our op runs its PyTorch reference)",
         "gpu": "the GPU launch path on the CPU (kernels reported available, Triton's launch a stub that only "
                "allocates the output)"}
HIDDEN, HEADS, VOCAB, CACHE, BERT_TOKENS = 64, 4, 1024, 32, 8
LAYERS = {"gpt2-decode": 24, "bert-forward": 12}
WARMUP = 3
SHORT = {"houlsby": "ours (houlsby) alone", "adapterhub": "AdapterHub alone"}
Setup = Callable[[Any], tuple[int, AbstractContextManager[Any] | None]]  # model -> (sites, block held across steps)


@dataclass(frozen=True)
class Variant:
    """One row: how the model is changed (``setup``), the batch, a block entered around every step,
    and what its per-site cost is compared with (the eager adapter, and ``compare`` when given)."""

    key: str
    label: str
    setup: Setup
    batch: int = 1
    per_step: Callable[[Any], AbstractContextManager[Any]] | None = None
    eager: str | None = "eager"
    compare: str | None = None


class Residual(nn.Module):
    """``x + body(x)``: the residual of a hand-written adapter."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d)."""
        return x + self.body(x)


def _ours(name_configs: tuple[tuple[str, str], ...], active: bool = True,
          held: Callable[[Any], AbstractContextManager[Any]] | None = None) -> Setup:
    """Add each (name, placement) with the public API; activate the first, or hold ``held(model)``."""
    def setup(model: Any) -> tuple[int, AbstractContextManager[Any] | None]:
        from adapter_fused import adapter_summary, add_adapter, set_active_adapters

        for name, placement in name_configs:
            add_adapter(model, name, placement)
        first = name_configs[0][0]
        if active and held is None:
            set_active_adapters(model, first)
        info = next(a for a in adapter_summary(model).adapters if a.name == first)
        per_site = 2 * HIDDEN * info.bottleneck + info.bottleneck + HIDDEN
        return info.parameters // per_site, held(model) if held else None
    return setup


def _per_sample(names: list[str]) -> Callable[[Any], AbstractContextManager[Any]]:
    def block(model: Any) -> AbstractContextManager[Any]:
        from adapter_fused import per_sample_adapters

        return per_sample_adapters(model, names)
    return block


def _eager(workload: str) -> Setup:
    def setup(model: Any) -> tuple[int, None]:
        from .models import bert_adapter_paths, gpt2_adapter_paths, insert_adapters

        layers = model.config.num_hidden_layers
        paths = gpt2_adapter_paths(layers, "transformer.") if workload == "gpt2-decode" else bert_adapter_paths(layers,
                                                                                                               "")
        r = HIDDEN // 16
        insert_adapters(model, paths, lambda: Residual(nn.Sequential(nn.Linear(HIDDEN, r), nn.SiLU(),
                                                                     nn.Linear(r, HIDDEN))), wrap=nn.Sequential)
        return len(paths), None
    return setup


def _adapterhub(accelerated: bool) -> Setup:
    def setup(model: Any) -> tuple[int, None]:
        import adapters

        from adapter_fused import accelerate

        logging.getLogger("adapters").setLevel(logging.ERROR)  # a spurious "none are activated" on the first call
        adapters.init(model)
        model.add_adapter("a", config="double_seq_bn")
        model.set_active_adapters("a")
        if accelerated:
            accelerate(model)
        (info,) = [row for row in model.adapter_summary(as_dict=True) if row["name"] == "a"]
        r = HIDDEN // 16
        return info["#param"] // (2 * HIDDEN * r + r + HIDDEN), None
    return setup


def variants(workload: str, adapterhub: bool) -> list[Variant]:
    """The rows of one workload's table, in order (AdapterHub's only when ``adapterhub``)."""
    houlsby = (("a", "houlsby"),)
    rows = [
        Variant("base", "base model", lambda model: (0, None), eager=None),
        Variant("eager", "hand-written eager adapter (Linear-SiLU-Linear + residual, nn.Sequential)",
                _eager(workload)),
        Variant("houlsby", 'ours, add_adapter(model, "a", "houlsby")', _ours(houlsby)),
        Variant("pfeiffer", 'ours, "pfeiffer"', _ours((("a", "pfeiffer"),))),
        Variant("parallel", 'ours, "parallel"', _ours((("a", "parallel"),))),
        Variant("per_sample_held", 'ours (houlsby) in per_sample_adapters(model, ["a"]), block held across steps',
                _ours(houlsby, held=_per_sample(["a"])), compare="houlsby"),
        Variant("per_sample_entered", 'the same, block entered every step', _ours(houlsby, active=False),
                per_step=_per_sample(["a"]), compare="houlsby"),
        Variant("idle", "ours, adapter added but not active (the hooks alone)", _ours(houlsby, active=False),
                eager=None),
        Variant("base_2", "base model, batch 2", lambda model: (0, None), batch=2, eager=None),
        Variant("eager_2", "hand-written eager adapter, batch 2", _eager(workload), batch=2, eager=None),
        Variant("per_sample_2", 'ours in per_sample_adapters(model, ["a", "b"]), one per row, batch 2, held',
                _ours((("a", "houlsby"), ("b", "houlsby")), held=_per_sample(["a", "b"])), batch=2,
                eager="eager_2"),
    ]
    if adapterhub:
        rows += [Variant("adapterhub", "AdapterHub, double_seq_bn", _adapterhub(False)),
                 Variant("adapterhub_accelerated", "AdapterHub + adapter_fused.accelerate", _adapterhub(True),
                         compare="adapterhub")]
    return rows


def _build(workload: str, layers: int) -> Any:
    torch.manual_seed(0)
    if workload == "gpt2-decode":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=HEADS, vocab_size=VOCAB,
                                          bos_token_id=0, eos_token_id=0)).eval()
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                intermediate_size=4 * HIDDEN, vocab_size=VOCAB)).eval()


def _runner(workload: str, model: Any, batch: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(one timed step, the untimed reset after it)."""
    gen = torch.Generator().manual_seed(1)
    if workload == "bert-forward":
        ids = torch.randint(0, VOCAB, (batch, BERT_TOKENS), generator=gen)
        return lambda: model(input_ids=ids), lambda: None
    prompt = torch.randint(0, VOCAB, (batch, CACHE), generator=gen)
    token = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    cache = out[keyword] if keyword in out else out["past_key_values"]
    return lambda: model(input_ids=token, use_cache=True, **{keyword: cache}), lambda: cache.crop(-1)


def _measure_here(workload: str, path: str, repeats: int, layers: int | None = None) -> dict[str, Any]:
    """Build every variant of ``workload`` on ``path`` and time them round-robin (run in a fresh process)."""
    import importlib.util

    from .host_cost import gpu_launch_path

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the stubbed launches leave their outputs uninitialized: no slow denormals
    layers = layers or LAYERS[workload]
    hub = importlib.util.find_spec("adapters") is not None
    chosen = variants(workload, hub)
    times: dict[str, list[int]] = {v.key: [] for v in chosen}
    sites: dict[str, int] = {}
    launches: dict[str, int] = {}
    with ExitStack() as stack:
        stub = stack.enter_context(gpu_launch_path()) if path == "gpu" else None
        stack.enter_context(torch.no_grad())
        steps = []
        for v in chosen:
            model = _build(workload, layers)
            sites[v.key], held = v.setup(model)
            if held is not None:
                stack.enter_context(held)
            step, reset = _runner(workload, model, v.batch)
            if v.per_step is not None:
                step = partial(_in_block, v.per_step, model, step)
            steps.append((v.key, step, reset))
        for rep in range(WARMUP + repeats):
            for key, step, reset in steps:
                before = len(stub.launches) if stub else 0
                start = time.thread_time_ns()
                step()
                elapsed = time.thread_time_ns() - start
                launches[key] = (len(stub.launches) if stub else 0) - before
                reset()
                if rep >= WARMUP:
                    times[key].append(elapsed)
            if rep >= WARMUP and ((rep - WARMUP + 1) % 10 == 0 or rep == WARMUP + repeats - 1):
                print(f"sites: {workload}, {path} path: {rep - WARMUP + 1}/{repeats} repetitions", file=sys.stderr,
                      flush=True)
    step_us = {key: statistics.median(values) / 1e3 for key, values in times.items()}
    rows: list[dict[str, Any]] = []
    for v in chosen:
        base = step_us["base_2" if v.batch == 2 else "base"]
        per_site = (step_us[v.key] - base) / sites[v.key] if sites[v.key] else None
        rows.append({"key": v.key, "label": v.label, "batch": v.batch, "sites": sites[v.key],
                     "step_us": step_us[v.key], "per_site_us": per_site,
                     "launches_per_step": launches[v.key], "eager": v.eager, "compare": v.compare})
    by_key = {row["key"]: row for row in rows}
    for row in rows:
        for field, other in (("vs_eager", row["eager"]), ("vs_compare", row["compare"])):
            theirs = by_key[other]["per_site_us"] if other else None
            row[field] = row["per_site_us"] / theirs if theirs and row["per_site_us"] is not None else None
    return {"workload": workload, "path": path, "layers": layers, "repeats": repeats, "rows": rows}


def _in_block(block: Callable[[Any], AbstractContextManager[Any]], model: Any, step: Callable[[], Any]) -> Any:
    """``step()`` inside ``block(model)``, entered and left in the timed region."""
    with block(model):
        return step()


def describe(workload: str, layers: int) -> str:
    """One line saying what a workload runs."""
    if workload == "gpt2-decode":
        return (f"GPT-2, {layers} layers, d {HIDDEN}, r {HIDDEN // 16}: one decode step (one new token) over a "
                f"{CACHE}-token KV cache, no_grad")
    return f"BERT, {layers} layers, d {HIDDEN}, r {HIDDEN // 16}: one forward of 1 × {BERT_TOKENS} tokens, no_grad"


def markdown(result: dict[str, Any]) -> str:
    """One workload and path as a markdown table."""
    from .report import md_table

    table = []
    for row in result["rows"]:
        note = f"{row['vs_compare']:.2f}× {SHORT[row['compare']]}" if row["vs_compare"] is not None else ""
        table.append((row["label"], row["batch"], row["sites"] or "", f"{row['step_us']:.0f}",
                      f"{row['per_site_us']:.1f}" if row["per_site_us"] is not None else "",
                      f"{row['vs_eager']:.2f}×" if row["vs_eager"] is not None else "", note))
    head = f"**{describe(result['workload'], result['layers'])}** — {PATHS[result['path']]}\n\n"
    return head + md_table(("variant", "batch", "sites", "µs per step", "µs per site over base",
                            "vs hand-written eager", "note"), table)


def header(command: str, repeats: int) -> str:
    """Where and how the figures were measured."""
    from .harness import cpu_model

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return (f"Host cost per adapter site — {cpu_model()} ({os.cpu_count()} cores, load average {load} at the start), "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, transformers "
            f"{version('transformers')}, triton {version('triton')}, adapters {version('adapters')}; one torch "
            f"thread, CPU thread time, variants interleaved, median of {repeats} repetitions; `{command}`")


def main(args: argparse.Namespace, command: str) -> int:
    """Measure the chosen workloads on the chosen paths, each in a fresh process; print markdown."""
    from .host_cost import in_fresh_process

    workloads = [w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS] + [p for p in paths if p not in PATHS]
    if unknown or args.repeats < 1:
        sys.exit(f"python -m benchmarks.host_cost --sites: unknown {', '.join(unknown) or 'repeats'}; workloads: "
                 f"{', '.join(WORKLOADS)}; paths: {', '.join(PATHS)}; --repeats at least 1")
    print(header(command, args.repeats) + "\n", flush=True)
    results = []
    for workload in workloads:
        for path in paths:
            call = f"benchmarks.sites._measure_here({workload!r}, {path!r}, {args.repeats}, {args.layers!r})"
            results.append(in_fresh_process(call))
            print(markdown(results[-1]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"command": command, "results": results}, fh, indent=1)
    return 0
