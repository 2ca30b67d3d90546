"""Every Python code block of README.md and the pages under docs/ runs, as written.

The blocks of one page run in order in one fresh interpreter (a reader running them one after the
other), from a scratch directory of its own that holds tiny random models saved under the hub names the pages use
(``bert-base-uncased``, ``gpt2``, ``meta-llama/Llama-3.2-1B``): ``from_pretrained`` finds a local directory of that name before it
would look on the hub, so the code runs unchanged and offline. The kernels run on the CPU without the
interpreter there (the reference path), so the pages test their code, not the kernels.

A block that needs an optional package says so in an HTML comment on the line before its fence,
``<!-- requires: adapters -->``; those blocks run on their own (in page order) where the package is
installed, and their test carries the ``adapterhub`` marker so that CI runs it in the AdapterHub
environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"(?:<!-- requires: (?P<requires>[\w., -]+) -->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
HUB_MODELS = ("bert-base-uncased", "gpt2", "meta-llama/Llama-3.2-1B")


def code_blocks(page: Path) -> list[tuple[tuple[str, ...], str]]:
    """(required packages, code) of each Python block of ``page``, in order."""
    out = []
    for match in FENCE.finditer(page.read_text()):
        requires = tuple(p.strip() for p in (match["requires"] or "").split(",") if p.strip())
        out.append((requires, match["code"]))
    return out


def _cases() -> list[object]:
    cases = []
    for page in PAGES:
        groups: dict[tuple[str, ...], list[str]] = {}
        for requires, code in code_blocks(page):
            groups.setdefault(requires, []).append(code)
        for requires, blocks in groups.items():
            marks = [pytest.mark.adapterhub] if "adapters" in requires else []
            label = page.relative_to(ROOT).as_posix() + ("[" + ",".join(requires) + "]" if requires else "")
            cases.append(pytest.param(requires, blocks, id=label, marks=marks))
    return cases


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding tiny random models under the hub names the pages load."""
    transformers = pytest.importorskip("transformers")
    import torch

    where = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        max_position_embeddings=64))
    bert.save_pretrained(where / "bert-base-uncased")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(where / "gpt2")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(  # 64 wide: bitsandbytes' CPU kernels need it
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False))
    llama.save_pretrained(where / "meta-llama" / "Llama-3.2-1B")
    assert all((where / name / "config.json").is_file() for name in HUB_MODELS)
    return where


def test_pages_have_code() -> None:
    """The runner finds the blocks: README and the Hugging Face guide have several each."""
    assert len(code_blocks(ROOT / "README.md")) >= 3
    assert len(code_blocks(ROOT / "docs" / "huggingface.md")) >= 3


@pytest.mark.parametrize(("requires", "blocks"), _cases())
def test_code_blocks_run(requires: tuple[str, ...], blocks: list[str], hub_dir: Path, tmp_path: Path) -> None:
    for package in requires:
        pytest.importorskip(package)
    for name in HUB_MODELS:  # each page runs in its own directory, with the models at hand
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(hub_dir / name, target_is_directory=True)
    script = "\n".join(f"# --- block {i}\n{code}" for i, code in enumerate(blocks))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_api_reference_lists_every_public_name() -> None:
    """docs/api.md documents every name of ``adapter_fused.__all__`` and nothing outside it."""
    import adapter_fused

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto(?:class|function|data):: adapter_fused\.(\w+)", text, re.MULTILINE))
    assert documented == set(adapter_fused.__all__)
