"""Masked-LM and sequence-to-sequence LM heads: logits and losses against float64 truth, the decoder
inputs made from the labels, and parity with AdapterHub's heads of those names (a head added on the
same weights, and a head AdapterHub saved beside its adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter_fused import AutoAdapterModel

from .families import CONFIGS
from .families import VOCAB as SEQ2SEQ_VOCAB
from .models import VOCAB, make_inputs, randomize
from .test_auto import adapterhub_pair, bert_config, copy_head

transformers = pytest.importorskip("transformers")


def seq2seq_config(model_type: str) -> object:
    return transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])


def targets(batch: int = 2, length: int = 4, vocab: int = SEQ2SEQ_VOCAB) -> torch.Tensor:
    labels = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(2))
    labels[0, -1] = -100
    return labels


def test_masked_lm_head_against_float64_truth() -> None:
    torch.manual_seed(0)
    model = AutoAdapterModel.from_config(bert_config(layer_norm_eps=1e-5)).eval()
    model.add_adapter("a", config="seq_bn")
    model.add_masked_lm_head("a")
    randomize(model.heads["a"].parameters(), seed=4, std=0.2)
    model.set_active_adapters("a")
    head = model.heads["a"]
    assert [type(m).__name__ for m in head] == ["Linear", "GELUActivation", "LayerNorm", "Linear"]
    assert head[2].eps == 1e-5 and head[3].bias is not None  # the model's layer_norm_eps, as AdapterHub
    inputs = make_inputs(batch=2)
    labels = targets(length=7, vocab=VOCAB)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        model.active_head = None
        hidden = model(**inputs).last_hidden_state.double()
    p = {k: v.double() for k, v in head.state_dict().items()}
    x = F.gelu(F.linear(hidden, p["0.weight"], p["0.bias"]))
    x = F.layer_norm(x, (x.shape[-1],), p["2.weight"], p["2.bias"], eps=1e-5)
    truth = F.linear(x, p["3.weight"], p["3.bias"])
    assert type(out).__name__ == "MaskedLMOutput" and out.logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(out.logits.double(), truth, rtol=1e-5, atol=1e-5)
    loss = F.cross_entropy(truth.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)  # no shift
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_seq2seq_lm_head_against_float64_truth(model_type: str) -> None:
    torch.manual_seed(0)
    model = AutoAdapterModel.from_config(seq2seq_config(model_type)).eval()
    model.add_adapter("a", config="double_seq_bn")
    randomize([p for n, p in model.named_parameters() if "fused_adapters" in n], std=0.2)
    model.add_seq2seq_lm_head("a")
    randomize(model.heads["a"].parameters(), seed=4, std=0.2)
    model.train_adapter("a")
    model.eval()
    head = model.heads["a"]
    assert len(head) == 1 and head[0].bias is None  # AdapterHub's defaults: one layer, no bias
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = targets()
    config = model.config
    shifted = torch.cat([torch.full((2, 1), config.decoder_start_token_id), labels[:, :-1]], dim=1)
    shifted = shifted.masked_fill(shifted == -100, config.pad_token_id)
    out = model(input_ids=ids, labels=labels)  # the decoder reads the labels shifted right
    with torch.no_grad():
        explicit = model(input_ids=ids, decoder_input_ids=shifted, labels=labels)
        model.active_head = None
        hidden = model(input_ids=ids, decoder_input_ids=shifted).last_hidden_state.double()
    if model_type == "t5":  # tied embeddings: T5 scales the decoder output first
        hidden = hidden * config.d_model ** -0.5
    truth = F.linear(hidden, head[0].weight.double())
    assert type(out).__name__ == "Seq2SeqLMOutput" and out.logits.shape == (2, 4, SEQ2SEQ_VOCAB)
    torch.testing.assert_close(out.logits.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit.logits, out.logits, rtol=0, atol=0)
    loss = F.cross_entropy(truth.reshape(-1, SEQ2SEQ_VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    assert out.encoder_last_hidden_state is not None
    out.loss.backward()  # the adapter and the head train
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert head[0].weight.grad is not None


def test_seq2seq_lm_head_needs_the_decoder_start_token() -> None:
    torch.manual_seed(0)
    config = seq2seq_config("bart")
    config.decoder_start_token_id = None
    model = AutoAdapterModel.from_config(config).eval()
    model.add_seq2seq_lm_head("lm")
    with pytest.raises(ValueError, match="decoder_start_token_id and pad_token_id, which its config lacks"):
        model(input_ids=torch.tensor([[4, 5]]), labels=torch.tensor([[6, 7]]))


def _tie_as_adapterhub(theirs: nn.Module, ours: nn.Module, name: str) -> None:
    """AdapterHub ties the head's output layer to the input embeddings; the copied head changed them."""
    assert theirs.heads[name][len(theirs.heads[name]) - 1].weight is theirs.get_input_embeddings().weight
    ours.get_input_embeddings().weight.data.copy_(theirs.get_input_embeddings().weight.data)


