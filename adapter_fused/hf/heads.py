"""Flexible prediction heads and ``AutoAdapterModel``: a transformers base model with AdapterHub's
adapter methods (see ``methods``) and named heads on top.

    model = AutoAdapterModel.from_pretrained(path)          # transformers AutoModel + the methods
    model.add_adapter("sst2")
    model.add_classification_head("sst2", num_labels=2)     # becomes the active head
    model.train_adapter("sst2")                             # adapter + its head train
    out = model(input_ids=ids, attention_mask=mask, labels=y)   # SequenceClassifierOutput with loss

Heads live in ``model.heads`` (an ``nn.ModuleDict``, state-dict keys ``heads.<name>.<index>.*``).
As in AdapterHub, a head is a stack of ``layers`` blocks: ``layers - 1`` times dropout, a d x d
linear layer and the activation, then dropout and the output layer (the causal LM head instead
uses linear, activation and layer norm blocks before a d x vocab output layer, without dropout,
and is not tied to the input embeddings). The active head is the one named like the last adapter
of the active setup when such a head exists (``set_active_adapters``, ``train_adapter``), else the
head last added or set via ``active_head``; ``forward(..., head="name")`` picks one for a call.
The loss is computed when ``labels`` (``start_positions`` and ``end_positions`` for question
answering) are passed, so ``transformers.Trainer`` can train the model; outputs are transformers
``ModelOutput`` classes.

Classification and multiple-choice heads read the first token in post-LN encoders (BERT, RoBERTa,
DistilBERT), the last position of ``attention_mask`` (right padding) in decoders, or the pooler
output with ``use_pooler=True``.

``AutoAdapterModel.from_pretrained`` of a checkpoint saved from a task model with a head it knows
(e.g. ``BertForSequenceClassification``, see ``STATIC_HEADS``) turns that head into a flexible head
named ``"default"`` with the same weights and logits.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import model as _model
from .adapterhub.convert import ADAPTERHUB_HEAD_WEIGHTS, head_config_from_adapterhub
from .layouts import find_architecture, hidden_size
from .methods import AdapterMethodsMixin, subclass_for

logger = logging.getLogger(__name__)

HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head_model.safetensors"
HEAD_FORMAT = "adapter_fused_prediction_head"
HEAD_FORMAT_VERSION = 1
HEADS_MODULE = "heads"

_MULTIPLE_CHOICE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _dropout(model_config: Any, config: dict[str, Any]) -> float:
    if config.get("dropout_prob") is not None:
        return float(config["dropout_prob"])
    for key in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop"):
        value = getattr(model_config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _activation(name: str | None, head: str) -> nn.Module | None:
    if name is None:
        return None
    from transformers.activations import ACT2FN

    if not isinstance(name, str) or name.lower() not in ACT2FN:
        raise ValueError(f"adapter_fused: head {head!r}: unknown activation_function {name!r}; expected one of "
                         f"{', '.join(sorted(ACT2FN))} or None")
    return ACT2FN[name.lower()]


def _check_count(value: object, what: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"adapter_fused: head {head!r}: {what} must be a positive int, got {value!r}")
    return value


class PredictionHead(nn.Sequential):
    """A named head: an ``nn.Sequential`` of ``layers`` blocks (see the module docstring) plus a
    JSON-serialisable ``config`` (``head_type`` and the options it was added with)."""

    head_type = ""
    loss_inputs: tuple[str, ...] = ("labels",)

    def __init__(self, model: nn.Module, name: str, config: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.config = {"head_type": self.head_type, **config}
        layers = _check_count(self.config.get("layers"), "layers", name)
        d = hidden_size(model)
        self._build(model, d, layers)
        std = float(getattr(model.config, "initializer_range", 0.02))  # type: ignore[union-attr]
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
        reference = next((p for p in model.parameters() if p.is_floating_point()), None)
        if reference is not None:
            self.to(device=reference.device, dtype=reference.dtype)
        self.train(model.training)

    def out_features(self, model: nn.Module) -> int:
        return _check_count(self.config.get("num_labels"), "num_labels", self.name)

    def _build(self, model: nn.Module, d: int, layers: int) -> None:
        p = _dropout(model.config, self.config)
        modules: list[nn.Module] = []
        for index in range(layers):
            modules.append(nn.Dropout(p))
            if index < layers - 1:
                modules.append(nn.Linear(d, d))
                act = _activation(self.config.get("activation_function"), self.name)
                if act is not None:
                    modules.append(act)
            else:
                modules.append(nn.Linear(d, self.out_features(model), bias=self.config.get("bias", True)))
        for index, module in enumerate(modules):
            self.add_module(str(index), module)

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        """The head's ModelOutput for the base model's ``outputs``; ``targets`` holds the labels."""
        raise NotImplementedError


def _pooled(model: nn.Module, head: PredictionHead, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, d): pooler output, first token (post-LN encoders) or last attended position."""
    if head.config.get("use_pooler"):
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"adapter_fused: head {head.name!r} has use_pooler=True but the model returned no pooler "
                             f"output")
        return pooled
    hidden = outputs.last_hidden_state
    encoder = model.__dict__.get("_fused_post_ln")
    if encoder is None:
        encoder = model.__dict__["_fused_post_ln"] = find_architecture(model)[0].attention.norm is not None
    if encoder:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(-1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def _extras(outputs: Any) -> dict[str, Any]:
    return {"hidden_states": getattr(outputs, "hidden_states", None), "attentions": getattr(outputs, "attentions", None)}


class ClassificationHead(PredictionHead):
    """Sequence classification: logits (batch, num_labels). Loss: cross entropy, mean squared error
    for ``num_labels=1``, binary cross entropy with logits for ``multilabel=True``."""

    head_type = "classification"

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self(_pooled(model, self, outputs, inputs.get("attention_mask")))
        labels = targets.get("labels")
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            n = self.config["num_labels"]
            if n == 1:
                loss = F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
            elif self.config.get("multilabel"):
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits.view(-1, n), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, **_extras(outputs))


