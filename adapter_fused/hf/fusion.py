"""AdapterFusion, as AdapterHub computes it: the fusion layers a ``Fuse`` block runs, their config, and
adding, training and removing them.

    add_adapter_fusion(model, Fuse("a", "b"))         # "dynamic" by default, as in AdapterHub
    train_adapter_fusion(model, Fuse("a", "b"))       # only the fusion layers (and the head) train
    set_active_adapters(model, Fuse("a", "b"))

A fusion named like its ``Fuse`` block (the adapter names joined by commas unless given a ``name``) has
one ``FusionLayer`` at every site its adapters hold (at every layer, those left out included, as in
AdapterHub), kept in the model's ``fused_adapters["fusion"][<name>][<layer>][<site>]`` (state-dict keys
``...fused_adapters.fusion.<name>.<layer>.<site>.{query,key,value}.*``). At a site, for the adapters'
terms t_i = s_i f_i(z) (..., n, d), a query q (..., d) and the residual r (see ``compose``):

    scores_i = Q(q) . K(t_i)          (dropout on the scores in training)
    p = softmax(scores / T)           (T: 1, or 50 decaying by 0.05 per call down to 1 with ``temperature``)
    out = sum_i p_i V(t_i) + r        (V after the sum with ``value_before_softmax=False``; r added to
                                       each t_i before the attention instead with ``residual_before``)

with Q, K (d x d, bias) and V (d x d, no bias) each the identity where the config turns it off. The
adapters themselves run in the fused kernel; the attention is plain PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .composition import FUSION_KEY, Composition, Fuse, parse_setup
from .config import SITES
from .layouts import layer_widths, model_layers
from .model import layer_sites, model_state, require_adapter, train_adapter


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """AdapterHub's ``AdapterFusionConfig``: the same fields, defaults (its ``"dynamic"`` config) and meaning.

    key, query, value: learn K, Q, V (else the identity); query_before_ln: the query is the sub-block
    output h rather than the adapters' input z; regularization: recorded only (as in AdapterHub,
    ``fusion_regularization_loss`` counts every V being trained); residual_before: add the residual to each term before the attention;
    temperature: divide the scores by a temperature falling from 50 to 1; value_before_softmax: apply
    V to the terms (else to the attended sum); value_initialized: start V at the identity (1e-6 off
    the diagonal); dropout_prob: dropout on the scores (None: the model's
    ``attention_probs_dropout_prob``, or 0)."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as AdapterHub writes it in ``adapter_fusion_config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, config: object = None) -> FusionConfig:
        """A FusionConfig from None (``"dynamic"``), a preset name (``"dynamic"``, ``"static"``), a dict of
        fields (AdapterHub's ``to_dict()``), an AdapterHub ``AdapterFusionConfig`` or a FusionConfig."""
        if config is None:
            return FUSION_PRESETS["dynamic"]
        if isinstance(config, FusionConfig):
            return config
        if isinstance(config, str):
            if config not in FUSION_PRESETS:
                raise ValueError(f"adapter_fused: unknown fusion config {config!r} (presets: {', '.join(FUSION_PRESETS)})")
            return FUSION_PRESETS[config]
        if not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
            config = config.to_dict()  # type: ignore[attr-defined]
        if not isinstance(config, Mapping):
            raise TypeError(f"adapter_fused: a fusion config is a preset name, a dict or a FusionConfig, got "
                            f"{type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields - {"architecture"})
        if unknown:
            raise ValueError(f"adapter_fused: fusion config options not supported: {', '.join(unknown)}")
        values = {k: v for k, v in config.items() if k in fields}
        for key, value in values.items():
            if key == "dropout_prob":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 <= value < 1):
                    raise ValueError(f"adapter_fused: fusion dropout_prob must be None or in [0, 1), got {value!r}")
            elif not isinstance(value, (bool, str)):
                raise ValueError(f"adapter_fused: fusion config {key} must be True or False, got {value!r}")
        values = {k: (v if k == "dropout_prob" else _flag(v)) for k, v in values.items()}
        return cls(**values)


def _flag(value: bool | str) -> bool:
    """A boolean option (AdapterHub types ``value_initialized`` as a string but stores booleans)."""
    return value if isinstance(value, bool) else value.strip().lower() not in ("", "false", "0", "no")


FUSION_PRESETS: dict[str, FusionConfig] = {
    "dynamic": FusionConfig(),
    "static": FusionConfig(value=False, regularization=False, value_initialized=False),
}
"""AdapterHub's fusion configs by name (``"dynamic"`` is its default)."""


