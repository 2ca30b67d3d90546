"""generate() with a Parallel composition: the inputs are repeated once, the key/value cache then holds
n*B rows, and copy i of the sequences and logits is what child i gives alone (None: the base model);
parity with AdapterHub's own Parallel generation where it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adapter_fused import Parallel, init

from .models import VOCAB, randomize

transformers = pytest.importorskip("transformers")


def generator_model(kind: str, seed: int = 0) -> nn.Module:
    """A tiny task model that generates, in eval mode."""
    t = transformers
    torch.manual_seed(seed)
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if kind == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                               **special))
    elif kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                                 max_position_embeddings=64, **special))
    elif kind == "bart":
        model = t.BartForConditionalGeneration(t.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
            decoder_start_token_id=2, forced_eos_token_id=None, **special))
    else:
        model = t.T5ForConditionalGeneration(t.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                                        num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0,
                                                        pad_token_id=0, eos_token_id=1))
    return model.eval()


SETTINGS = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "output_logits": True,
            "return_dict_in_generate": True}


def prompt(kind: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if kind in ("gpt2", "llama"):  # left padding in the first prompt
        ids[0, 0], mask[0, 0] = 1, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart", "t5"])
def test_parallel_generation_equals_each_child_alone(kind: str) -> None:
    model = init(generator_model(kind))
    for name in "ab":
        model.add_adapter(name, config="double_seq_bn")
    randomize([p for n, p in model.named_parameters() if "fused_adapters" in n], std=0.3)
    inputs = prompt(kind)
    alone = []
    with torch.no_grad():
        for setup in ("a", "b", None):
            model.set_active_adapters(setup)
            alone.append(model.generate(**inputs, **SETTINGS))
        for setup, children in ((Parallel("a", "b"), (0, 1)), (Parallel(None, "a"), (2, 0))):
            model.set_active_adapters(setup)
            both = model.generate(**inputs, **SETTINGS)
            assert both.sequences.shape[0] == 4
            torch.testing.assert_close(both.sequences, torch.cat([alone[i].sequences for i in children]), rtol=0,
                                       atol=0)
            for step, logits in enumerate(both.logits):
                expected = torch.cat([alone[i].logits[step] for i in children])
                torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (alone[0].logits[-1] - alone[2].logits[-1]).abs().max() > 0.05  # the adapters matter at every step


@pytest.mark.adapterhub
@pytest.mark.parametrize("kind", ["gpt2", "bart", "t5"])
def test_parallel_generation_matches_adapterhub(tmp_path: Path, kind: str) -> None:
    """AdapterHub repeats the input ids once before generating, as this package does: the same n*B
    sequences and logits. (Its Llama models compute other logits than transformers' once a cache is
    filled, with no adapter active too, so Llama is checked against each adapter alone above.)"""
    adapters = pytest.importorskip("adapters")
    composition = pytest.importorskip("adapters.composition")
    hub = generator_model(kind)
    adapters.init(hub)
    for name in "ab":
        hub.add_adapter(name, config="double_seq_bn")
    randomize([p for n, p in hub.named_parameters() if ".adapters." in n], std=0.3)
    hub.eval()
    model = init(generator_model(kind))
    for name in "ab":
        hub.save_adapter(str(tmp_path / name), name)
        model.load_adapter(tmp_path / name)
    setup = composition.Parallel("a", "b")
    hub.set_active_adapters(setup)
    model.set_active_adapters(setup)
    ids = prompt(kind)["input_ids"]
    with torch.no_grad():
        expected = hub.generate(ids, **SETTINGS)
        out = model.generate(ids, **SETTINGS)
    torch.testing.assert_close(out.sequences, expected.sequences, rtol=0, atol=0)
    for logits, reference in zip(out.logits, expected.logits):
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert out.sequences.shape[0] == 2 * ids.shape[0]