class MultipleChoiceHead(PredictionHead):
    """Multiple choice: inputs (batch, num_choices, length), logits (batch, num_choices), loss cross
    entropy over the choices."""

    head_type = "multiple_choice"

    def out_features(self, model: nn.Module) -> int:
        _check_count(self.config.get("num_choices"), "num_choices", self.name)
        return 1

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import MultipleChoiceModelOutput

        choices = inputs["_num_choices"]
        logits = self(_pooled(model, self, outputs, inputs.get("attention_mask"))).view(-1, choices)
        labels = targets.get("labels")
        loss = F.cross_entropy(logits, labels.to(logits.device).view(-1)) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, **_extras(outputs))


class TaggingHead(PredictionHead):
    """Token classification: logits (batch, length, num_labels); loss cross entropy over the
    positions where ``attention_mask`` is 1 and the label is not -100."""

    head_type = "tagging"

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import TokenClassifierOutput

        logits = self(outputs.last_hidden_state)
        labels = targets.get("labels")
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            mask = inputs.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask.to(labels.device) == 0, -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, **_extras(outputs))


class QuestionAnsweringHead(PredictionHead):
    """Extractive question answering: start and end logits (batch, length); loss the mean of the
    cross entropies of ``start_positions`` and ``end_positions`` (positions outside the sequence
    are ignored)."""

    head_type = "question_answering"
    loss_inputs = ("start_positions", "end_positions")

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        logits = self(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1)[:2])
        start, end = targets.get("start_positions"), targets.get("end_positions")
        loss = None
        if start is not None and end is not None:
            length = start_logits.shape[1]
            start = start.to(start_logits.device).view(-1).clamp(0, length)
            end = end.to(end_logits.device).view(-1).clamp(0, length)
            loss = (F.cross_entropy(start_logits, start, ignore_index=length)
                    + F.cross_entropy(end_logits, end, ignore_index=length)) / 2
        elif (start is None) != (end is None):
            raise ValueError(f"adapter_fused: head {self.name!r} needs both start_positions and end_positions")
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            **_extras(outputs))


class CausalLMHead(PredictionHead):
    """Causal language modelling: logits (batch, length, vocab); loss cross entropy of each position
    against the next token of ``labels`` (-100 ignored)."""

    head_type = "causal_lm"

    def _build(self, model: nn.Module, d: int, layers: int) -> None:
        vocab = _check_count(getattr(model.config, "vocab_size", None), "the model's vocab_size", self.name)
        modules: list[nn.Module] = []
        for _ in range(layers - 1):
            modules.append(nn.Linear(d, d))
            act = _activation(self.config.get("activation_function"), self.name)
            if act is not None:
                modules.append(act)
            if self.config.get("layer_norm", True):
                modules.append(nn.LayerNorm(d, eps=1e-12))  # as AdapterHub's LM heads
        modules.append(nn.Linear(d, vocab, bias=self.config.get("bias", True)))
        for index, module in enumerate(modules):
            self.add_module(str(index), module)

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        logits = self(outputs.last_hidden_state)
        labels = targets.get("labels")
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels.to(logits.device)[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None),
                                      **_extras(outputs))


