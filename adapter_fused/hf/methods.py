"""AdapterHub-style methods on a transformers model: ``adapter_fused.init(model)`` (``AdapterMethodsMixin``),
and named prediction heads on a base model (``FlexibleHeadsMixin``, as ``AutoAdapterModel`` gives).

    import adapter_fused
    adapter_fused.init(model)                  # once; calling it again changes nothing
    model.add_adapter("task")                  # "seq_bn" (= "pfeiffer") by default, as in AdapterHub
    model.train_adapter("task")
    ... train ...
    model.save_adapter("out/task", "task")     # save_directory first, then the name, as in AdapterHub
    name = other.load_adapter("out/task")      # other: an init-ed model
    other.set_active_adapters(name)

``init`` swaps the model's class for a subclass (same class name, cached per class) whose methods
come first in the method resolution order, so they win over the PEFT methods of transformers'
``PreTrainedModel`` with the same names (``add_adapter``, ``load_adapter``, ``active_adapters``...).
Instances of these subclasses pickle and deep-copy as the subclass (``__reduce_ex__`` names the
original class and the mixin, and the subclass is rebuilt on load), and ``nn.DataParallel``
replicas keep it. Each method delegates to the free functions of ``adapter_fused.hf``; compositions
are passed through to them unchanged.

``save_pretrained`` (and so ``Trainer.save_model`` and Trainer's checkpoints) of an init-ed model
also records the adapters' configs and the active setup (see ``formats``). AdapterFusion has
AdapterHub's methods (``add_adapter_fusion``, ``train_adapter_fusion``, ``save_adapter_fusion``,
``load_adapter_fusion``, ``delete_adapter_fusion``, ``get_fusion_regularization_loss``; see ``fusion``). A
call takes AdapterHub's ``task_ids=`` for a ``MultiTask`` setup, and ``generate()`` (of models that
generate) runs a ``Parallel`` setup on its inputs repeated once, returning n*B sequences.

``with_flexible_heads`` gives a base model both: its heads live in ``model.heads`` (an ``nn.ModuleDict``,
state-dict keys ``heads.<name>.<index>.*``, see ``heads``). The active head is the one named like the
last adapter of the active setup when such a head exists (``set_active_adapters``, ``train_adapter``),
else the head last added or set via ``active_head``; ``forward(..., head="name")`` picks one for a
call. The loss is computed when ``labels`` (``start_positions`` and ``end_positions`` for question
answering) are passed, so ``transformers.Trainer`` can train the model; a sequence-to-sequence head
makes the decoder inputs from the labels when none are given.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import formats
from . import fusion as _fusion
from . import model as _model
from .compose import given_task_ids
from .composition import Composition, Fuse
from .config import resolve_config
from .formats import HeadToSave
from .heads import (
    CausalLMHead,
    ClassificationHead,
    MaskedLMHead,
    MultipleChoiceHead,
    PredictionHead,
    QuestionAnsweringHead,
    Seq2SeqLMHead,
    TaggingHead,
    build_head,
    head_name_for,
    load_head_weights,
)
from .layouts import find_architecture
from .multitask import per_sample_adapters
from .sites import BATCH_FIRST, replicated_for_generation

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "seq_bn"
"""The config of ``model.add_adapter(name)`` without one: AdapterHub's default, the Pfeiffer adapter."""

IGNORE_ON_LOAD = (r"(^|\.)fused_adapters\.", r"^heads\.")
"""State-dict keys that transformers' ``from_pretrained`` of an init-ed class leaves for
``auto.restore_adapters`` to load (instead of warning that they were not used)."""

HEADS_MODULE = "heads"
"""The attribute of a model with flexible heads holding them, an ``nn.ModuleDict``."""

_MULTIPLE_CHOICE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

M = TypeVar("M", bound=nn.Module)

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _rebuild(mixin: type, base: type) -> nn.Module:
    """Unpickling: an empty instance of the subclass of ``base`` with ``mixin`` (state set after)."""
    cls = subclass_for(base, mixin)
    return cls.__new__(cls)