class FusionLayer(nn.Module):
    """The fusion attention at one site; see the module docstring. Called as ``layer(query, terms,
    residual)`` with query and residual (..., d) and the adapters' terms (..., n, d); returns (..., d)."""

    query: nn.Linear  # each present where the config turns it on
    key: nn.Linear
    value: nn.Linear

    def __init__(self, config: FusionConfig, d_model: int, dropout: float, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if not (config.query or config.key or config.value):
            self.dense = nn.Linear(d_model, 1, **kw)  # AdapterHub has it (and never uses it); kept for its files
        if config.query:
            self.query = nn.Linear(d_model, d_model, **kw)
        if config.key:
            self.key = nn.Linear(d_model, d_model, **kw)
        if config.value:
            self.value = nn.Linear(d_model, d_model, bias=False, **kw)
        self.dropout = nn.Dropout(dropout)
        self.temperature = 50.0 if config.temperature else 1.0
        self.cooling = self.temperature / 1000.0
        self.reset_parameters()

    @property
    def query_before_ln(self) -> bool:
        return self.config.query_before_ln

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights normal (std 0.02), biases zero; V the identity plus 1e-6 off the diagonal with
        ``value_initialized`` (AdapterHub's initialisation)."""
        for module in self.children():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.value and self.config.value_initialized:
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, query: torch.Tensor, terms: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.residual_before:
            terms = terms + residual.unsqueeze(-2)
        q = self.query(query) if config.query else query
        k = self.key(terms) if config.key else terms
        v = self.value(terms) if config.value and config.value_before_softmax else terms
        scores = self.dropout(torch.matmul(k, q.unsqueeze(-1)).squeeze(-1))  # (..., n)
        probs = F.softmax(scores / self.temperature, dim=-1)
        self.temperature = max(self.temperature - self.cooling, 1.0)
        out = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
        if config.value and not config.value_before_softmax:
            out = self.value(out)
        return out if config.residual_before else out + residual

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


class FusionBlock(nn.ModuleDict):
    """The fusion layers of one fusion, ``{layer: {site: FusionLayer}}``, with its ``config`` and the
    names of the adapters it fuses (``adapter_names``)."""

    def __init__(self, config: FusionConfig, adapter_names: Sequence[str], layers: dict[str, nn.ModuleDict]) -> None:
        super().__init__(layers)
        self.config = config
        self.adapter_names = tuple(adapter_names)


def fusion_name(fusion: Fuse | Sequence[str] | str) -> str:
    """The name of a fusion given as a Fuse block, a list of adapter names or the name itself."""
    if isinstance(fusion, Fuse):
        return fusion.name
    if isinstance(fusion, str):
        return fusion
    if isinstance(fusion, Sequence) and fusion and all(isinstance(n, str) for n in fusion):
        return ",".join(fusion)
    raise ValueError(f"adapter_fused: a fusion is named by a Fuse block, a list of adapter names or a name, got "
                     f"{fusion!r}")


def _fused_names(fusion: Fuse | Sequence[str] | str) -> list[str]:
    """The adapters a fusion added as ``fusion`` fuses (a Fuse's children, their last adapters for Stacks)."""
    if isinstance(fusion, Fuse):
        return [c if isinstance(c, str) else c.last() for c in fusion.children]  # type: ignore[union-attr]
    if isinstance(fusion, str):
        return fusion.split(",")
    return list(fusion)


def fusions(model: nn.Module) -> nn.ModuleDict | None:
    """The model's fusions, ``{name: FusionBlock}``, or None where it has none."""
    state = model_state(model)
    if state is None or FUSION_KEY not in state.modules:
        return None
    return state.modules[FUSION_KEY]  # type: ignore[return-value]


def list_fusions(model: nn.Module) -> list[str]:
    """The names of the model's fusions, in the order they were added."""
    found = fusions(model)
    return list(found) if found is not None else []


def get_fusion(model: nn.Module, fusion: Fuse | Sequence[str] | str) -> FusionBlock:
    """The fusion named by ``fusion``; KeyError naming the known ones otherwise."""
    name, found = fusion_name(fusion), fusions(model)
    if found is None or name not in found:
        raise KeyError(f"adapter_fused: no adapter fusion named {name!r} (fusions: {', '.join(list_fusions(model)) or 'none'})")
    return found[name]  # type: ignore[return-value]


def build_fusion(model: nn.Module, adapter_names: Sequence[str], config: FusionConfig) -> FusionBlock:
    """Freshly initialised fusion layers for ``adapter_names`` (adapters of ``model``): one per layer at
    each site the adapters hold, on the layer's device and dtype. ValueError when the adapters sit at
    different sites (AdapterHub fuses only adapters of one placement)."""
    if len(adapter_names) < 1:
        raise ValueError("adapter_fused: a fusion needs at least one adapter")
    configs = [require_adapter(model, name).configs[name] for name in adapter_names]
    _, layers = model_layers(model)
    sites = {name: [layer_sites(c, layer) for layer in layers] for name, c in zip(adapter_names, configs)}
    if len({tuple(s) for s in sites.values()}) > 1:
        raise ValueError(f"adapter_fused: adapters {', '.join(adapter_names)} sit at different sites (placements "
                         f"{', '.join(str(c.layout) for c in configs)}); a fusion needs them at the same ones")
    dropout = config.dropout_prob
    if dropout is None:
        dropout = float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0) or 0)
    out: dict[str, nn.ModuleDict] = {}
    for layer, width, names in zip(layers, layer_widths(model), sites[adapter_names[0]]):
        if not names:
            continue
        reference = next(layer.module.parameters(), None)
        kw: dict[str, Any] = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
        out[str(layer.index)] = nn.ModuleDict({site: FusionLayer(config, width, dropout, **kw)
                                               for site in SITES if site in names})
    block = FusionBlock(config, adapter_names, out)
    block.train(model.training)
    return block


