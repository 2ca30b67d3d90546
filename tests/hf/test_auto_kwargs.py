"""Keyword arguments of ``AutoAdapterModel.from_pretrained`` and ``from_config`` work as in transformers'
``AutoModel``: config attributes (``hidden_dropout_prob=0.0``) update the config, model options
(``dtype``, ``attn_implementation``) reach the model, ``output_loading_info`` returns the loading report,
and the model computes what ``AutoModel`` loaded the same way computes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter_fused import AutoAdapterModel

from .models import HIDDEN, LAYERS, VOCAB, make_inputs, randomize

transformers = pytest.importorskip("transformers")

DROPOUT_OFF = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}


def config(arch: str) -> Any:
    if arch == "bert":
        return transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                       intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT and GPT-2 base model (dropout 0.1) and a BertForSequenceClassification, saved."""
    out = {}
    for arch in ("bert", "gpt2"):
        torch.manual_seed(0)
        out[arch] = tmp_path_factory.mktemp(arch)
        transformers.AutoModel.from_config(config(arch)).save_pretrained(out[arch])
    torch.manual_seed(0)
    out["bert-classifier"] = tmp_path_factory.mktemp("classifier")
    transformers.BertForSequenceClassification(config("bert")).save_pretrained(out["bert-classifier"])
    return out


def hidden(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(batch=2, length=6)).last_hidden_state


def dropout_rates(model: Any) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_config_attributes_set_the_dropout(arch: str, saved: dict[str, Path]) -> None:
    ours: Any = AutoAdapterModel.from_pretrained(saved[arch], **DROPOUT_OFF[arch])
    theirs: Any = transformers.AutoModel.from_pretrained(saved[arch], **DROPOUT_OFF[arch])
    default: Any = AutoAdapterModel.from_pretrained(saved[arch])
    for key, value in DROPOUT_OFF[arch].items():
        assert getattr(ours.config, key) == value == getattr(theirs.config, key)
        assert getattr(default.config, key) == 0.1
    assert 0.1 in dropout_rates(default) and 0.1 not in dropout_rates(ours)
    # in training mode the outputs are those without dropout, and AutoModel's
    ours.train(), theirs.train(), default.train()
    torch.manual_seed(3)
    expected = hidden(theirs)
    assert torch.equal(hidden(ours), expected)
    ours.eval()
    assert torch.equal(hidden(ours), expected)
    assert not torch.equal(hidden(default), expected)  # with dropout 0.1 they differ: the check above can fail

    # the adapter methods and heads are there
    ours.add_adapter("a")
    ours.add_classification_head("a", num_labels=2)
    ours.train_adapter("a")
    assert ours.active_head == "a"


def test_config_attributes_with_model_options(saved: dict[str, Path]) -> None:
    kwargs = {"hidden_dropout_prob": 0.0, "dtype": torch.float64, "attn_implementation": "eager"}
    ours: Any = AutoAdapterModel.from_pretrained(saved["bert"], **kwargs)
    theirs: Any = transformers.AutoModel.from_pretrained(saved["bert"], **kwargs)
    assert ours.config.hidden_dropout_prob == 0.0
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    assert ours.config._attn_implementation == theirs.config._attn_implementation == "eager"
    assert torch.equal(hidden(ours.eval()), hidden(theirs.eval()))


def test_a_task_checkpoint_takes_config_attributes(saved: dict[str, Path]) -> None:
    ours: Any = AutoAdapterModel.from_pretrained(saved["bert-classifier"], **DROPOUT_OFF["bert"])
    assert ours.config.hidden_dropout_prob == 0.0 and ours.active_head == "default"
    assert 0.1 not in dropout_rates(ours)
    task: Any = transformers.AutoModelForSequenceClassification.from_pretrained(saved["bert-classifier"],
                                                                                **DROPOUT_OFF["bert"])
    ours.train(), task.train()  # no dropout anywhere: the task model's logits
    with torch.no_grad():
        assert torch.equal(ours(**make_inputs(batch=2, length=6)).logits, task(**make_inputs(batch=2, length=6)).logits)


def test_config_attributes_with_saved_adapters(saved: dict[str, Path], tmp_path: Path) -> None:
    model: Any = AutoAdapterModel.from_pretrained(saved["bert"])
    model.add_adapter("a", config="double_seq_bn", set_active=True)
    randomize(model.fused_adapters.parameters(), std=0.05)
    model.save_pretrained(tmp_path)
    model.eval()
    restored: Any = AutoAdapterModel.from_pretrained(tmp_path, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)
    assert restored.active_adapters == "a" and restored.config.hidden_dropout_prob == 0.0
    restored.train()  # no dropout left: the training-mode outputs are the saved model's eval outputs
    assert torch.equal(hidden(restored), hidden(model))


def test_output_loading_info_and_refused_arguments(saved: dict[str, Path]) -> None:
    model, info = AutoAdapterModel.from_pretrained(saved["gpt2"], output_loading_info=True, resid_pdrop=0.0)
    _, expected = transformers.AutoModel.from_pretrained(saved["gpt2"], output_loading_info=True, resid_pdrop=0.0)
    assert model.config.resid_pdrop == 0.0 and hasattr(model, "add_adapter")
    assert set(info) == set(expected) and not info["missing_keys"] and not info["unexpected_keys"]
    task, _ = AutoAdapterModel.from_pretrained(saved["bert-classifier"], output_loading_info=True)
    assert task.active_head == "default"
    with pytest.raises(TypeError, match="return_unused_kwargs"):
        AutoAdapterModel.from_pretrained(saved["bert"], hidden_dropout_prob=0.0, return_unused_kwargs=True)
    for loader in (AutoAdapterModel, transformers.AutoModel):  # neither takes what is no config attribute
        with pytest.raises(TypeError, match="no_such_option"):
            loader.from_pretrained(saved["bert"], no_such_option=1)


def test_a_config_object_is_used_as_given(saved: dict[str, Path]) -> None:
    given = transformers.AutoConfig.from_pretrained(saved["bert"], hidden_dropout_prob=0.0)
    ours: Any = AutoAdapterModel.from_pretrained(saved["bert"], config=given, dtype=torch.float64)
    assert ours.config.hidden_dropout_prob == 0.0 and {p.dtype for p in ours.parameters()} == {torch.float64}


def test_from_config_takes_what_automodel_takes() -> None:
    for kwargs in ({"dtype": torch.float64}, {"attn_implementation": "eager"}):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours: Any = AutoAdapterModel.from_config(config("bert"), **kwargs)
        torch.manual_seed(0)
        theirs: Any = transformers.AutoModel.from_config(config("bert"), **kwargs)
        assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()}
        assert ours.config._attn_implementation == theirs.config._attn_implementation
        assert torch.equal(hidden(ours.eval()), hidden(theirs.eval()))
        assert hasattr(ours, "add_classification_head")
    # config attributes belong in the config object, as for AutoModel.from_config
    for loader in (AutoAdapterModel, transformers.AutoModel):
        with pytest.raises(TypeError, match="hidden_dropout_prob"):
            loader.from_config(config("bert"), hidden_dropout_prob=0.0)