HEAD_TYPES: dict[str, type[PredictionHead]] = {
    cls.head_type: cls for cls in (ClassificationHead, MultipleChoiceHead, TaggingHead, QuestionAnsweringHead,
                                   CausalLMHead)
}


def build_head(model: nn.Module, name: str, config: dict[str, Any]) -> PredictionHead:
    """A freshly initialised head ``name`` from a ``config`` holding its ``head_type``."""
    if not isinstance(config, dict):
        raise TypeError(f"adapter_fused: head {name!r}: config must be a dict, got {type(config).__name__}")
    head_type = config.get("head_type")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"adapter_fused: head {name!r}: unknown head_type {head_type!r}; expected one of "
                         f"{', '.join(HEAD_TYPES)}")
    options = {k: v for k, v in config.items() if k != "head_type"}
    return HEAD_TYPES[head_type](model, name, options)


def _head_name(setup: Any) -> str | None:
    """The head AdapterHub activates for an adapter setup: the last adapter of a name, list or
    Stack; None for Fuse, Average, Parallel and BatchSplit (several heads are not supported)."""
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, (list, tuple)):
        return _head_name(setup[-1]) if setup else None
    children = getattr(setup, "children", None)
    if type(setup).__name__ == "Stack" and isinstance(children, list) and children:
        return _head_name(children[-1])
    return None


