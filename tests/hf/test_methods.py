"""adapter_fused.init: AdapterHub's adapter methods on a transformers model, winning over the PEFT
methods of PreTrainedModel, delegating to the free functions (same outputs), with AdapterHub's
signatures and defaults; init-ed models survive deepcopy, pickling and nn.DataParallel."""

from __future__ import annotations

import copy
import inspect
import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from .models import HIDDEN, LAYERS, VOCAB, make_inputs, make_model, randomize

transformers = pytest.importorskip("transformers")

from adapter_fused import init
from adapter_fused.hf import (
    AdapterConfig,
    adapter_summary,
    add_adapter,
    list_adapters,
    set_active_adapters,
)
from adapter_fused.hf.formats import HEAD_CONFIG_FILE
from adapter_fused.hf.methods import AdapterMethodsMixin

LABELS = 3


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64,
                                     num_labels=LABELS)
    return transformers.BertForSequenceClassification(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(batch=3)).logits


def test_methods_win_over_transformers_peft_methods() -> None:
    model = classifier()
    assert init(model) is model
    cls = type(model)
    assert cls.__name__ == "BertForSequenceClassification" and isinstance(model, transformers.PreTrainedModel)
    for name in ("add_adapter", "load_adapter", "delete_adapter", "set_active_adapters", "train_adapter",
                 "save_adapter", "adapter_summary"):
        assert getattr(cls, name) is getattr(AdapterMethodsMixin, name), name
    assert isinstance(inspect.getattr_static(model, "active_adapters"), property)
    model.add_adapter("a")
    assert init(model) is model and type(model) is cls  # a second init changes nothing
    assert list_adapters(model) == ["a"]


def test_methods_compute_what_the_free_functions_compute() -> None:
    ours, free = init(classifier()), classifier()
    ours.add_adapter("a")  # AdapterHub's default config: seq_bn
    add_adapter(free, "a", "pfeiffer")
    assert ours.adapters == ["a"]
    randomize(ours.bert.fused_adapters.parameters(), std=0.1)
    randomize(free.bert.fused_adapters.parameters(), std=0.1)
    ours.set_active_adapters("a")
    set_active_adapters(free, "a")
    assert ours.active_adapters == "a"
    assert torch.equal(logits(ours), logits(free))
    assert not torch.equal(logits(ours), logits(classifier()))
    ours.set_active_adapters(None)
    assert torch.equal(logits(ours), logits(classifier()))
    ours.active_adapters = "a"
    assert torch.equal(logits(ours), logits(free))


@pytest.mark.adapterhub
def test_signatures_and_defaults_follow_adapterhub() -> None:
    adapters = pytest.importorskip("adapters")
    theirs = adapters.model_mixin.ModelAdaptersMixin
    for name, ours_params in (("add_adapter", ["adapter_name", "config", "overwrite_ok", "set_active"]),
                              ("train_adapter", ["adapter_setup", "train_embeddings"]),
                              ("set_active_adapters", ["adapter_setup", "skip_layers"]),
                              ("save_adapter", ["save_directory", "adapter_name"]),
                              ("delete_adapter", ["adapter_name"])):
        mine = inspect.signature(getattr(AdapterMethodsMixin, name)).parameters
        hub = inspect.signature(getattr(theirs, name)).parameters
        assert list(mine)[1:len(ours_params) + 1] == list(hub)[1:len(ours_params) + 1] == ours_params, name
        for param in ours_params:
            assert mine[param].default == hub[param].default, (name, param)
    load = inspect.signature(AdapterMethodsMixin.load_adapter).parameters
    hub_load = inspect.signature(theirs.load_adapter).parameters
    assert list(load)[1] == "adapter_name_or_path" == list(hub_load)[1]
    for param in ("load_as", "set_active"):
        assert load[param].default == hub_load[param].default
    assert load["with_head"].default is True
    assert inspect.signature(theirs.adapter_summary).parameters["as_dict"].default is False


def test_add_adapter_options() -> None:
    model = init(classifier())
    model.add_adapter("a", config="double_seq_bn", set_active=True)
    assert model.active_adapters == "a"
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a")
    model.add_adapter("a", config=AdapterConfig("pfeiffer", bottleneck=4), overwrite_ok=True)
    assert adapter_summary(model).adapters[0].bottleneck == 4
    assert model.active_adapters == "a"  # the replaced adapter was active, the new one is
    with pytest.raises(ValueError, match="unknown placement"):
        model.add_adapter("a", config="nonsense", overwrite_ok=True)
    assert adapter_summary(model).adapters[0].bottleneck == 4  # the failed overwrite kept the adapter
    with pytest.raises(ValueError, match="skip_layers"):
        model.set_active_adapters("a", skip_layers=[0])
    with pytest.raises(ValueError, match="train_embeddings"):
        model.train_adapter("a", train_embeddings=True)


