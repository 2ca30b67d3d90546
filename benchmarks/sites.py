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

Each variant runs on ``COPIES`` models of its own, built in turns (one model is built and left out
first: identical models differ in speed by a few per cent, the first ones built most). Each repetition
runs every model, in an order shuffled per repetition, timed in CPU thread time (``time.thread_time_ns``)
on the second of two runs in a row (the first warms the caches the previous model left cold), after three
untimed rounds, with Python's garbage collector off (as ``timeit`` does; it collects between runs, over
what the runs created: the models built before are frozen out of its scans);
denormals are flushed to zero (a stubbed launch
leaves its output uninitialized). A variant that can be switched off on its own model (ours, activated
or not; the eager adapter, swapped in and out; an added adapter, deleted; a block, entered or not, the
hooks it leaves cleared) is timed off and then on in each repetition, and µs per site = median(on − off) / its adapter sites, free of the
speed of one model against another. AdapterHub's variants cannot be switched off (``adapters.init``
stays): theirs is (median − the base model's median at the same batch) / sites. µs per step is the
median over a variant's models and repetitions. Each workload and path runs in a fresh
process without ``TRITON_INTERPRET``; paths: ``plain`` (CPU tensors, the kernels unavailable: our op runs
its plain PyTorch reference) and ``gpu`` (``host_cost.gpu_launch_path``: the kernels reported available,
Triton's launch a stub that only allocates the output; ``launches_per_step`` counts what reached it).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
import json
import logging
import os
import random
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
COPIES = 3
"""Models per variant: the speed of one model instance differs from another's by a few per cent."""
SHORT = {"houlsby": "ours (houlsby) alone", "adapterhub": "AdapterHub alone"}
Toggle = Callable[[bool], None]
"""Switches a variant on or off on its model (off: the model computes as the base model)."""
Setup = Callable[[Any], tuple[int, Toggle | None]]  # model -> (sites, toggle; None: no off state)


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
          held: Callable[[Any], AbstractContextManager[Any]] | None = None, idle: bool = False) -> Setup:
    """Add each (name, placement) with the public API; on: the first active, or ``held(model)`` entered
    (off: none active, the block left); ``active=False``: none active (off clears the hooks a block
    entered per step leaves); ``idle``: on only adds the adapters, off deletes them."""
    def setup(model: Any) -> tuple[int, Toggle]:
        from adapter_fused import adapter_summary, add_adapter, delete_adapter, set_active_adapters

        def add() -> None:
            for name, placement in name_configs:
                add_adapter(model, name, placement)

        add()
        first = name_configs[0][0]
        info = next(a for a in adapter_summary(model).adapters if a.name == first)
        per_site = 2 * HIDDEN * info.bottleneck + info.bottleneck + HIDDEN
        blocks = ExitStack()

        def toggle(on: bool) -> None:
            if held is not None:
                blocks.close()
                if on:
                    blocks.enter_context(held(model))
                else:  # a block's hooks outlive it: setting the active adapters clears them
                    set_active_adapters(model, None)
            elif not idle:
                set_active_adapters(model, first if on else None)
            elif on != bool(getattr(model.base_model, "fused_adapters", None)):
                if on:
                    add()
                else:
                    for name, _ in name_configs:
                        delete_adapter(model, name)

        def clear(on: bool) -> None:  # a block entered per step: off clears the hooks a block leaves
            if not on:
                set_active_adapters(model, None)

        return info.parameters // per_site, toggle if active or idle or held is not None else clear
    return setup


def _per_sample(names: list[str]) -> Callable[[Any], AbstractContextManager[Any]]:
    def block(model: Any) -> AbstractContextManager[Any]:
        from adapter_fused import per_sample_adapters

        return per_sample_adapters(model, names)
    return block


def _eager(workload: str) -> Setup:
    def setup(model: Any) -> tuple[int, Toggle]:
        from .models import bert_adapter_paths, gpt2_adapter_paths, insert_adapters

        layers = model.config.num_hidden_layers
        paths = gpt2_adapter_paths(layers, "transformer.") if workload == "gpt2-decode" else bert_adapter_paths(layers,
                                                                                                               "")
        plain = {path: model.get_submodule(path) for path in paths}
        r = HIDDEN // 16
        insert_adapters(model, paths, lambda: Residual(nn.Sequential(nn.Linear(HIDDEN, r), nn.SiLU(),
                                                                     nn.Linear(r, HIDDEN))), wrap=nn.Sequential)
        adapted = {path: model.get_submodule(path) for path in paths}

        def toggle(on: bool) -> None:
            for path in paths:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, (adapted if on else plain)[path])

        return len(paths), toggle
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
        return info["#param"] // (2 * HIDDEN * r + r + HIDDEN), None  # no off state: AdapterHub's init stays
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
        Variant("idle", "ours, adapter added but not active (the hooks alone)",
                _ours(houlsby, active=False, idle=True), eager=None),
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
    """Build every variant of ``workload`` on ``path`` and time them interleaved (run in a fresh process)."""
    import importlib.util

    from .host_cost import gpu_launch_path

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the stubbed launches leave their outputs uninitialized: no slow denormals
    layers = layers or LAYERS[workload]
    hub = importlib.util.find_spec("adapters") is not None
    chosen = variants(workload, hub)
    times: dict[str, list[int]] = {v.key: [] for v in chosen}
    differences: dict[str, list[int]] = {v.key: [] for v in chosen}
    sites: dict[str, int] = {}
    launches: dict[str, int] = {}
    with ExitStack() as stack:
        stub = stack.enter_context(gpu_launch_path()) if path == "gpu" else None
        stack.enter_context(torch.no_grad())
        _build(workload, layers)  # the first model built runs slower than later ones: it is not measured
        runs = []
        for v in [v for _ in range(COPIES) for v in chosen]:  # each variant on several models, built in turns
            model = _build(workload, layers)
            sites[v.key], toggle = v.setup(model)
            step, reset = _runner(workload, model, v.batch)
            runs.append((v, toggle, step, partial(_in_block, v.per_step, model, step) if v.per_step else step, reset))
        order = random.Random(0)
        stack.callback(gc.enable)
        stack.callback(gc.unfreeze)
        gc.disable()
        gc.collect()
        gc.freeze()  # what exists now is never garbage: the collections below scan only what the runs create
        for rep in range(WARMUP + repeats):
            order.shuffle(runs)  # no variant always follows the same one
            for v, toggle, plain, step, reset in runs:
                # The same model off, then on, each timed on its second run (the first warms the caches the
                # previous model's run left cold): their difference is the variant's.
                if toggle is not None:
                    toggle(False)
                    gc.collect()  # what a switch freed is not collected inside a timed run (timing runs with gc off)
                    _timed(plain, reset)
                    off = _timed(plain, reset)
                    toggle(True)
                    gc.collect()
                _timed(step, reset)
                before = len(stub.launches) if stub else 0
                elapsed = _timed(step, reset)
                launches[v.key] = (len(stub.launches) if stub else 0) - before
                if rep >= WARMUP:
                    times[v.key].append(elapsed)
                    if toggle is not None:
                        differences[v.key].append(elapsed - off)
            if rep >= WARMUP and ((rep - WARMUP + 1) % 10 == 0 or rep == WARMUP + repeats - 1):
                print(f"sites: {workload}, {path} path: {rep - WARMUP + 1}/{repeats} repetitions", file=sys.stderr,
                      flush=True)
    step_us = {key: statistics.median(values) / 1e3 for key, values in times.items()}
    rows: list[dict[str, Any]] = []
    for v in chosen:
        if differences[v.key]:  # paired on the same models
            over = statistics.median(differences[v.key]) / 1e3
        else:  # against the base model's own models
            over = step_us[v.key] - step_us["base_2" if v.batch == 2 else "base"]
        per_site = over / sites[v.key] if sites[v.key] else None
        rows.append({"key": v.key, "label": v.label, "batch": v.batch, "sites": sites[v.key],
                     "step_us": step_us[v.key], "per_site_us": per_site, "paired": bool(differences[v.key]),
                     "launches_per_step": launches[v.key], "eager": v.eager, "compare": v.compare})
    by_key = {row["key"]: row for row in rows}
    for row in rows:
        for field, other in (("vs_eager", row["eager"]), ("vs_compare", row["compare"])):
            theirs = by_key[other]["per_site_us"] if other else None
            row[field] = row["per_site_us"] / theirs if theirs and row["per_site_us"] is not None else None
    return {"workload": workload, "path": path, "layers": layers, "repeats": repeats, "rows": rows}


