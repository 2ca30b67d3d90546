"""Tiny random task models, a fixed synthetic task and a fixed training loop for the convergence tests.

The task is learnable: every sequence follows one fixed random permutation of the vocabulary
(token t+1 = perm[token t]), so a causal LM can predict each next token, a masked LM each masked
token from its neighbours, and a classifier a label that is a function of the first token. The
batches, masks, labels, dropout masks and initial weights are fixed by seeds, so two runs that
compute the same numbers take the same steps.

The base models use ``initializer_range=0.2``: with transformers' default 0.02 the frozen output
layer of a width-32 model can only produce logits of a few tenths, and no adapter can lower the loss
much below log(vocab) in 32 steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapter_fused.ops
from adapter_fused import AdapterConfig, add_adapter, train_adapter

transformers = pytest.importorskip("transformers")

HIDDEN = 32
LAYERS = 2
VOCAB = 23
INIT = 0.2
MASK_ID = 1  # BERT's [MASK] here; sequences use ids 2..VOCAB-1
BATCH = 2
LENGTH = 8  # BATCH * LENGTH = 16 rows: one program per kernel launch in the interpreter
N_BATCHES = 4
STEPS = 32
LR = 1e-2
REDUCTION_FACTOR = 4  # bottleneck 8
LABELS = 2

ARCHS = ("bert", "gpt2", "llama")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
SITES_PER_LAYER = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}


def bert_config() -> object:
    return transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                   intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=32,
                                   pad_token_id=0, initializer_range=INIT)


def task_model(arch: str, seed: int = 0, hidden: int = HIDDEN) -> Any:
    """A 2-layer float32 model of width ``hidden`` (BERT: 32 only) with its pre-training head (masked
    LM for BERT, causal LM for GPT-2 and Llama); the same seed gives the same weights. Dropout as the
    configs default it (0.1 for BERT and GPT-2, none in Llama)."""
    t = transformers
    torch.manual_seed(seed)
    if arch == "bert":
        return t.BertForMaskedLM(bert_config())
    if arch == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=hidden, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=32,
                                              bos_token_id=0, eos_token_id=0, initializer_range=INIT))
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(
            hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
            eos_token_id=0, pad_token_id=0, initializer_range=INIT))
    raise ValueError(arch)  # pragma: no cover


def adapted_model(arch: str, placement: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``task_model(arch)`` with adapter ``"a"`` (``placement``, bottleneck 8) ready to train alone
    (``train_adapter(..., train_head=False)``: the pre-training head stays frozen), then cast to
    ``dtype``. Every call gives the same weights."""
    model = task_model(arch)
    add_adapter(model, "a", AdapterConfig(placement, reduction_factor=REDUCTION_FACTOR))
    train_adapter(model, "a", train_head=False)
    return model.to(dtype)


def task_kind(arch: str) -> str:
    return "masked" if arch == "bert" else "causal"


def sequences(seed: int, batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    """(batch, length) token ids following the task's permutation from random first tokens."""
    perm = 2 + torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(1234))
    first = torch.randint(2, VOCAB, (batch,), generator=torch.Generator().manual_seed(seed))
    ids = [first]
    for _ in range(length - 1):
        ids.append(perm[ids[-1] - 2])
    return torch.stack(ids, dim=1)


def make_batch(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """One batch of the task for a model of ``kind``: ``"causal"`` (labels = input ids, shifted by the
    model), ``"masked"`` (a quarter of the positions masked, at least one per row; labels -100 at the
    others) or ``"classify"`` (label: parity of the first token)."""
    ids = sequences(seed)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "causal":
        batch["labels"] = ids.clone()
    elif kind == "masked":
        generator = torch.Generator().manual_seed(seed + 10_000)
        mask = torch.rand(ids.shape, generator=generator) < 0.25
        mask[torch.arange(ids.shape[0]), torch.randint(0, ids.shape[1], (ids.shape[0],), generator=generator)] = True
        batch["input_ids"] = ids.masked_fill(mask, MASK_ID)
        batch["labels"] = ids.masked_fill(~mask, -100)
    elif kind == "classify":
        batch["labels"] = ids[:, 0] % LABELS
    else:  # pragma: no cover
        raise ValueError(kind)
    return batch


@dataclass
class Run:
    """What one training run leaves: each step's loss, the trained parameters (float64 copies, by
    name) and the trained model's log-probabilities on a held-out batch (eval mode, float64)."""

    losses: torch.Tensor  # (STEPS,)
    params: dict[str, torch.Tensor]
    logprobs: torch.Tensor


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: float64 copies."""
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model: nn.Module, kind: str, steps: int = STEPS, autocast: torch.dtype | None = None) -> Run:
    """``steps`` AdamW steps (lr ``LR``, weight decay 0.01) on the task's fixed batches,
    cycled, in training mode (dropout on, its masks fixed by a seed), on the parameters that require
    grad; the loss is the model's own (``labels`` in the batch). ``autocast``: run the forward
    passes under ``torch.autocast("cpu", dtype=autocast)`` (the parameters stay in their dtype)."""
    batches = [make_batch(kind, seed) for seed in range(N_BATCHES)]
    held_out = make_batch(kind, seed=N_BATCHES)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=False)
    mixed = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    torch.manual_seed(99)  # dropout masks
    model.train()
    losses = []
    for step in range(steps):
        with mixed:
            loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().double())
    model.eval()
    with torch.no_grad(), mixed:
        logits = model(**{k: v for k, v in held_out.items() if k != "labels"}).logits
    return Run(torch.stack(losses), trainable(model), F.log_softmax(logits.double(), dim=-1))


@contextlib.contextmanager
def reference_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block the library runs its plain-PyTorch reference instead of the Triton kernels
    (the models must be built inside or never have run: a ``FusedAdapter`` keeps its kernel choice)."""
    with monkeypatch.context() as patch:
        patch.setattr(adapter_fused.ops, "kernels_available", lambda device: False)
        yield


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return err / scale if scale > 0 else err


def assert_learns(run: Run, factor: float = 0.85) -> None:
    """The task is learnt: the mean loss of the last four steps (one per batch) is below ``factor``
    times the first step's loss."""
    first, last = run.losses[0].item(), run.losses[-4:].mean().item()
    assert last < factor * first, f"the loss did not go down: {first:.4f} -> {last:.4f} (expected < {factor} x)"


def assert_same_run(actual: Run, expected: Run, rtol: float, params_rtol: float, what: str) -> None:
    """Every step's loss and the log-probabilities agree within ``rtol``, every trained parameter
    tensor within ``params_rtol``, each measured as max |difference| / max |expected| (losses: per
    step)."""
    assert actual.params.keys() == expected.params.keys(), f"{what}: different trained parameters"
    loss_err = ((actual.losses - expected.losses).abs() / expected.losses.abs())
    step = int(loss_err.argmax())
    assert loss_err[step] <= rtol, (f"{what}: step {step} loss {actual.losses[step]:.8f} vs {expected.losses[step]:.8f} "
                                    f"(relative {loss_err[step]:.2e} > {rtol:.0e})")
    for name, value in expected.params.items():
        err = relative(actual.params[name], value)
        assert err <= params_rtol, f"{what}: trained {name} differs by {err:.2e} (relative) > {params_rtol:.0e}"
    err = relative(actual.logprobs, expected.logprobs)
    assert err <= rtol, f"{what}: log-probabilities differ by {err:.2e} (relative) > {rtol:.0e}"


def kernel_calls(names: list[str]) -> dict[str, int]:
    """Launch counts by kernel name."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for the test (autouse where imported): the tiny models' eager ops otherwise
    spend most of their time synchronising threads on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