class FlexibleHeadsMixin(AdapterMethodsMixin):
    """Named prediction heads on a base model; see the module docstring."""

    accepts_loss_kwargs = False  # the heads average their loss themselves

    @classmethod
    def _prepare_subclass(cls, subclass: type) -> None:
        """Give the subclass a ``forward`` that runs the heads, with the base forward's parameters
        plus the label inputs in its signature (read by transformers' Trainer)."""
        def forward(self: FlexibleHeadsMixin, *args: Any, **kwargs: Any) -> Any:
            return self._heads_forward(*args, **kwargs)

        base = subclass._fused_base_class  # type: ignore[attr-defined]
        forward.__doc__ = cls._heads_forward.__doc__
        forward.__signature__ = _forward_signature(base)  # type: ignore[attr-defined]
        subclass.forward = forward  # type: ignore[attr-defined]
        params = list(inspect.signature(base.forward).parameters.values())[1:]
        subclass._fused_positional = tuple(  # type: ignore[attr-defined]
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        subclass._fused_takes_return_dict = any(p.name == "return_dict" for p in params)  # type: ignore[attr-defined]

    heads: nn.ModuleDict

    @property
    def active_head(self) -> str | None:
        """The name of the head run by ``forward``, or None (base model outputs); settable."""
        return self.__dict__.get("_active_head")

    @active_head.setter
    def active_head(self, name: str | None) -> None:
        if name is not None and name not in self.heads:
            known = ", ".join(self.heads) or "none"
            raise ValueError(f"adapter_fused: no prediction head named {name!r} (heads: {known})")
        self.__dict__["_active_head"] = name

    def add_prediction_head(self, head: PredictionHead, overwrite_ok: bool = False, set_active: bool = True) -> None:
        """Add ``head`` under ``head.name`` (replacing one of that name only with ``overwrite_ok``)."""
        if head.name in self.heads and not overwrite_ok:
            raise ValueError(f"adapter_fused: a prediction head named {head.name!r} already exists; pass "
                             f"overwrite_ok=True to replace it")
        self.heads[head.name] = head
        if set_active:
            self.active_head = head.name

    def _add(self, cls: type[PredictionHead], head_name: str, overwrite_ok: bool, **config: Any) -> None:
        _model.check_name(head_name)
        self.add_prediction_head(cls(self, head_name, config), overwrite_ok)  # type: ignore[arg-type]

    def add_classification_head(self, head_name: str, num_labels: int = 2, layers: int = 2,
                                activation_function: str | None = "tanh", overwrite_ok: bool = False,
                                multilabel: bool = False, id2label: dict[int, str] | None = None,
                                use_pooler: bool = False) -> None:
        """Add a sequence classification head (logits (batch, num_labels)) and make it active."""
        self._add(ClassificationHead, head_name, overwrite_ok, num_labels=num_labels, layers=layers,
                  activation_function=activation_function, multilabel=multilabel, id2label=_labels(id2label),
                  use_pooler=use_pooler)

    def add_multiple_choice_head(self, head_name: str, num_choices: int = 2, layers: int = 2,
                                 activation_function: str | None = "tanh", overwrite_ok: bool = False,
                                 id2label: dict[int, str] | None = None, use_pooler: bool = False) -> None:
        """Add a multiple choice head (inputs (batch, num_choices, length)) and make it active."""
        self._add(MultipleChoiceHead, head_name, overwrite_ok, num_choices=num_choices, layers=layers,
                  activation_function=activation_function, id2label=_labels(id2label), use_pooler=use_pooler)

    def add_tagging_head(self, head_name: str, num_labels: int = 2, layers: int = 1,
                         activation_function: str | None = "tanh", overwrite_ok: bool = False,
                         id2label: dict[int, str] | None = None) -> None:
        """Add a token classification head (logits (batch, length, num_labels)) and make it active."""
        self._add(TaggingHead, head_name, overwrite_ok, num_labels=num_labels, layers=layers,
                  activation_function=activation_function, id2label=_labels(id2label))

    def add_qa_head(self, head_name: str, num_labels: int = 2, layers: int = 1,
                    activation_function: str | None = "tanh", overwrite_ok: bool = False,
                    id2label: dict[int, str] | None = None) -> None:
        """Add an extractive question answering head (start and end logits (batch, length)) and make
        it active; the first two outputs are the start and end logits."""
        if isinstance(num_labels, int) and not isinstance(num_labels, bool) and num_labels < 2:
            raise ValueError(f"adapter_fused: head {head_name!r}: a question answering head needs num_labels >= 2")
        self._add(QuestionAnsweringHead, head_name, overwrite_ok, num_labels=num_labels, layers=layers,
                  activation_function=activation_function, id2label=_labels(id2label))

    def add_causal_lm_head(self, head_name: str, activation_function: str | None = "gelu", layers: int = 2,
                           overwrite_ok: bool = False) -> None:
        """Add a causal language modelling head (logits (batch, length, vocab)) and make it active."""
        self._add(CausalLMHead, head_name, overwrite_ok, activation_function=activation_function, layers=layers,
                  layer_norm=True, bias=True)

    def delete_head(self, head_name: str) -> None:
        """Remove head ``head_name`` (an unknown name only logs a warning, as in AdapterHub)."""
        if head_name not in self.heads:
            logger.warning("adapter_fused: no prediction head named %r to delete", head_name)
            return
        del self.heads[head_name]
        if self.active_head == head_name:
            self.active_head = None

    # -- forward ---------------------------------------------------------------------------------

    def _heads_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, then the active head (or ``head=``) with its loss."""
        head_name = kwargs.pop("head", None)
        targets = {k: kwargs.pop(k) for k in ("labels", "start_positions", "end_positions") if k in kwargs}
        cls = type(self)
        base_forward = cls._fused_base_class.forward
        positional = cls._fused_positional  # type: ignore[attr-defined]
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments ({len(args)} given)")
        for key, value in zip(positional, args):
            if key in kwargs:
                raise TypeError(f"forward() got multiple values for argument {key!r}")
            kwargs[key] = value
        head_name = head_name if head_name is not None else self.active_head
        if head_name is None:
            given = [k for k, v in targets.items() if v is not None]
            if given:
                raise ValueError(f"adapter_fused: {', '.join(given)} given but the model has no active prediction "
                                 f"head; add one (e.g. add_classification_head) or set active_head")
            return base_forward(self, **kwargs)
        if head_name not in self.heads:
            raise ValueError(f"adapter_fused: no prediction head named {head_name!r} (heads: "
                             f"{', '.join(self.heads) or 'none'})")
        head: PredictionHead = self.heads[head_name]  # type: ignore[assignment]
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "use_return_dict", True)  # type: ignore[attr-defined]
        if cls._fused_takes_return_dict:  # type: ignore[attr-defined]
            kwargs["return_dict"] = True
        inputs = dict(kwargs)
        if isinstance(head, MultipleChoiceHead):
            reference = kwargs.get("input_ids")
            if reference is None:
                reference = kwargs.get("inputs_embeds")
            if reference is None or reference.dim() < 3:
                raise ValueError(f"adapter_fused: multiple choice head {head_name!r} expects inputs of shape "
                                 f"(batch, num_choices, length)")
            inputs["_num_choices"] = reference.shape[1]
            for key in _MULTIPLE_CHOICE_INPUTS:
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() >= 2:
                    kwargs[key] = value.reshape(-1, value.shape[-1])
            if isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
                embeds = kwargs["inputs_embeds"]
                kwargs["inputs_embeds"] = embeds.reshape(-1, *embeds.shape[-2:])
            inputs["attention_mask"] = kwargs.get("attention_mask")
        outputs = base_forward(self, **kwargs)
        result = head.predict(self, outputs, inputs, targets)  # type: ignore[arg-type]
        return result if return_dict else result.to_tuple()

    # -- hooks of the adapter methods ------------------------------------------------------------

    def _after_activation(self, adapter_setup: Any) -> None:
        name = _head_name(adapter_setup)
        if name is not None and name in self.heads:
            self.active_head = name

    def _after_train(self, train_head: bool) -> None:
        active = self.active_head
        for name, head in self.heads.items():
            for parameter in head.parameters():
                parameter.requires_grad_(bool(train_head and name == active))

    def _save_head(self, save_directory: str | os.PathLike[str], adapter_name: str, with_head: bool) -> None:
        from safetensors.torch import save

        from .io import _write_atomic

        target = Path(save_directory)
        head: PredictionHead | None = None
        if with_head:
            if adapter_name in self.heads:
                head = self.heads[adapter_name]  # type: ignore[assignment]
            elif self.active_head is not None and _head_name(self.active_adapters) == adapter_name:
                head = self.heads[self.active_head]  # type: ignore[assignment]
        if head is None:
            for stale in (HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE):
                (target / stale).unlink(missing_ok=True)
            return
        meta = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "name": head.name,
                "hidden_size": hidden_size(self), "config": head.config}  # type: ignore[arg-type]
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
        files = [(HEAD_WEIGHTS_FILE, save(tensors, metadata={"format": "pt"})),
                 (HEAD_CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())]
        pending = []
        try:
            for file_name, data in files:
                pending.append((_write_atomic(target / file_name, data), target / file_name))
        except BaseException:
            for temp, _ in pending:
                temp.unlink(missing_ok=True)
            raise
        for temp, final in pending:
            os.replace(temp, final)

    def _read_head(self, directory: str | os.PathLike[str]) -> PredictionHead | None:
        from .io import _read_json, _read_weights

        root = Path(directory)
        config_path = root / HEAD_CONFIG_FILE
        hub_weights = [root / f for f in ADAPTERHUB_HEAD_WEIGHTS if (root / f).is_file()]
        if not config_path.exists():
            if (root / HEAD_WEIGHTS_FILE).exists() or hub_weights:
                raise FileNotFoundError(f"{config_path}: head config not found (the directory has head weights)")
            return None
        meta = _read_json(config_path)
        if meta.get("hidden_size") not in (None, hidden_size(self)):  # type: ignore[arg-type]
            raise ValueError(f"{config_path}: head was saved for hidden size {meta['hidden_size']}, the model has "
                             f"{hidden_size(self)}")  # type: ignore[arg-type]
        name = str(meta.get("name") or "head")
        if meta.get("format") == HEAD_FORMAT and meta.get("format_version") == HEAD_FORMAT_VERSION:
            weights_path = root / HEAD_WEIGHTS_FILE
            config = meta.get("config")
            prefix = ""
        elif "format" not in meta and isinstance(meta.get("config"), dict) and "head_type" in meta["config"]:
            if not hub_weights:
                raise FileNotFoundError(f"{root}: no AdapterHub head weights ({' or '.join(ADAPTERHUB_HEAD_WEIGHTS)})")
            weights_path = hub_weights[0]
            config = head_config_from_adapterhub(meta["config"], self, str(config_path))  # type: ignore[arg-type]
            prefix = f"heads.{name}."
        else:
            raise ValueError(f"{config_path}: neither an adapter_fused nor an AdapterHub prediction head config "
                             f"(format {meta.get('format')!r}, format_version {meta.get('format_version')!r})")
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: head weights not found (the directory has {HEAD_CONFIG_FILE})")
        try:
            head = build_head(self, name, config)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config_path}: invalid head config ({exc})") from exc
        tensors = _read_weights(weights_path)
        if prefix:
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
        load_head_weights(head, tensors, str(weights_path))
        return head

    def _install_head(self, name: str, head: PredictionHead) -> None:
        head.name = name
        self.add_prediction_head(head, overwrite_ok=True, set_active=True)


def load_head_weights(head: PredictionHead, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (keys as in ``head.state_dict()``) into ``head`` after checking names and shapes."""
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match head {head.name!r} ({head.config['head_type']}): missing "
                         f"{missing or 'none'}, unexpected {unexpected or 'none'}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: head {head.name!r} tensor {key} has shape {tuple(tensors[key].shape)}, "
                             f"expected {tuple(value.shape)}")
    with torch.no_grad():
        for key, parameter in head.state_dict(keep_vars=True).items():
            parameter.copy_(tensors[key].to(device=parameter.device, dtype=parameter.dtype))