@pytest.mark.adapterhub
def test_masked_lm_head_matches_adapterhub() -> None:
    theirs, ours = adapterhub_pair(bert_config)
    for model in (theirs, ours):
        model.add_masked_lm_head("lm")
    copy_head(theirs, ours, "lm")
    _tie_as_adapterhub(theirs, ours, "lm")
    inputs = make_inputs(batch=2)
    labels = targets(length=7, vocab=VOCAB)
    with torch.no_grad():
        a, b = theirs(**inputs, labels=labels), ours(**inputs, labels=labels)
    assert type(b).__name__ == type(a).__name__ == "MaskedLMOutput"
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.adapterhub
@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_seq2seq_lm_head_matches_adapterhub(model_type: str) -> None:
    """The same logits and loss with the decoder inputs given; with labels alone T5 agrees too, while
    AdapterHub's BART makes the decoder inputs from the input ids (this package, as transformers'
    BartForConditionalGeneration, from the labels)."""
    theirs, ours = adapterhub_pair(lambda: seq2seq_config(model_type))
    for model in (theirs, ours):
        model.add_seq2seq_lm_head("lm")
    copy_head(theirs, ours, "lm")
    _tie_as_adapterhub(theirs, ours, "lm")
    generator = torch.Generator().manual_seed(1)
    ids, decoder_ids = torch.randint(3, 99, (2, 6), generator=generator), torch.randint(3, 99, (2, 4), generator=generator)
    labels = targets()
    calls = [{"decoder_input_ids": decoder_ids}] + ([{}] if model_type == "t5" else [])
    with torch.no_grad():
        for extra in calls:
            a, b = theirs(input_ids=ids, labels=labels, **extra), ours(input_ids=ids, labels=labels, **extra)
            assert type(b).__name__ == type(a).__name__ == "Seq2SeqLMOutput"
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", ["masked_lm", "seq2seq_lm"])
def test_loads_an_adapterhub_lm_head_with_its_adapter(tmp_path: Path, kind: str) -> None:
    """save_adapter of AdapterHub's AutoAdapterModel writes the adapter and its LM head; load_adapter
    here reads both and computes AdapterHub's logits."""
    theirs, ours = adapterhub_pair(bert_config if kind == "masked_lm" else lambda: seq2seq_config("bart"))
    theirs.add_adapter("t", config="seq_bn")
    (theirs.add_masked_lm_head if kind == "masked_lm" else theirs.add_seq2seq_lm_head)("t")
    randomize([p for n, p in theirs.named_parameters() if "adapters.t." in n or n.startswith("heads.t.")],
              seed=8, std=0.1)
    theirs.set_active_adapters("t")
    theirs.save_adapter(str(tmp_path), "t")
    inputs = make_inputs(batch=2)
    if kind == "seq2seq_lm":
        inputs["decoder_input_ids"] = torch.randint(3, 99, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(**inputs).logits
        assert ours.load_adapter(tmp_path, set_active=True) == "t"
        assert ours.active_head == "t" and ours.heads["t"].config["head_type"] == kind
        torch.testing.assert_close(ours(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