def attach_fusion(model: nn.Module, name: str, block: FusionBlock) -> None:
    """Register ``block`` as the fusion ``name`` (replacing one of that name). While the model is
    prepared for training (``train_adapter``), its parameters start frozen, as new adapters do."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_fused: a fusion name must be a non-empty string without dots, got {name!r}")
    state = model_state(model)
    assert state is not None
    if state.training is not None:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    if FUSION_KEY not in state.modules:
        state.modules[FUSION_KEY] = nn.ModuleDict()
    container: nn.ModuleDict = state.modules[FUSION_KEY]  # type: ignore[assignment]
    container[name] = block


def add_adapter_fusion(model: nn.Module, adapters: Fuse | Sequence[str] | str, config: object = None,
                       name: str | None = None, overwrite_ok: bool = False) -> str:
    """Add the fusion of ``adapters`` (a Fuse block, a list of adapter names or a comma-separated
    string, as in AdapterHub) with ``config`` (see ``FusionConfig.load``; ``"dynamic"`` by default);
    returns its name (``name``, else the Fuse's name or the names joined by commas). ValueError for
    a name in use (unless ``overwrite_ok``) or adapters at different sites; KeyError for an unknown
    adapter. The model is left as it was on an error."""
    adapter_names = _fused_names(adapters)
    name = name if name is not None else fusion_name(adapters)
    block = build_fusion(model, adapter_names, FusionConfig.load(config))
    if name in list_fusions(model) and not overwrite_ok:
        raise ValueError(f"adapter_fused: an adapter fusion named {name!r} already exists; pass overwrite_ok=True "
                         f"to replace it")
    attach_fusion(model, name, block)
    return name


def delete_adapter_fusion(model: nn.Module, fusion: Fuse | Sequence[str] | str) -> None:
    """Remove a fusion and its parameters (KeyError for an unknown one); an active setup running it
    is deactivated."""
    get_fusion(model, fusion)
    name = fusion_name(fusion)
    state = model_state(model)
    assert state is not None
    container: nn.ModuleDict = state.modules[FUSION_KEY]  # type: ignore[assignment]
    del container[name]
    if not len(container):
        del state.modules[FUSION_KEY]
    for setup in ("active", "training"):
        if name in _fuse_names(getattr(state, setup)):
            setattr(state, setup, None)


def _fuse_names(setup: object) -> list[str]:
    """The fusion names of the Fuse blocks in an active setup."""
    if not isinstance(setup, Composition):
        return []
    found = [setup.name] if isinstance(setup, Fuse) else []
    return found + [n for c in setup.children for n in _fuse_names(c)]


def train_adapter_fusion(model: nn.Module, setup: object, unfreeze_adapters: bool = False,
                         train_head: bool = True) -> None:
    """Prepare ``model`` to train the fusions of the Fuse blocks in ``setup``: as ``train_adapter``
    (everything else frozen, the setup active, training mode, the task head trained with
    ``train_head``), but the adapters themselves stay frozen unless ``unfreeze_adapters``."""
    parsed = parse_setup(setup)
    names = _fuse_names(parsed)
    if not names:
        raise ValueError(f"adapter_fused: train_adapter_fusion needs a setup holding a Fuse block, got {setup!r}")
    blocks = [get_fusion(model, name) for name in names]
    train_adapter(model, parsed, train_head=train_head)  # type: ignore[arg-type]
    state = model_state(model)
    assert state is not None
    if not unfreeze_adapters:
        for name in parsed.flatten():  # type: ignore[union-attr]
            for parameter in state.modules[name].parameters():
                parameter.requires_grad_(False)
    for block in blocks:
        for parameter in block.parameters():
            parameter.requires_grad_(True)


def fusion_regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """AdapterHub's fusion regularization: ``0.01 * sum ||I - V||^2`` over the value matrices being
    trained (fusions with ``value``); None when there are none. AdapterHub's trainer adds it to the loss."""
    total = None
    found = fusions(model)
    for fusion in found.modules() if found is not None else ():
        if not isinstance(fusion, FusionLayer) or not fusion.config.value or not fusion.value.weight.requires_grad:
            continue
        weight = fusion.value.weight
        term = 0.01 * (torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype) - weight).pow(2).sum()
        total = term if total is None else total + term
    return total
