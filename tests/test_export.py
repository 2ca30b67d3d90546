"""ONNX export (``torch.onnx.export(..., dynamo=True)``) of the fused op, the layer and models with active
adapters: the exported graph holds plain operators (matrix products, the activation, additions) in place
of the kernels' operator, and onnxruntime computes what torch computes.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py``), so the export below starts
from the path that launches the fused kernel, as it would on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapter_fused import FusedAdapter, fused_adapter_grouped, ops

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def exported(module: nn.Module, *args: torch.Tensor) -> tuple[list[str], list[object]]:
    """The op types of ``module`` exported to ONNX, and onnxruntime's outputs on ``args``."""
    program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    ops_used = sorted({node.op_type for node in model.graph.node})
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    assert not domains, f"custom operators left in the graph: {domains}"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return ops_used, session.run(None, feeds)


class Pfeiffer(nn.Module):
    """An adapter given a residual other than its input: ``h + s * f(h + x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = FusedAdapter(32, 8, "gelu", scale=0.5)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(h + x, residual=h)


@pytest.mark.parametrize("path", ["kernels", "plain"])
def test_layer_exports_to_plain_operators(path: str, launches, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    if path == "plain":
        monkeypatch.setattr(ops, "kernels_available", lambda device: False)
    torch.manual_seed(0)
    layer = Pfeiffer().eval()
    nn.init.normal_(layer.adapter.up.weight, std=0.2)
    h, x = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        launches.clear()
        want = layer(h, x)
        assert (len(launches) == 1) == (path == "kernels")  # the path the export starts from
    used, (got,) = exported(layer, h, x)
    assert {"MatMul", "Add"} <= set(used) or {"Gemm", "Add"} <= set(used), used
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_grouped_op_exports() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.down_w = nn.Parameter(0.3 * torch.randn(3, 8, 32, generator=g))
            self.down_b = nn.Parameter(0.1 * torch.randn(3, 8, generator=g))
            self.up_w = nn.Parameter(0.3 * torch.randn(3, 32, 8, generator=g))
            self.up_b = nn.Parameter(0.1 * torch.randn(3, 32, generator=g))
            self.register_buffer("index", torch.tensor([2, -1, 0, 1]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused_adapter_grouped(x, self.index, self.down_w, self.down_b, self.up_w, self.up_b, "silu", 2.0,
                                         check_index=False)

    module = Grouped().eval()
    x = torch.randn(4, 6, 32)
    with torch.no_grad():
        want = module(x)
    _, (got,) = exported(module, x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got)[1], x[1])  # the row without an adapter


def _bert():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        max_position_embeddings=64)).eval()


class Hidden(nn.Module):
    """The model's last hidden state (a tensor output for the exporter)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_model_with_active_adapters_exports(placement: str) -> None:
    from adapter_fused import add_adapter, set_active_adapters

    model = _bert()
    base = Hidden(_bert())
    add_adapter(model, "a", placement)
    set_active_adapters(model, "a")
    for p in model.fused_adapters.parameters():
        nn.init.normal_(p, std=0.2)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = Hidden(model)(ids)
        plain = base(ids)
    _, (got,) = exported(Hidden(model), ids)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    assert (want - plain).abs().max() > 1e-2  # the adapters are in the exported graph


def test_model_with_one_adapter_per_row_exports() -> None:
    from adapter_fused import AdapterConfig, add_adapter, per_sample_adapters

    model = _bert()
    add_adapter(model, "a", "houlsby")
    add_adapter(model, "b", AdapterConfig("pfeiffer", activation="gelu"))
    for p in model.fused_adapters.parameters():
        nn.init.normal_(p, std=0.2)
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    with per_sample_adapters(model, ["a", None, "b"]):
        with torch.no_grad():
            want = Hidden(model)(ids)
        _, (got,) = exported(Hidden(model), ids)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