def test_train_adapter_and_the_head() -> None:
    model = init(classifier())
    model.add_adapter("a")
    model.train_adapter("a")
    assert model.training and model.active_adapters == "a"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("bert.fused_adapters.a.", "classifier."))}
    model.train_adapter("a", train_head=False)
    assert not any(p.requires_grad for p in model.classifier.parameters())


def test_save_and_load_adapter_with_the_head(tmp_path: Path) -> None:
    model = init(classifier())
    model.add_adapter("a", config="double_seq_bn")
    randomize(model.bert.fused_adapters.parameters(), std=0.1)
    randomize(model.classifier.parameters(), seed=5, std=0.1)
    model.set_active_adapters("a")
    expected = logits(model)
    model.save_adapter(tmp_path / "a", "a")  # AdapterHub's order: directory, then name
    assert (tmp_path / "a" / HEAD_CONFIG_FILE).is_file()
    fresh = init(classifier())
    assert fresh.load_adapter(tmp_path / "a", set_active=True) == "a"
    assert fresh.active_adapters == "a"
    assert torch.equal(logits(fresh), expected)
    other = init(classifier())
    assert other.load_adapter(str(tmp_path / "a"), load_as="b", with_head=False) == "b"
    other.set_active_adapters("b")
    assert not torch.equal(logits(other), expected)  # its own classifier
    with pytest.raises(FileNotFoundError, match="local directory"):
        other.load_adapter(str(tmp_path / "missing"))


def test_load_over_an_existing_adapter_overwrites_its_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = init(classifier())
    model.add_adapter("a")
    randomize(model.bert.fused_adapters.parameters(), std=0.1)
    model.save_adapter(tmp_path / "a", "a", with_head=False)
    model.set_active_adapters("a")
    expected = logits(model)
    parameters = list(model.bert.fused_adapters.parameters())
    with torch.no_grad():
        for p in parameters:
            p.zero_()
    assert not torch.equal(logits(model), expected)
    with caplog.at_level(logging.WARNING, logger="adapter_fused.hf.methods"):
        assert model.load_adapter(tmp_path / "a") == "a"
    assert "overwriting" in caplog.text
    assert all(a is b for a, b in zip(model.bert.fused_adapters.parameters(), parameters))  # same, new values
    assert list_adapters(model) == ["a"] and torch.equal(logits(model), expected)
    # a different config is refused and leaves the model as it was
    model.delete_adapter("a")
    model.add_adapter("a", config="double_seq_bn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="differs"):
        model.load_adapter(tmp_path / "a")
    assert list_adapters(model) == ["a"] and state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_delete_adapter_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    model = init(classifier())
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("b")
    model.train_adapter("b")
    rows = model.adapter_summary(as_dict=True)
    structured = adapter_summary(model)
    assert [r["name"] for r in rows] == ["a", "b", "Full model"]
    for row, info in zip(rows, structured.adapters):
        assert row["#param"] == info.parameters == sum(p.numel() for p in model.bert.fused_adapters[info.name].parameters())
        assert row["%param"] == pytest.approx(100 * info.parameters / structured.base_parameters)
    assert [r["active"] for r in rows[:2]] == [False, True] and [r["train"] for r in rows] == [False, True, False]
    assert rows[2]["#param"] == sum(p.numel() for p in model.parameters()) - rows[0]["#param"] - rows[1]["#param"]
    text = model.adapter_summary()
    assert isinstance(text, str) and "Full model" in text and f"{rows[0]['#param']:,}" in text
    with caplog.at_level(logging.WARNING, logger="adapter_fused.hf.methods"):
        model.delete_adapter("zzz")
    assert "no adapter named 'zzz'" in caplog.text
    model.delete_adapter("a")
    assert model.adapters == ["b"]


def test_copies_keep_the_methods() -> None:
    model = init(classifier())
    model.add_adapter("a")
    randomize(model.bert.fused_adapters.parameters(), std=0.1)
    model.set_active_adapters("a")
    expected = logits(model)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied) is type(model) and copied.active_adapters == "a"
        assert torch.equal(logits(copied), expected)
        copied.add_adapter("b")  # the copy's own adapters
        assert list_adapters(model) == ["a"]
    with torch.no_grad():
        parallel = nn.DataParallel(model)  # on CPU it calls the module itself; replicas keep the class
        assert torch.equal(parallel(**make_inputs(batch=3)).logits, expected)
    replica = model._replicate_for_data_parallel()
    assert type(replica) is type(model)


def test_init_on_base_models_and_errors() -> None:
    model = init(make_model("gpt2"))
    model.add_adapter("a", config="double_seq_bn", set_active=True)
    assert model.active_adapters == "a"
    with pytest.raises(TypeError, match="transformers model"):
        init("not a model")  # type: ignore[type-var]
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not supported"):
        init(plain)
    assert type(plain) is nn.Sequential