def _labels(id2label: dict[Any, str] | None) -> dict[str, str] | None:
    return None if id2label is None else {str(k): str(v) for k, v in id2label.items()}


def _forward_signature(base: type) -> inspect.Signature:
    """The base forward's parameters plus ``labels``, ``start_positions``, ``end_positions`` and
    ``head`` (so that transformers' Trainer finds the label names and keeps the input columns)."""
    params = list(inspect.signature(base.forward).parameters.values())
    kinds = inspect.Parameter
    plain = [p for p in params if p.kind not in (kinds.VAR_KEYWORD, kinds.VAR_POSITIONAL, kinds.KEYWORD_ONLY)]
    keyword = [p for p in params if p.kind == kinds.KEYWORD_ONLY]
    names = {p.name for p in params}
    extra = [kinds(n, kinds.KEYWORD_ONLY, default=None)
             for n in ("labels", "start_positions", "end_positions", "head") if n not in names]
    var = [p for p in params if p.kind == kinds.VAR_KEYWORD]
    return inspect.Signature([*plain, *keyword, *extra, *var])


def flexible_class(base: type) -> type:
    """The subclass of the base model class ``base`` with adapter methods and flexible heads."""
    return subclass_for(base, FlexibleHeadsMixin)


def with_flexible_heads(model: nn.Module) -> nn.Module:
    """Turn a transformers base model (what ``AutoModel`` returns) into one with adapter methods and
    flexible heads, in place; returns it. A model that already has them is returned unchanged."""
    if isinstance(model, FlexibleHeadsMixin):
        return model
    if getattr(model, "base_model", model) is not model:
        raise ValueError(f"adapter_fused: AutoAdapterModel wraps a base model (as transformers' AutoModel returns); "
                         f"{type(model).__name__} is a task model, use adapter_fused.init for it")
    find_architecture(model)
    if HEADS_MODULE in model._modules or hasattr(model, HEADS_MODULE):
        raise ValueError(f"adapter_fused: {type(model).__name__} already has an attribute {HEADS_MODULE!r}")
    model.__class__ = flexible_class(type(model))
    model.add_module(HEADS_MODULE, nn.ModuleDict())
    model.__dict__["_active_head"] = None
    return model


