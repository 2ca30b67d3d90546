"""Model-level benchmarks: whole transformers built from configs with random weights (no downloads),
with bottleneck adapters inserted by a small local helper.

- BERT-base, Houlsby placement (two adapters per layer: after the attention-output and the FFN-output
  dense layers), one training step (forward, backward, AdamW step on the adapters; base frozen):
  tokens/s and peak memory for ``fused``, ``eager`` and ``adapterhub`` (the ``adapters`` library's
  own Houlsby set-up, ``DoubleSeqBnConfig``).
- GPT-2 medium, batch 1, one inference forward of the transformer body (no LM head): latency of
  the ``base`` model, with ``eager`` Houlsby adapters and with ``fused`` adapters.
- A Llama-style decoder of GPT-2 medium's size, one decode step (one new token) over a static KV cache:
  the base model and the model with this library's Houlsby adapters (``adapter_fused.add_adapter``), each
  eager and compiled whole (``torch.compile(fullgraph=True)``: on CUDA with the ``cudagraphs`` backend, so
  the step replays as one CUDA graph; on the CPU with the ``eager`` backend, which checks the tracing only),
  and a batch of two rows with two adapters (``per_sample_adapters``), compiled.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .harness import Skip, TimingSettings, make_adapter, measure, peak_memory, provider_unavailable

BERT_PROVIDERS: tuple[str, ...] = ("fused", "eager", "adapterhub")
GPT2_PROVIDERS: tuple[str, ...] = ("base", "eager", "fused")
MODEL_ACTIVATION = "silu"  # AdapterHub's Houlsby default ("swish")


@dataclass(frozen=True)
class ModelSpec:
    """A transformer size and the batch it is measured with; ``rank`` is the adapter bottleneck."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    rank: int


BERT_BASE = ModelSpec("bert-base", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522,
                      batch=32, seq=128, rank=64)
GPT2_MEDIUM = ModelSpec("gpt2-medium", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=50257,
                        batch=1, seq=128, rank=64)
BERT_SMOKE = ModelSpec("bert-tiny-smoke", hidden=64, layers=2, heads=2, intermediate=128, vocab=512,
                       batch=2, seq=16, rank=16)
GPT2_SMOKE = ModelSpec("gpt2-tiny-smoke", hidden=64, layers=2, heads=2, intermediate=256, vocab=512,
                       batch=1, seq=16, rank=16)
DECODER = ModelSpec("llama-1024x24-decode", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=32000,
                    batch=1, seq=128, rank=64)
"""``seq``: the tokens in the KV cache before the timed step."""
DECODER_SMOKE = ModelSpec("llama-tiny-decode-smoke", hidden=64, layers=2, heads=2, intermediate=128, vocab=512,
                          batch=1, seq=16, rank=16)
DECODE_PROVIDERS: tuple[str, ...] = ("base", "base compiled", "fused", "fused compiled", "fused per-row compiled")


class WithAdapter(nn.Module):
    """``adapter(base(x))``: a layer followed by a bottleneck adapter (the Houlsby insertion point)."""

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x -> adapter(base(x))."""
        return self.adapter(self.base(x))


def insert_adapters(model: nn.Module, paths: Sequence[str], factory: Callable[[], nn.Module],
                    wrap: Callable[[nn.Module, nn.Module], nn.Module] = WithAdapter) -> list[nn.Module]:
    """Replace each submodule named in ``paths`` (dotted names) by ``wrap(layer, factory())`` (by
    default ``WithAdapter``; ``nn.Sequential`` gives the same order of calls); returns the adapters in
    order."""
    adapters: list[nn.Module] = []
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = factory()
        setattr(parent, child, wrap(getattr(parent, child), adapter))
        adapters.append(adapter)
    return adapters


def bert_adapter_paths(layers: int, prefix: str = "bert.") -> list[str]:
    """Attention-output and FFN-output dense layers of every BERT layer."""
    return [f"{prefix}encoder.layer.{i}.{part}.dense" for i in range(layers) for part in ("attention.output", "output")]


def gpt2_adapter_paths(layers: int, prefix: str = "") -> list[str]:
    """Attention-output and FFN-output projections of every GPT-2 block."""
    return [f"{prefix}h.{i}.{part}.c_proj" for i in range(layers) for part in ("attn", "mlp")]


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def build_bert(spec: ModelSpec, provider: str, seed: int = 0) -> nn.Module:
    """BertForSequenceClassification of ``spec`` with random weights and Houlsby adapters of
    ``provider``; only the adapters train."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate, num_labels=2)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    if provider == "adapterhub":
        import adapters
        from adapters import DoubleSeqBnConfig

        # adapters warns on the first forward that "none are activated" although train_adapter activated
        # the set (the blocks do run: the harness tests count their calls); keep the output readable
        logging.getLogger("adapters").setLevel(logging.ERROR)
        adapters.init(model)
        hub_config = DoubleSeqBnConfig(reduction_factor=spec.hidden / spec.rank, non_linearity=MODEL_ACTIVATION,
                                       init_weights="bert")
        model.add_adapter("houlsby", config=hub_config)
        model.train_adapter("houlsby")
        return model
    _freeze(model)
    for p in model.classifier.parameters():  # AdapterHub's train_adapter leaves the task head trainable too
        p.requires_grad_(True)
    insert_adapters(model, bert_adapter_paths(spec.layers),
                    lambda: make_adapter(provider, spec.hidden, spec.rank, MODEL_ACTIVATION))
    return model


