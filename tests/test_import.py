"""Start-up cost: importing the package adds little to importing torch, heavy optional modules load
only when used, and the command lines answer --help without importing torch.

Timings are taken in fresh interpreters, the best of a few runs each, so a busy machine does not
fail them; the import of torch is timed in the same interpreters as the baseline."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = 3
# What loading every public name may add to `import torch`
IMPORT_BUDGET_S = 0.5
HELP_BUDGET_S = 1.0
# Modules that no import of the package may pull in: the optional integrations, plotting, the
# compiler stack (torch._dynamo, sympy) and Triton (the kernels load on the first call)
LAZY_MODULES = ("transformers", "adapters", "matplotlib", "torch._dynamo", "sympy", "triton")
LOAD_ALL = "import adapter_fused as a; [getattr(a, name) for name in a.__all__]"


def _env() -> dict[str, str]:
    """The environment of the test run, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _best_wall_s(args: list[str], runs: int = RUNS) -> float:
    """Smallest wall time in seconds of ``python ARGS`` over ``runs`` fresh interpreters."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=120)
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return best


def test_import_adds_little_to_torch() -> None:
    """Each fresh interpreter times ``import torch`` and then loading every public name of the
    package, so the difference is measured in the same process, free of the noise of a second start."""
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
            f"{LOAD_ALL}\nprint(t1 - t0, time.perf_counter() - t1)")
    samples = []
    for _ in range(RUNS):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        torch_s, added_s = map(float, proc.stdout.split())
        samples.append((added_s, torch_s))
    added_s, torch_s = min(samples)
    assert added_s <= IMPORT_BUDGET_S, f"loading adapter_fused added {added_s:.2f} s to {torch_s:.2f} s for torch"


def test_bare_import_does_not_import_torch() -> None:
    code = "import sys, adapter_fused; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("statement", ["import adapter_fused", LOAD_ALL, "import adapter_fused.hf"])
def test_heavy_modules_load_only_when_used(statement: str) -> None:
    code = f"{statement}\nimport sys\nprint(','.join(m for m in {LAZY_MODULES!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"{statement!r} imported {proc.stdout.strip()}"


@pytest.mark.parametrize("module", ["adapter_fused", "benchmarks"])
def test_help_is_fast(module: str) -> None:
    assert _best_wall_s(["-m", module, "--help"]) < HELP_BUDGET_S


def test_constant_result_marker_matches_torch() -> None:
    """The package marks ``kernels_available`` as torch.compiler.assume_constant_result would, without
    importing the compiler; the public decorator must still set that same marker."""
    import torch

    from adapter_fused import ops

    def probe() -> int:
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, ops.CONSTANT_RESULT_MARKER, False) is True
    assert getattr(ops.kernels_available, ops.CONSTANT_RESULT_MARKER, False) is True


def test_compile_without_compiler_imported_first() -> None:
    """Imported before the compiler, the package still compiles with fullgraph=True and torch.compile
    evaluates ``kernels_available`` instead of tracing into it (which would warn about its cache)."""
    code = (
        "import sys, warnings, torch\n"
        "from adapter_fused import FusedAdapter\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "layer = FusedAdapter(8, 4)\n"
        "x = torch.randn(3, 8)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = torch.compile(layer, fullgraph=True, backend='eager')(x)\n"
        "traced = [str(w.message) for w in caught if 'lru_cache' in str(w.message)]\n"
        "assert not traced, traced\n"
        "torch.testing.assert_close(y, layer(x))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_extras_are_declared() -> None:
    """The extras the command lines name in their messages exist in pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"test", "bench", "hf", "adapterhub"} <= set(extras)


def test_hugging_face_kernels_package_is_not_shadowed_from_the_repo_root() -> None:
    """From the repository root (the first entry of ``sys.path`` for ``python -c`` and scripts run
    there), ``import kernels`` is Hugging Face's package, which transformers imports when it loads a
    model; the library's Triton code is ``adapter_fused.kernels``. One model workload runs there too:
    a transformers model with a fused adapter, whose import of the model classes goes through
    Hugging Face's ``kernels``."""
    import importlib.metadata

    pytest.importorskip("transformers")
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    theirs = Path(distribution.locate_file("kernels")).resolve()
    code = (
        "import pathlib, kernels, torch, transformers\n"
        "import adapter_fused.kernels as ours\n"
        "from adapter_fused import add_adapter, set_active_adapters\n"
        "print(pathlib.Path(kernels.__file__).resolve().parent)\n"
        "print(pathlib.Path(ours.__file__).resolve().parent)\n"
        "torch.manual_seed(0)\n"
        "model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))\n"
        "ids = torch.randint(0, 50, (1, 5))\n"
        "with torch.no_grad():\n"
        "    base = model(ids).last_hidden_state\n"
        "    add_adapter(model, 'task', 'houlsby')\n"
        "    set_active_adapters(model, 'task')\n"
        "    for p in model.fused_adapters.parameters(): p.normal_(std=0.5)\n"
        "    adapted = model(ids).last_hidden_state\n"
        "print(float((adapted - base).abs().max()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf_kernels, our_kernels, change = proc.stdout.split()[-3:]
    assert Path(hf_kernels) == theirs, f"'import kernels' found {hf_kernels}, not Hugging Face's {theirs}"
    assert Path(our_kernels) == ROOT / "adapter_fused" / "kernels"
    assert float(change) > 1e-3, "the adapter did not change the model's output"