STATIC_HEADS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # task model class: (head config, {module of the task model: index in the flexible head})
    "BertForSequenceClassification": ({"head_type": "classification", "layers": 1, "activation_function": None,
                                       "use_pooler": True}, {"classifier": "1"}),
    "RobertaForSequenceClassification": ({"head_type": "classification", "layers": 2, "activation_function": "tanh",
                                          "use_pooler": False}, {"classifier.dense": "1", "classifier.out_proj": "4"}),
    "XLMRobertaForSequenceClassification": ({"head_type": "classification", "layers": 2,
                                             "activation_function": "tanh", "use_pooler": False},
                                            {"classifier.dense": "1", "classifier.out_proj": "4"}),
    "DistilBertForSequenceClassification": ({"head_type": "classification", "layers": 2,
                                             "activation_function": "relu", "use_pooler": False},
                                            {"pre_classifier": "1", "classifier": "4"}),
    "BertForTokenClassification": ({"head_type": "tagging", "layers": 1, "activation_function": None},
                                   {"classifier": "1"}),
    "RobertaForTokenClassification": ({"head_type": "tagging", "layers": 1, "activation_function": None},
                                      {"classifier": "1"}),
    "DistilBertForTokenClassification": ({"head_type": "tagging", "layers": 1, "activation_function": None},
                                         {"classifier": "1"}),
    "BertForQuestionAnswering": ({"head_type": "question_answering", "layers": 1, "activation_function": None},
                                 {"qa_outputs": "1"}),
    "RobertaForQuestionAnswering": ({"head_type": "question_answering", "layers": 1, "activation_function": None},
                                    {"qa_outputs": "1"}),
    "DistilBertForQuestionAnswering": ({"head_type": "question_answering", "layers": 1,
                                        "activation_function": None}, {"qa_outputs": "1"}),
}
"""Task model heads that ``AutoAdapterModel.from_pretrained`` turns into a flexible head "default"."""

