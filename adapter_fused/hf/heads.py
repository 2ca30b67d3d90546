"""Prediction heads: what an ``AutoAdapterModel`` (see ``auto``, and ``methods.FlexibleHeadsMixin`` for
the head methods) puts on top of its base model, built from a JSON-serialisable config
(``build_head``).

As in AdapterHub, a head is a stack of ``layers`` blocks: ``layers - 1`` times dropout, a d x d
linear layer and the activation, then dropout and the output layer (the language-modelling heads,
causal, masked and sequence-to-sequence, instead use linear, activation and layer norm blocks before
an output layer to the vocabulary, without dropout, not tied to the input embeddings). Each head
computes its outputs (transformers ``ModelOutput`` classes) from the base model's, with the loss when
``labels`` (``start_positions`` and ``end_positions`` for question answering) are passed.

Classification and multiple-choice heads read the first token in post-LN encoders (BERT, RoBERTa,
DistilBERT), the last position of ``attention_mask`` (right padding) in decoders, or the pooler
output with ``use_pooler=True``.

``STATIC_HEADS`` lists the heads of transformers task models (e.g. ``BertForSequenceClassification``)
that ``static_head`` turns into a prediction head with the same weights and logits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import find_architecture, hidden_size


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

    def prepare(self, model: nn.Module, kwargs: dict[str, Any], targets: dict[str, Any]) -> None:
        """Complete the base model's inputs ``kwargs`` before it runs (``targets`` holds the labels)."""

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


class _LanguageModelHead(PredictionHead):
    """A language-modelling head as AdapterHub builds them: ``layers - 1`` blocks of a linear layer
    (d -> e, then e -> e), the activation and, with ``layer_norm``, a LayerNorm(e) (eps: the model's
    ``layer_norm_eps``, else 1e-12), then the output layer e -> vocab; e is ``embedding_size`` where the
    head has one, else d. No dropout, and the output layer is not tied to the input embeddings.
    ``layer_norm`` and ``bias`` (of the output layer) default to ``defaults``, AdapterHub's for the head."""

    defaults: ClassVar[dict[str, bool]] = {"layer_norm": True, "bias": True}

    def embedding_size(self, model: nn.Module, d: int) -> int:
        return d

    def _build(self, model: nn.Module, d: int, layers: int) -> None:
        vocab = _check_count(getattr(model.config, "vocab_size", None), "the model's vocab_size", self.name)
        e = self.embedding_size(model, d)
        eps = getattr(model.config, "layer_norm_eps", None)
        modules: list[nn.Module] = []
        for index in range(layers - 1):
            modules.append(nn.Linear(d if index == 0 else e, e))
            act = _activation(self.config.get("activation_function"), self.name)
            if act is not None:
                modules.append(act)
            if self.config.get("layer_norm", self.defaults["layer_norm"]):
                modules.append(nn.LayerNorm(e, eps=float(eps) if isinstance(eps, float) else 1e-12))
        modules.append(nn.Linear(e, vocab, bias=self.config.get("bias", self.defaults["bias"])))
        for index, module in enumerate(modules):
            self.add_module(str(index), module)

    def token_loss(self, logits: torch.Tensor, labels: Any, shift: bool) -> torch.Tensor | None:
        """Cross entropy of the logits (batch, length, vocab) against ``labels`` (-100 ignored), each
        position against the next label with ``shift``; None without labels."""
        if labels is None:
            return None
        labels = labels.to(logits.device)
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class CausalLMHead(_LanguageModelHead):
    """Causal language modelling: logits (batch, length, vocab); loss cross entropy of each position
    against the next token of ``labels`` (-100 ignored)."""

    head_type = "causal_lm"

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        logits = self(outputs.last_hidden_state)
        return CausalLMOutputWithPast(loss=self.token_loss(logits, targets.get("labels"), shift=True), logits=logits,
                                      past_key_values=getattr(outputs, "past_key_values", None), **_extras(outputs))


