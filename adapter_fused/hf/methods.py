"""AdapterHub-style methods on a transformers model: ``adapter_fused.init(model)``.

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
also records the adapters' configs and the active setup (see ``checkpoints``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, TypeVar

import torch
from torch import nn

from . import io as _io
from . import model as _model
from .config import resolve_config
from .layouts import find_architecture

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "seq_bn"
"""The config of ``model.add_adapter(name)`` without one: AdapterHub's default, the Pfeiffer adapter."""

IGNORE_ON_LOAD = (r"(^|\.)fused_adapters\.", r"^heads\.")
"""State-dict keys that transformers' ``from_pretrained`` of an init-ed class leaves for
``checkpoints.restore_adapters`` to load (instead of warning that they were not used)."""

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
    ``checkpoints.restore_adapters`` loads."""
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
        """Complete a subclass made by ``subclass_for`` (also when one is rebuilt by unpickling)."""

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        state = self.__getstate__()  # type: ignore[misc]
        return _rebuild, (type(self)._fused_mixin, type(self)._fused_base_class), state

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

    # -- saving and loading ---------------------------------------------------------------------

    def save_adapter(self, save_directory: str | os.PathLike[str], adapter_name: str, with_head: bool = True) -> None:
        """Save adapter ``adapter_name`` to ``save_directory`` (AdapterHub's argument order); see
        ``adapter_fused.hf.save_adapter``. with_head: also save the task head (a plain task model's
        own head; for an ``AutoAdapterModel`` the adapter's prediction head)."""
        _io.save_adapter(self, adapter_name, save_directory, with_head=with_head)  # type: ignore[arg-type]
        self._save_head(save_directory, adapter_name, with_head)

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
            name = _peek_name(adapter_name_or_path)
        else:
            name = load_as
        created = not (name is not None and name in _model.list_adapters(model))
        if created:
            name = _io.load_adapter(model, adapter_name_or_path, load_as, with_head=with_head)
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
        """transformers' ``save_pretrained``, plus the adapter setup file of ``checkpoints`` (written
        by the main process only), so that ``from_pretrained`` of this package restores it."""
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("is_main_process", True):
            from .checkpoints import write_setup

            write_setup(self, save_directory)  # type: ignore[arg-type]
        return result

    # -- hooks for models with prediction heads (overridden in ``heads``) -----------------------

    def _after_activation(self, adapter_setup: Any) -> None:
        """Called after the active adapters change."""

    def _after_train(self, train_head: bool) -> None:
        """Called at the end of ``train_adapter``."""

    def _save_head(self, save_directory: str | os.PathLike[str], adapter_name: str, with_head: bool) -> None:
        """Called at the end of ``save_adapter``."""

    def _read_head(self, directory: str | os.PathLike[str]) -> Any:
        """A head saved beside an adapter, checked before anything changes; None when there is none."""
        return None

    def _install_head(self, name: str, head: Any) -> None:
        """Install what ``_read_head`` returned as the head of adapter ``name``."""


def _adapter_parameter_ids(model: Any) -> set[int]:
    state = _model.model_state(model)
    return {id(p) for p in state.modules.parameters()} if state is not None else set()


def _peek_name(directory: str | os.PathLike[str]) -> str | None:
    """The name an adapter directory was saved under (None if it records none); errors come later."""
    try:
        meta = _io._read_json(_io.Path(directory) / _io.CONFIG_FILE)
    except (FileNotFoundError, ValueError):
        return None
    name = meta.get("name")
    return name if isinstance(name, str) else None


def _overwrite_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str, with_head: bool) -> str:
    """Load ``directory`` over the existing adapter ``name`` (same config required): its weights are
    copied into the existing parameters, which keep their identity and ``requires_grad``."""
    staging = f"loading_{name}"
    while staging in _model.list_adapters(model):
        staging = "_" + staging
    logger.warning("adapter_fused: overwriting the weights of existing adapter %r with %s", name, directory)
    _io.load_adapter(model, directory, staging, with_head=with_head)
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