def build_gpt2(spec: ModelSpec, provider: str, seed: int = 0) -> nn.Module:
    """GPT2Model of ``spec`` with random weights; with Houlsby adapters unless ``provider`` is base."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=spec.vocab, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                        n_inner=spec.intermediate, n_positions=max(1024, spec.seq))
    torch.manual_seed(seed)
    model = GPT2Model(config)
    if provider != "base":
        insert_adapters(model, gpt2_adapter_paths(spec.layers),
                        lambda: make_adapter(provider, spec.hidden, spec.rank, MODEL_ACTIVATION))
    _freeze(model)
    return model


def _model_record(spec: ModelSpec, task: str, provider: str, dtype: str, adapters_per_layer: int,
                  timing: Any, peak: int | None, trainable: int | None, reason: str | None) -> dict[str, Any]:
    tokens = spec.batch * spec.seq
    return {
        "model": spec.name, "task": task, "provider": provider, "batch": spec.batch, "seq": spec.seq,
        "hidden": spec.hidden, "layers": spec.layers, "r": spec.rank if adapters_per_layer else None,
        "adapters_per_layer": adapters_per_layer, "activation": MODEL_ACTIVATION if adapters_per_layer else None,
        "dtype": dtype,
        "ms_median": timing.median if timing else None,
        "ms_p20": timing.p20 if timing else None,
        "ms_p80": timing.p80 if timing else None,
        "tokens_per_s": tokens / (timing.median * 1e-3) if timing else None,
        "peak_mem_bytes": peak, "trainable_params": trainable, "skipped": reason,
    }


def _model_timing(settings: TimingSettings, device: torch.device) -> TimingSettings:
    """Whole-model steps are long: give do_bench a longer budget on CUDA."""
    if device.type == "cuda":
        return replace(settings, rep_ms=max(settings.rep_ms, 1000.0), warmup_ms=max(settings.warmup_ms, 200.0))
    return settings


def _reason(provider: str, device: torch.device) -> str | None:
    if provider in ("fused", "adapterhub"):
        return provider_unavailable(provider, device)
    return None


def bench_bert_training(spec: ModelSpec, providers: Sequence[str], device: torch.device,
                        settings: TimingSettings, skips: list[Skip] | None = None,
                        seed: int = 0) -> list[dict[str, Any]]:
    """One training step per provider (bf16 autocast on CUDA, fp32 on CPU): tokens/s, peak memory."""
    skips = skips if skips is not None else []
    autocast = device.type == "cuda"
    dtype = "bfloat16 autocast" if autocast else "float32"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (spec.batch,), generator=gen).to(device)
    records = []
    for provider in providers:
        reason = _reason(provider, device)
        timing = peak = trainable = None
        if reason is None:
            try:
                model = build_bert(spec, provider, seed).to(device).train()
                params = [p for p in model.parameters() if p.requires_grad]
                trainable = sum(p.numel() for p in params)
                optimizer = torch.optim.AdamW(params, lr=1e-4)

                def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    optimizer.step()

                timing = measure(step, [], device, _model_timing(settings, device))
                peak = peak_memory(step, [], device, absolute=True)
                del model, optimizer
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                timing = peak = None
        if reason is not None:
            skips.append(Skip(provider, "train_step", spec.name, reason))
        records.append(_model_record(spec, "train_step", provider, dtype, 2, timing, peak, trainable, reason))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def bench_gpt2_latency(spec: ModelSpec, providers: Sequence[str], device: torch.device,
                       settings: TimingSettings, skips: list[Skip] | None = None,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Inference latency of one forward (bf16 on CUDA, fp32 on CPU), per provider."""
    skips = skips if skips is not None else []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    records = []
    for provider in providers:
        reason = _reason(provider, device)
        timing = peak = None
        if reason is None:
            try:
                model = build_gpt2(spec, provider, seed).to(device=device, dtype=dtype).eval()

                def forward(model: nn.Module = model) -> None:
                    with torch.inference_mode():
                        model(input_ids=ids)

                timing = measure(forward, [], device, _model_timing(settings, device))
                peak = peak_memory(forward, [], device, absolute=True)
                del model
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                timing = peak = None
        if reason is not None:
            skips.append(Skip(provider, "inference", spec.name, reason))
        per_layer = 0 if provider == "base" else 2
        records.append(_model_record(spec, "inference", provider, str(dtype).removeprefix("torch."), per_layer,
                                     timing, peak, None, reason))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def bench_decode(spec: ModelSpec, device: torch.device, settings: TimingSettings, skips: list[Skip] | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """One decode step over a static KV cache of ``spec.seq`` tokens (bf16 on CUDA, fp32 on CPU), per
    provider of ``DECODE_PROVIDERS``; the cache position is the same at every repetition."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from adapter_fused import AdapterConfig, add_adapter, per_sample_adapters, set_active_adapters

    skips = skips if skips is not None else []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "cudagraphs" if device.type == "cuda" else "eager"
    config = LlamaConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, intermediate_size=spec.intermediate, vocab_size=spec.vocab,
                         max_position_embeddings=spec.seq + 8)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    adapter = AdapterConfig("houlsby", bottleneck=spec.rank, activation=MODEL_ACTIVATION)
    records = []
    for provider in DECODE_PROVIDERS:
        reason = _reason("fused", device) if "fused" in provider else None
        timing = None
        rows = 2 if "per-row" in provider else spec.batch
        if reason is None:
            try:
                if "fused" in provider and "a" not in getattr(model.model, "fused_adapters", {}):
                    add_adapter(model, "a", adapter)
                    add_adapter(model, "b", adapter)
                set_active_adapters(model, "a" if provider in ("fused", "fused compiled") else None)
                cache = StaticCache(config=config, max_cache_len=spec.seq + 8)
                ids = torch.randint(0, spec.vocab, (rows, spec.seq + 1), generator=torch.Generator().manual_seed(seed))
                prompt, token = ids[:, :-1].to(device), ids[:, -1:].to(device)
                position = torch.tensor([spec.seq], device=device)

                def step(model: nn.Module = model, token: torch.Tensor = token, cache: Any = cache,
                         position: torch.Tensor = position) -> Any:
                    # the step writes the same position every time: transformers >= 5.25 keeps a per-layer
                    # write counter that ignores cache_position, so it is wound back first
                    for layer in getattr(cache, "layers", ()):
                        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                            layer.cumulative_length.fill_(spec.seq)
                    return model(input_ids=token, cache_position=position, use_cache=True,
                                 past_key_values=cache).logits

                run = torch.compile(step, fullgraph=True, backend=backend) if "compiled" in provider else step
                with torch.inference_mode(), warnings.catch_warnings(), \
                        (per_sample_adapters(model, ["a", "b"]) if rows == 2 else nullcontext()):
                    warnings.simplefilter("ignore", FutureWarning)
                    model(input_ids=prompt, cache_position=torch.arange(spec.seq, device=device), use_cache=True,
                          past_key_values=cache)
                    run()  # compile (and capture) before timing
                    timing = measure(run, [], device, _model_timing(settings, device))
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                timing = None
        if reason is not None:
            skips.append(Skip(provider, "decode", spec.name, reason))
        record = _model_record(replace(spec, batch=rows, seq=1), "decode", provider, str(dtype).removeprefix("torch."),
                               0 if provider.startswith("base") else 2, timing, None, None, reason)
        records.append({**record, "cache_tokens": spec.seq, "compile_backend": backend})
    set_active_adapters(model, None)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records