class MaskedLMHead(_LanguageModelHead):
    """Masked language modelling (AdapterHub's ``BertStyleMaskedLMHead``): logits (batch, length,
    vocab); loss cross entropy of each position against its label (-100 ignored, no shift). Its
    width e is ``embedding_size`` (default: the model's ``embedding_size``, else d)."""

    head_type = "masked_lm"

    def embedding_size(self, model: nn.Module, d: int) -> int:
        given = self.config.get("embedding_size") or getattr(model.config, "embedding_size", None) or d
        return _check_count(given, "embedding_size", self.name)

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        logits = self(outputs.last_hidden_state)
        return MaskedLMOutput(loss=self.token_loss(logits, targets.get("labels"), shift=False), logits=logits,
                              **_extras(outputs))


class Seq2SeqLMHead(_LanguageModelHead):
    """Sequence-to-sequence language modelling on an encoder-decoder model (BART, T5...): logits
    (batch, target length, vocab) from the decoder's output; loss cross entropy of each position
    against its label (-100 ignored, no shift: the decoder input is the labels shifted right, made
    from ``labels`` when no ``decoder_input_ids`` are given). On T5 models with tied embeddings the
    decoder output is scaled by d ** -0.5 first, as T5 and AdapterHub do."""

    head_type = "seq2seq_lm"
    defaults: ClassVar[dict[str, bool]] = {"layer_norm": False, "bias": False}

    def prepare(self, model: nn.Module, kwargs: dict[str, Any], targets: dict[str, Any]) -> None:
        labels = targets.get("labels")
        if labels is None or kwargs.get("decoder_input_ids") is not None or kwargs.get("decoder_inputs_embeds") is not None:
            return
        config = model.config
        start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
        if start is None or pad is None:
            raise ValueError(f"adapter_fused: head {self.name!r} makes the decoder inputs from labels with the model's "
                             f"decoder_start_token_id and pad_token_id, which its config lacks; pass decoder_input_ids")
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        kwargs["decoder_input_ids"] = shifted.masked_fill(shifted == -100, pad)

    def predict(self, model: nn.Module, outputs: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import Seq2SeqLMOutput

        hidden = outputs.last_hidden_state
        config = model.config
        if getattr(config, "model_type", None) in ("t5", "mt5") and getattr(config, "tie_word_embeddings", False):
            hidden = hidden * float(getattr(config, "d_model")) ** -0.5  # noqa: B009 - a config attribute
        logits = self(hidden)
        extras = {key: getattr(outputs, key, None) for key in (
            "past_key_values", "decoder_hidden_states", "decoder_attentions", "cross_attentions",
            "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")}
        return Seq2SeqLMOutput(loss=self.token_loss(logits, targets.get("labels"), shift=False), logits=logits,
                               **extras)


HEAD_TYPES: dict[str, type[PredictionHead]] = {
    cls.head_type: cls for cls in (ClassificationHead, MultipleChoiceHead, TaggingHead, QuestionAnsweringHead,
                                   CausalLMHead, MaskedLMHead, Seq2SeqLMHead)
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


def head_name_for(setup: Any) -> str | None:
    """The head AdapterHub activates for an adapter setup: the last adapter of a name, list or
    Stack; None for Fuse, Average, Parallel and BatchSplit (several heads are not supported)."""
    if setup is None or isinstance(setup, str):
        return setup
    if isinstance(setup, (list, tuple)):
        return head_name_for(setup[-1]) if setup else None
    children = getattr(setup, "children", None)
    if type(setup).__name__ == "Stack" and isinstance(children, list) and children:
        return head_name_for(children[-1])
    return None


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


def static_head(model: nn.Module, task: nn.Module, architecture: str) -> PredictionHead:
    """The prediction head ``"default"`` of ``model`` (the base model of ``task``, with flexible heads)
    equal to the head of ``task``, a task model of the class ``architecture`` listed in ``STATIC_HEADS``."""
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
