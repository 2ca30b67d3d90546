"""save_adapter / load_adapter: round trip, atomic writes, and refusal of damaged or foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .models import hidden_states, make_inputs, make_model, randomize

from adapter_fused.hf import (  # noqa: E402
    AdapterConfig,
    Placement,
    add_adapter,
    list_adapters,
    load_adapter,
    save_adapter,
    set_active_adapters,
)


def saved(tmp_path: Path, arch: str = "bert", config: object = "houlsby") -> tuple[Path, torch.Tensor]:
    model = make_model(arch)
    add_adapter(model, "task", config)  # type: ignore[arg-type]
    randomize(model.base_model.fused_adapters.parameters())
    set_active_adapters(model, "task")
    directory = tmp_path / "task"
    save_adapter(model, "task", directory)
    return directory, hidden_states(model, make_inputs())


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("config", ["houlsby", "pfeiffer",
                                    AdapterConfig(Placement(attention=True, ffn=False, original_ln_before=True,
                                                            residual_before_ln="post_add"),
                                                  bottleneck=5, activation="gelu", scale=0.5)])
def test_round_trip(tmp_path: Path, arch: str, config: object) -> None:
    directory, expected = saved(tmp_path, arch, config)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = make_model(arch)
    base = hidden_states(fresh, make_inputs())
    assert load_adapter(fresh, directory) == "task"
    assert torch.equal(hidden_states(fresh, make_inputs()), base)  # loaded, not active
    set_active_adapters(fresh, "task")
    assert torch.equal(hidden_states(fresh, make_inputs()), expected)
    assert not torch.allclose(expected, base, atol=1e-3)
    assert load_adapter(fresh, directory, name="copy") == "copy"
    assert list_adapters(fresh) == ["task", "copy"]


def test_config_file_contents(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path, "bert", "pfeiffer")
    meta = json.loads((directory / "adapter_config.json").read_text())
    assert meta["format"] == "adapter_fused" and meta["name"] == "task" and meta["hidden_size"] == 32
    assert meta["config"]["placement"] == "pfeiffer" and meta["num_layers"] == 2
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"{i}.ffn.{p}.{k}" for i in range(2) for p in ("down", "up")
                                     for k in ("weight", "bias"))
    assert tensors["0.ffn.down.weight"].shape == (2, 32)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _ = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model = make_model("bert")
    add_adapter(model, "task", "houlsby")
    import adapter_fused.hf.formats as formats_module

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(formats_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, "task", directory)
    monkeypatch.undo()
    # the old files are intact; only temporary files were written next to them
    for name, data in before.items():
        assert (directory / name).read_bytes() == data
    for temp in directory.glob(".*.tmp"):
        temp.unlink()
    save_adapter(model, "task", directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)


def test_truncated_weights_refused(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = make_model("bert")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: cannot read adapter weights"):
        load_adapter(model, directory)
    assert list_adapters(model) == []


def test_mismatched_weights_refused(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    with pytest.raises(ValueError, match="saved for hidden size 32, the model has 48"):
        load_adapter(make_model("bert", hidden=48), directory)
    from safetensors.torch import load_file, save_file

    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["1.ffn.up.weight"] = torch.zeros(32, 3)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 1\.ffn\.up\.weight has shape \(32, 3\)"):
        load_adapter(make_model("bert"), directory)
    del tensors["1.ffn.up.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing 1\.ffn\.up\.weight"):
        load_adapter(make_model("bert"), directory)


def test_bad_config_refused(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    config = directory / "adapter_config.json"
    text = config.read_text()
    config.write_text(text[:40])
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(make_model("bert"), directory)
    meta = json.loads(text)
    meta["config"]["activation"] = "mish"
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter_config\.json: invalid adapter config .*unknown activation 'mish'"):
        load_adapter(make_model("bert"), directory)
    config.write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="neither an adapter_fused nor an AdapterHub adapter config"):
        load_adapter(make_model("bert"), directory)
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        load_adapter(make_model("bert"), tmp_path / "nowhere")


def test_round_trip_with_adapters_after_cross_attention(tmp_path: Path) -> None:
    """T5 with ``cross_adapter=True``: the decoder layers' cross-attention adapters are saved as
    ``<layer>.cross.*`` and a fresh model loading them computes the same outputs bit for bit."""
    from safetensors.torch import load_file

    from .families import build, inputs, outputs

    model, batch = build("t5"), inputs("t5")
    add_adapter(model, "task", AdapterConfig("pfeiffer", cross_adapter=True))
    randomize(model.base_model.fused_adapters.parameters())
    set_active_adapters(model, "task")
    with torch.no_grad():
        expected = outputs(model, batch)
    save_adapter(model, "task", tmp_path)
    cross = sorted(key for key in load_file(str(tmp_path / "adapter_model.safetensors")) if ".cross." in key)
    assert {key.split(".")[0] for key in cross} == {"2", "3"}  # the decoder's layers
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["cross_adapter"] is True
    other = build("t5")
    assert load_adapter(other, tmp_path) == "task"
    set_active_adapters(other, "task")
    with torch.no_grad():
        assert torch.equal(outputs(other, batch), expected)
