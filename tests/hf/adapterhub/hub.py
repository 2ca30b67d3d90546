"""Models with adapters added by AdapterHub, for the tests of the AdapterHub bridge."""

from __future__ import annotations

import pytest
import torch

from ..models import make_model, randomize

CONFIGS = ["seq_bn", "double_seq_bn", "par_bn"]


def adapterhub_model(arch: str, config: object, name: str = "hub") -> torch.nn.Module:
    """A tiny model of ``arch`` with AdapterHub's adapter ``name`` of ``config`` (random weights), active, in
    eval mode."""
    adapters = pytest.importorskip("adapters")
    model = make_model(arch)
    adapters.init(model)
    model.add_adapter(name, config=config)
    randomize([p for n, p in model.named_parameters() if f"adapters.{name}." in n])
    model.set_active_adapters(name)
    return model.eval()