STATIC_HEAD_NAME = "default"


def _static_head(model: nn.Module, task: nn.Module, architecture: str) -> PredictionHead:
    config, modules = STATIC_HEADS[architecture]
    config = dict(config)
    config["num_labels"] = int(task.config.num_labels)  # type: ignore[union-attr]
    if config["head_type"] == "classification" and getattr(task.config, "problem_type", None) == "multi_label_classification":
        config["multilabel"] = True
    head = build_head(model, STATIC_HEAD_NAME, config)
    tensors = {}
    for path, index in modules.items():
        for key, value in task.get_submodule(path).state_dict().items():
            tensors[f"{index}.{key}"] = value
    load_head_weights(head, tensors, f"{architecture} head")
    return head


class AutoAdapterModel:
    """``AutoAdapterModel.from_pretrained(path)``: transformers' ``AutoModel`` of ``path`` with
    AdapterHub's adapter methods and flexible prediction heads (see the module docstring)."""

    def __init__(self) -> None:
        raise OSError("AutoAdapterModel is created with AutoAdapterModel.from_pretrained(path) or from_config(config)")

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> nn.Module:
        """A freshly initialised base model for ``config`` with the methods and heads."""
        from transformers import AutoModel

        return with_flexible_heads(AutoModel.from_config(config, **kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
                        **kwargs: Any) -> nn.Module:
        """Load the base model saved at ``pretrained_model_name_or_path`` (keyword arguments go to
        transformers' ``from_pretrained``) with the methods and heads.

        A checkpoint of a task model listed in ``STATIC_HEADS`` brings its head as the flexible head
        ``"default"`` (active); other task heads are dropped with a warning. A checkpoint saved from
        a model with adapters (``save_pretrained`` or ``Trainer.save_model`` of an init-ed model or
        an AutoAdapterModel) gets its adapters, heads and active setup back (see
        ``checkpoints.restore_adapters``)."""
        import transformers

        from .checkpoints import SETUP_FILE, restore_adapters

        config = kwargs.pop("config", None)
        if config is None:
            config = transformers.AutoConfig.from_pretrained(
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in ("trust_remote_code", "revision", "cache_dir", "local_files_only")
                   if k in kwargs})
        architecture = (getattr(config, "architectures", None) or [None])[0]
        base_class = transformers.AutoModel._model_mapping[type(config)]
        if architecture in STATIC_HEADS:
            task_class = getattr(transformers, architecture)
            task = subclass_for(task_class, AdapterMethodsMixin).from_pretrained(
                pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            model = task.base_model
            with_flexible_heads(model)
            model.add_prediction_head(_static_head(model, task, architecture))
        else:
            if architecture is not None and architecture != base_class.__name__:
                logger.warning("adapter_fused: %s was saved from %s; its task head is not turned into a flexible head "
                               "and is dropped (heads converted: %s)", pretrained_model_name_or_path, architecture,
                               ", ".join(STATIC_HEADS))
            model = flexible_class(base_class).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                               config=config, **kwargs)
            find_architecture(model)  # ValueError for a model the adapters do not support
            model.add_module(HEADS_MODULE, nn.ModuleDict())
            model.__dict__["_active_head"] = None
        if (Path(pretrained_model_name_or_path) / SETUP_FILE).is_file():
            restore_adapters(model, pretrained_model_name_or_path)
        return model