def _timed(step: Callable[[], Any], reset: Callable[[], Any]) -> int:
    """CPU thread time of ``step()`` in ns (``reset()`` after it, untimed)."""
    start = time.thread_time_ns()
    step()
    elapsed = time.thread_time_ns() - start
    reset()
    return elapsed


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


def block_entry(adapters: int = 8, layers: int = LAYERS["gpt2-decode"], repeats: int = 200) -> dict[str, Any]:
    """CPU thread time of entering and leaving ``per_sample_adapters`` on the ``gpt2-decode`` model with
    ``adapters`` Houlsby adapters on each of its ``layers`` layers, a batch of ``adapters`` rows, no_grad,
    one torch thread (run in a fresh process): the first block (which stacks every adapter's weights), the
    same names again, and new mixes of names (each row one of the adapters or None, drawn at random); µs,
    medians of ``repeats`` entries (the first: one)."""
    from adapter_fused import add_adapter, per_sample_adapters

    torch.set_num_threads(1)
    model = _build("gpt2-decode", layers)
    names = [f"task{i}" for i in range(adapters)]
    for name in names:
        add_adapter(model, name, "houlsby")

    def enter(rows: list[str | None]) -> float:
        start = time.thread_time_ns()
        with per_sample_adapters(model, rows):
            pass
        return (time.thread_time_ns() - start) / 1e3

    draw = random.Random(0)
    with torch.no_grad():
        first = enter(list(names))
        same = statistics.median(enter(list(names)) for _ in range(repeats))
        mixes = statistics.median(enter([draw.choice([*names, None]) for _ in names]) for _ in range(repeats))
    return {"adapters": adapters, "layers": layers, "sites": 2 * layers, "repeats": repeats, "first_us": first,
            "same_names_us": same, "new_mix_us": mixes}


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
