"""Adapters on bitsandbytes-quantized bases (4-bit nf4 and fp4, 8-bit), QLoRA-style: a tiny Llama saved
and reloaded through transformers' ``BitsAndBytesConfig`` on the CPU, an adapter trained on it (the loss
goes down, only adapter parameters get gradients, the quantized base is unchanged), saved (adapter files
only) and loaded into a freshly quantized base with the same outputs.

Skipped where bitsandbytes is missing or cannot quantize and run a layer on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adapter_fused import AdapterConfig, add_adapter, load_adapter, save_adapter, set_active_adapters, train_adapter

from ..convergence.training import make_batch, one_thread, task_model  # noqa: F401 (one_thread: autouse fixture)
from ..tolerances import relative_error

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")  # transformers quantizes through accelerate


def _bitsandbytes_runs() -> str | None:
    """Why bitsandbytes cannot run a quantized layer here, or None when it can."""
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 64)
        for layer in (bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"),
                      bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)):
            layer = layer.to("cpu")  # quantizes
            if not torch.isfinite(layer(x)).all():
                return f"{type(layer).__name__} gives non-finite outputs"
    except Exception as error:  # noqa: BLE001 (any failure of the backend on this machine)
        return f"bitsandbytes {bnb.__version__} cannot run on this machine: {type(error).__name__}: {error}"
    return None


_REASON = _bitsandbytes_runs()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

QUANTIZATIONS: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}
STEPS = 8




@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (width 64, 2 layers, untied lm_head) saved in float32. Width 64: on CPUs
    with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference in blocks of 64 input features
    and fails on narrower layers."""
    directory = tmp_path_factory.mktemp("llama")
    task_model("llama", hidden=64).save_pretrained(directory)
    return directory


def quantized(directory: Path, kind: str, quantization: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """The model at ``directory`` quantized on load (``quantization``: options over those of ``kind``);
    checks that its layers' linear layers are."""
    config = transformers.BitsAndBytesConfig(**{**QUANTIZATIONS[kind], **(quantization or {})})
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu",
                                                              **kwargs)
    layer = model.model.layers[0].self_attn.q_proj
    expected = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert isinstance(layer, expected) and layer.weight.dtype in (torch.uint8, torch.int8), type(layer)
    return model


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base tensor of the state dict (quantized weights and their quantization state included)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()
            if "fused_adapters." not in n and isinstance(t, torch.Tensor)}


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    batch = make_batch("causal", seed=9)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_adapter_trains_saves_and_loads_on_a_quantized_base(base_dir: Path, kind: str, tmp_path: Path,
                                                            launches) -> None:  # type: ignore[no-untyped-def]
    model = quantized(base_dir, kind)
    before = base_state(model)
    add_adapter(model, "a", AdapterConfig("houlsby", reduction_factor=4))
    train_adapter(model, "a", train_head=False)
    adapter_names = {n for n, _ in model.named_parameters() if "fused_adapters.a." in n}
    assert len(adapter_names) == 16  # 2 layers x 2 sites x (down, up) x (weight, bias)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch("causal", seed=0)
    losses = []
    for step in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == adapter_names, sorted(with_grad ^ adapter_names)
            assert all(p.grad is not None and p.grad.abs().max() > 0
                       for n, p in model.named_parameters() if n in adapter_names)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert len(launches) > 0
    after = base_state(model)
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"training changed base tensors: {changed}"

    save_adapter(model, "a", tmp_path, with_head=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(model.get_parameter(n).numel() for n in adapter_names)
    base_shapes = {tuple(t.shape) for n, t in before.items() if t.dim() == 2}
    assert not any(tuple(t.shape) in base_shapes for t in saved.values()), "a base-shaped tensor was saved"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["name"] == "a"

    trained = logits(model)
    fresh = quantized(base_dir, kind)
    plain = logits(fresh)
    assert load_adapter(fresh, tmp_path) == "a"
    set_active_adapters(fresh, "a")
    assert relative_error(trained, plain) > 1e-2, "the adapter changes nothing: the comparison below would be empty"
    err = relative_error(logits(fresh), trained)
    assert err <= 1e-6, f"{kind}: a fresh quantized base with the loaded adapter differs by {err:.2e}"


def test_default_save_writes_no_frozen_base_weights(base_dir: Path, tmp_path: Path) -> None:
    model = quantized(base_dir, "nf4")
    add_adapter(model, "a", AdapterConfig("pfeiffer", reduction_factor=4))
    train_adapter(model, "a", train_head=False)
    save_adapter(model, "a", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def bf16_base(base_dir: Path) -> nn.Module:
    """The QLoRA setting: nf4 weights, bf16 compute, the rest of the model in bf16."""
    return quantized(base_dir, "nf4", dtype=torch.bfloat16,
                     quantization={"bnb_4bit_compute_dtype": torch.bfloat16})


def test_bf16_quantized_base_trains_under_autocast(base_dir: Path, launches) -> None:  # type: ignore[no-untyped-def]
    model = bf16_base(base_dir)
    add_adapter(model, "a", AdapterConfig("houlsby", reduction_factor=4))
    train_adapter(model, "a", train_head=False)
    batch = make_batch("causal", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "fused_adapters.a." in n]
    assert len(grads) == 16 and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    assert len(launches) > 0


def test_bf16_quantized_base_trains(base_dir: Path, launches) -> None:  # type: ignore[no-untyped-def]
    """Without autocast: the adapters take the dtype of the layers' float parameters (bf16), not of
    their first parameter (the packed uint8 q_proj weight)."""
    model = bf16_base(base_dir)
    add_adapter(model, "a", AdapterConfig("houlsby", reduction_factor=4))
    train_adapter(model, "a", train_head=False)
    adapters = {n: p for n, p in model.named_parameters() if "fused_adapters.a." in n}
    assert len(adapters) == 16 and {p.dtype for p in adapters.values()} == {torch.bfloat16}
    model(**make_batch("causal", seed=0)).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in adapters.values())
    assert len(launches) > 0