def subclass_for(base: type, mixin: type) -> type:
    """The subclass of the model class ``base`` whose methods are ``mixin``'s first; one per pair.

    It keeps ``base``'s name (``config.architectures`` written by ``save_pretrained`` names the
    original class) and ignores, when loading weights, the adapter and head keys that
    ``auto.restore_adapters`` loads."""
    if isinstance(base, type) and issubclass(base, AdapterMethodsMixin):
        base = base._fused_base_class  # type: ignore[attr-defined]
    key = (base, mixin)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        ignore = list(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or [])
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_fused_base_class": base,
            "_fused_mixin": mixin,
            "_keys_to_ignore_on_load_unexpected": [*ignore, *IGNORE_ON_LOAD],
        }
        cls = type(base.__name__, (mixin, base), namespace)
        mixin._prepare_subclass(cls)
        _SUBCLASSES[key] = cls
    return cls


class AdapterMethodsMixin:
    """The methods ``init`` gives a model; see the module docstring."""

    _fused_base_class: type
    _fused_mixin: type

    @classmethod
    def _prepare_subclass(cls, subclass: type) -> None:
        """Complete a subclass made by ``subclass_for`` (also when one is rebuilt by unpickling): a
        model class that generates gets ``generate`` running Parallel compositions."""
        if callable(getattr(subclass._fused_base_class, "generate", None)):  # type: ignore[attr-defined]
            subclass.generate = _generate  # type: ignore[attr-defined]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        state = self.__getstate__()  # type: ignore[misc]
        return _rebuild, (type(self)._fused_mixin, type(self)._fused_base_class), state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model; ``task_ids=`` (AdapterHub's keyword: a (batch,) tensor of child positions or
        a list of adapter names) gives an active ``MultiTask`` the task of each sample."""
        if "task_ids" not in kwargs:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        with given_task_ids(kwargs.pop("task_ids")):
            return super().__call__(*args, **kwargs)  # type: ignore[misc]

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: Any = None, overwrite_ok: bool = False,
                    set_active: bool = False) -> None:
        """Add adapter ``adapter_name`` (see ``adapter_fused.hf.add_adapter``).

        config: a preset name (``"seq_bn"`` / ``"pfeiffer"``, ``"double_seq_bn"`` / ``"houlsby"``,
        ``"par_bn"`` / ``"parallel"``) or an ``AdapterConfig``; None means ``"seq_bn"``.
        overwrite_ok: replace an adapter of the same name (otherwise ValueError); a replaced active
        adapter stays active.
        set_active: activate the new adapter (``set_active_adapters``).
        """
        model: nn.Module = self  # type: ignore[assignment]
        config = DEFAULT_CONFIG if config is None else config
        was_active = False
        if overwrite_ok and adapter_name in _model.list_adapters(model):
            resolve_config(config)  # a bad config raises before the old adapter goes
            was_active = _model.active_adapter(model) == adapter_name
            _model.delete_adapter(model, adapter_name)
        _model.add_adapter(model, adapter_name, config)
        if set_active or was_active:
            self.set_active_adapters(adapter_name)

    def train_adapter(self, adapter_setup: Any, train_embeddings: bool = False, train_head: bool = True) -> None:
        """Train ``adapter_setup`` (a name, or a composition the free ``train_adapter`` accepts):
        every other parameter is frozen, the setup becomes active, the model goes to training mode.

        train_head: also train the task's prediction head: for a plain task model the parameters
        outside ``base_model`` (e.g. ``classifier``); for an ``AutoAdapterModel`` the head the
        setup activates (the head named like its last adapter, else the active head).
        ``train_head=False`` freezes it. ``train_embeddings=True`` is not supported (ValueError).
        """
        if train_embeddings:
            raise ValueError("adapter_fused: train_adapter(train_embeddings=True) is not supported; train the "
                             "embeddings by setting requires_grad on them after train_adapter")
        _model.train_adapter(self, adapter_setup, train_head=train_head)  # type: ignore[arg-type]
        self._after_activation(adapter_setup)
        self._after_train(train_head)

    def set_active_adapters(self, adapter_setup: Any, skip_layers: list[int] | None = None) -> None:
        """Run ``adapter_setup`` in every forward pass: a name, a list, a composition (as far as the
        free ``set_active_adapters`` supports it), or None for the base model alone."""
        if skip_layers is not None:
            raise ValueError("adapter_fused: set_active_adapters(skip_layers=...) is not supported")
        _model.set_active_adapters(self, adapter_setup)  # type: ignore[arg-type]
        self._after_activation(adapter_setup)

    @property
    def active_adapters(self) -> Any:
        """The active adapter setup (a name, a composition, or None); settable."""
        return _model.active_adapter(self)  # type: ignore[arg-type]

    @active_adapters.setter
    def active_adapters(self, adapter_setup: Any) -> None:
        self.set_active_adapters(adapter_setup)

    @property
    def adapters(self) -> list[str]:
        """The names of the model's adapters, in the order they were added."""
        return _model.list_adapters(self)  # type: ignore[arg-type]

    def has_adapters(self) -> bool:
        """Whether the model has any adapter."""
        return bool(_model.list_adapters(self))  # type: ignore[arg-type]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; as in AdapterHub, an unknown name only logs a warning."""
        if adapter_name not in _model.list_adapters(self):  # type: ignore[arg-type]
            logger.warning("adapter_fused: no adapter named %r to delete", adapter_name)
            return
        _model.delete_adapter(self, adapter_name)  # type: ignore[arg-type]

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict[str, Any]]:
        """A table of the adapters as a string, as AdapterHub prints it: name, architecture,
        #param, %param (of the model's other parameters), active, train, then a "Full model" row.
        ``as_dict=True`` returns the rows as dicts. ``adapter_fused.adapter_summary(model)`` gives
        the structured ``AdapterSummary`` (placement, bottleneck, activation...)."""
        summary = _model.adapter_summary(self)  # type: ignore[arg-type]
        base = summary.base_parameters
        rows: list[dict[str, Any]] = [
            {"name": a.name, "architecture": "bottleneck", "#param": a.parameters,
             "%param": 100 * a.parameters / base if base else 0.0, "active": a.active, "train": a.trainable}
            for a in summary.adapters
        ]
        frozen = all(not p.requires_grad for p in self.base_model.parameters()  # type: ignore[attr-defined]
                     if id(p) not in _adapter_parameter_ids(self))
        rows.append({"name": "Full model", "#param": base, "%param": 100.0, "train": not frozen})
        if as_dict:
            return rows
        header = f"{'name':<20}{'architecture':<14}{'#param':>14}{'%param':>11}  {'active':<7}{'train':<5}"
        lines = ["=" * len(header), header, "-" * len(header)]
        for row in rows:
            if row is rows[-1]:
                lines.append("-" * len(header))
            active = str(row["active"]) if "active" in row else ""
            lines.append(f"{row['name']:<20}{row.get('architecture') or '':<14}{row['#param']:>14,}"
                         f"{row['%param']:>11.3f}  {active:<7}{row['train']!s:<5}")
        lines.append("=" * len(header))
        return "\n".join(lines)

    # -- adapter fusion (see ``fusion``) ------------------------------------------------------------

    def add_adapter_fusion(self, adapter_names: Any, config: Any = None, name: str | None = None,
                           overwrite_ok: bool = False, set_active: bool = False) -> None:
        """Add the fusion of ``adapter_names`` (a Fuse block, a list of adapter names or a comma-separated
        string) with ``config`` (``"dynamic"`` by default, ``"static"``, a dict or a ``FusionConfig``),
        named ``name`` (default: as its Fuse block is); ``set_active`` activates it."""
        added = _fusion.add_adapter_fusion(self, adapter_names, config, name, overwrite_ok)  # type: ignore[arg-type]
        if set_active:
            self.set_active_adapters(_fuse_block(self, added))  # type: ignore[arg-type]

    def delete_adapter_fusion(self, adapter_names: Any) -> None:
        """Remove a fusion (an unknown one only logs a warning, as in AdapterHub)."""
        if _fusion.fusion_name(adapter_names) not in _fusion.list_fusions(self):  # type: ignore[arg-type]
            logger.warning("adapter_fused: no adapter fusion named %r to delete", _fusion.fusion_name(adapter_names))
            return
        _fusion.delete_adapter_fusion(self, adapter_names)  # type: ignore[arg-type]

    def train_adapter_fusion(self, adapter_setup: Any, unfreeze_adapters: bool = False) -> None:
        """Train the fusions of the Fuse blocks in ``adapter_setup`` (the adapters too with
        ``unfreeze_adapters``); everything else frozen, the setup active, training mode."""
        _fusion.train_adapter_fusion(self, adapter_setup, unfreeze_adapters, train_head=True)  # type: ignore[arg-type]
        self._after_activation(adapter_setup)
        self._after_train(True)

    def get_fusion_regularization_loss(self) -> torch.Tensor | None:
        """AdapterHub's regularization of the fusions' value matrices being trained (see ``fusion``)."""
        return _fusion.fusion_regularization_loss(self)  # type: ignore[arg-type]

    def save_adapter_fusion(self, save_directory: str | os.PathLike[str], adapter_names: Any,
                            with_head: bool | str = False, use_safetensors: bool = False) -> None:
        """Save a fusion in AdapterHub's files (``adapter_fusion_config.json`` and its weights, a torch
        state dict unless ``use_safetensors``); with ``with_head`` also the head named like the fusion
        (or ``with_head`` itself, a head name)."""
        name = _fusion.fusion_name(adapter_names)
        formats.save_adapter_fusion(self, name, save_directory, use_safetensors)  # type: ignore[arg-type]
        if with_head:
            head = self._head_to_save(with_head if isinstance(with_head, str) else name)
            if head is None:
                raise ValueError(f"adapter_fused: no head named {with_head if isinstance(with_head, str) else name!r} "
                                 f"to save with the fusion")
            formats.write_head(self, head, save_directory)  # type: ignore[arg-type]

    def load_adapter_fusion(self, adapter_fusion_name_or_path: str | os.PathLike[str], load_as: str | None = None,
                            set_active: bool = False, with_head: bool = True) -> str:
        """Load a fusion saved by ``save_adapter_fusion`` or AdapterHub (its adapters must be loaded);
        returns its name. With ``with_head``, a head saved beside it is loaded too."""
        head = self._read_head(adapter_fusion_name_or_path) if with_head else None
        name = formats.load_adapter_fusion(self, adapter_fusion_name_or_path, load_as)  # type: ignore[arg-type]
        if head is not None:
            self._install_head(name, head)
        if set_active:
            self.set_active_adapters(_fuse_block(self, name))  # type: ignore[arg-type]
        return name

    # -- saving and loading ---------------------------------------------------------------------

    def save_adapter(self, save_directory: str | os.PathLike[str], adapter_name: str, with_head: bool = True) -> None:
        """Save adapter ``adapter_name`` to ``save_directory`` (AdapterHub's argument order); see
        ``adapter_fused.hf.save_adapter``. with_head: also save the task head (a plain task model's
        own head; for an ``AutoAdapterModel`` the adapter's prediction head)."""
        head = self._head_to_save(adapter_name) if with_head else None
        formats.write_adapter(self, adapter_name, save_directory, head)  # type: ignore[arg-type]

    def load_adapter(self, adapter_name_or_path: str | os.PathLike[str], load_as: str | None = None,
                     with_head: bool = True, set_active: bool = False) -> str:
        """Load the adapter saved in the directory ``adapter_name_or_path`` (by ``save_adapter`` or
        AdapterHub) under ``load_as`` (default: its saved name) and return that name.

        with_head: also restore the head saved beside it (see ``save_adapter``); for an
        ``AutoAdapterModel`` the head is created (or replaced) under the adapter's name.
        set_active: activate the adapter (and so its head).
        An adapter of the same name already on the model is overwritten, as in AdapterHub (with a
        warning), when its config is the same; a different config raises ValueError. Only local
        directories are read (no hub downloads). On an error the model is left as it was.
        """
        model: nn.Module = self  # type: ignore[assignment]
        if not os.path.isdir(adapter_name_or_path):
            raise FileNotFoundError(f"adapter_fused: {adapter_name_or_path!r} is not a directory; load_adapter reads "
                                    f"adapters saved to a local directory (no downloads from a hub)")
        head = self._read_head(adapter_name_or_path) if with_head else None
        if load_as is None:
            name = formats.saved_adapter_name(adapter_name_or_path)
        else:
            name = load_as
        created = not (name is not None and name in _model.list_adapters(model))
        if created:
            name = formats.load_adapter(model, adapter_name_or_path, load_as, with_head=with_head)
        else:
            name = _overwrite_adapter(model, adapter_name_or_path, name, with_head)  # type: ignore[arg-type]
        if head is not None:
            try:
                self._install_head(name, head)
            except BaseException:
                if created:
                    _model.delete_adapter(model, name)
                raise
        if set_active:
            self.set_active_adapters(name)
        return name

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, plus the adapter setup file (``formats.write_setup``, written
        by the main process only), so that ``from_pretrained`` of this package restores it."""
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("is_main_process", True):
            formats.write_setup(self, save_directory)  # type: ignore[arg-type]
        return result

    # -- hooks for models with prediction heads (overridden in ``FlexibleHeadsMixin``) --------------

    def _after_activation(self, adapter_setup: Any) -> None:
        """Called after the active adapters change."""

    def _after_train(self, train_head: bool) -> None:
        """Called at the end of ``train_adapter``."""

    def _head_to_save(self, adapter_name: str) -> HeadToSave | None:
        """The head ``save_adapter`` writes beside adapter ``adapter_name``: the task head, if any."""
        return formats.task_head(self, adapter_name)  # type: ignore[arg-type]

    def _read_head(self, directory: str | os.PathLike[str]) -> Any:
        """A head saved beside an adapter, checked before anything changes; None when there is none."""
        return None

    def _install_head(self, name: str, head: Any) -> None:
        """Install what ``_read_head`` returned as the head of adapter ``name``."""


def _fuse_block(model: nn.Module, name: str) -> Fuse:
    """The Fuse block that runs the fusion ``name`` of ``model``."""
    adapters = _fusion.get_fusion(model, name).adapter_names
    return Fuse(*adapters, name=None if name == ",".join(adapters) else name)


def _repeated(value: Any, n: int) -> Any:
    return value.repeat(n, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) and value.dim() else value


def _generate(self: nn.Module, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
    """transformers' ``generate``; while a Parallel composition of n children is active, its
    batch-first inputs are repeated once (copy-major, as AdapterHub does) and generation runs on the
    n*B rows, so it returns n*B sequences, copy i (rows i*B to (i+1)*B) from child i.

    ``adapter_names=[...]``: one name per prompt (None or ``"__base__"``: the base model), each prompt's
    sequences (beams, samples) generated with its adapter, as ``per_sample_adapters`` runs them."""
    base_generate = type(self)._fused_base_class.generate  # type: ignore[attr-defined]
    if adapter_names is not None:
        with per_sample_adapters(self, adapter_names):
            return base_generate(self, *args, **kwargs)
    state = _model.model_state(self)
    active = state.active if state is not None else None
    n = active.parallel_channels if isinstance(active, Composition) else 1
    if n == 1 or state.call.batch is not None:  # type: ignore[union-attr]
        return base_generate(self, *args, **kwargs)
    args = tuple(_repeated(value, n) if i == 0 else value for i, value in enumerate(args))
    kwargs = {k: _repeated(v, n) if k == "inputs" or k in BATCH_FIRST else v for k, v in kwargs.items()}
    with replicated_for_generation(state):
        return base_generate(self, *args, **kwargs)


def _adapter_parameter_ids(model: Any) -> set[int]:
    state = _model.model_state(model)
    return {id(p) for p in state.modules.parameters()} if state is not None else set()


def _overwrite_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str, with_head: bool) -> str:
    """Load ``directory`` over the existing adapter ``name`` (same config required): its weights are
    copied into the existing parameters, which keep their identity and ``requires_grad``."""
    staging = f"loading_{name}"
    while staging in _model.list_adapters(model):
        staging = "_" + staging
    logger.warning("adapter_fused: overwriting the weights of existing adapter %r with %s", name, directory)
    formats.load_adapter(model, directory, staging, with_head=with_head)
    try:
        old, new = _model.adapter_config(model, name), _model.adapter_config(model, staging)
        if old != new:
            raise ValueError(f"adapter_fused: cannot load {os.fspath(directory)!r} over adapter {name!r}: its config "
                             f"{new} differs from the existing {old}; delete the adapter or pass load_as")
        source = _model.adapter_modules(model, staging).state_dict()
        with torch.no_grad():
            for key, parameter in _model.adapter_modules(model, name).state_dict(keep_vars=True).items():
                parameter.copy_(source[key])
    finally:
        _model.delete_adapter(model, staging)
    return name


def init(model: M) -> M:
    """Give a supported transformers ``model`` AdapterHub's adapter methods (``add_adapter``,
    ``train_adapter``, ``set_active_adapters``, ``load_adapter``, ``save_adapter``,
    ``delete_adapter``, ``adapter_summary``) and make its ``save_pretrained`` record its adapters.
    Returns ``model`` itself (AdapterHub's ``adapters.init`` returns nothing); calling it again
    changes nothing. Raises ValueError, leaving the model as it was, for an unsupported model.
    """
    if isinstance(model, AdapterMethodsMixin):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapter_fused.init expects a transformers model, got {type(model).__name__}")
    find_architecture(model)
    model.__class__ = subclass_for(type(model), AdapterMethodsMixin)
    return model


class FlexibleHeadsMixin(AdapterMethodsMixin):
    """Named prediction heads on a base model; see the module docstring."""

    accepts_loss_kwargs = False  # the heads average their loss themselves

    @classmethod
    def _prepare_subclass(cls, subclass: type) -> None:
        """Give the subclass a ``forward`` that runs the heads, with the base forward's parameters
        plus the label inputs in its signature (read by transformers' Trainer)."""
        super()._prepare_subclass(subclass)

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

    def add_masked_lm_head(self, head_name: str, activation_function: str | None = "gelu", layers: int = 2,
                           overwrite_ok: bool = False) -> None:
        """Add a masked language modelling head (logits (batch, length, vocab), loss against ``labels``
        at each position, -100 ignored) and make it active."""
        self._add(MaskedLMHead, head_name, overwrite_ok, activation_function=activation_function, layers=layers,
                  layer_norm=True, bias=True)

    def add_seq2seq_lm_head(self, head_name: str, layers: int = 1, overwrite_ok: bool = False) -> None:
        """Add a sequence-to-sequence language modelling head on an encoder-decoder model (logits
        (batch, target length, vocab) from the decoder; with ``labels`` and no ``decoder_input_ids``
        the decoder reads the labels shifted right) and make it active."""
        self._add(Seq2SeqLMHead, head_name, overwrite_ok, activation_function=None, layers=layers, layer_norm=False,
                  bias=False)

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
        if "task_ids" in kwargs:
            with given_task_ids(kwargs.pop("task_ids")):
                return self._heads_forward(*args, **kwargs)
        head_name = kwargs.pop("head", None)
        targets: dict[str, Any] = {k: kwargs.pop(k) for k in ("labels", "start_positions", "end_positions") if k in kwargs}
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
        head.prepare(self, kwargs, targets)  # type: ignore[arg-type]
        outputs = base_forward(self, **kwargs)
        result = head.predict(self, outputs, inputs, targets)  # type: ignore[arg-type]
        return result if return_dict else result.to_tuple()

    # -- hooks of the adapter methods ------------------------------------------------------------

    def _after_activation(self, adapter_setup: Any) -> None:
        name = head_name_for(adapter_setup)
        if name is not None and name in self.heads:
            self.active_head = name

    def _after_train(self, train_head: bool) -> None:
        active = self.active_head
        for name, head in self.heads.items():
            for parameter in head.parameters():
                parameter.requires_grad_(bool(train_head and name == active))

    def _head_to_save(self, adapter_name: str) -> HeadToSave | None:
        head: PredictionHead | None = None
        if adapter_name in self.heads:
            head = self.heads[adapter_name]  # type: ignore[assignment]
        elif self.active_head is not None and head_name_for(self.active_adapters) == adapter_name:
            head = self.heads[self.active_head]  # type: ignore[assignment]
        return None if head is None else HeadToSave(head.name, head.config, head.state_dict())

    def _read_head(self, directory: str | os.PathLike[str]) -> PredictionHead | None:
        saved = formats.read_head(self, directory, prediction=True)  # type: ignore[arg-type]
        if saved is None:
            return None
        try:
            head = build_head(self, saved.name, saved.config)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{saved.config_path}: invalid head config ({exc})") from exc
        load_head_weights(head, saved.tensors(), str(saved.weights_path))
        return head

    def _install_head(self, name: str, head: PredictionHead) -> None:
        head.name = name
        self.add_prediction_head(head, overwrite_ok=True, set_active=True)


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
             for n in ("labels", "start_positions", "end_positions", "head", "task_ids") if n not in names]
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
