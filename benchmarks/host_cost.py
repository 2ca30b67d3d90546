"""Host cost of one adapter call before the kernel launch, measured on the CPU.

Batch-1 decoding is bound by host time: at one row per call the GPU work of an adapter is about a
microsecond and the caller waits for Python. This measures what a ``FusedAdapter`` call costs on the
host up to the kernel launch, with the GPU's tuning lists and launch path but Triton's launch itself
replaced by a no-op (so it runs on a machine without a GPU), against the eager adapter it replaces
(real CPU math) and one ``F.linear``.

Run ``python -m benchmarks.host_cost`` (prints JSON); ``measure()`` is what the benchmark run and the
GPU acceptance run record. It runs in a fresh subprocess without ``TRITON_INTERPRET``, because the
interpreter's single-config lists and launcher are not the GPU's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

D_MODEL, BOTTLENECK = 1024, 64


def _best_per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Microseconds per call: the best of ``repeats`` timed loops of ``calls`` calls each."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _measure_here(calls: int, repeats: int) -> dict[str, Any]:
    """The measurement itself; the process must not have the interpreter on."""
    import torch
    import torch.nn.functional as F
    from triton.runtime import jit

    from adapter_fused import FusedAdapter, ops
    from adapter_fused.kernels import launch, tuning

    assert not tuning.INTERPRET, "host cost is measured on the GPU launch path: unset TRITON_INTERPRET"
    launched: list[int] = []
    jit.JITFunction.run = lambda self, *args, **kwargs: launched.append(1)  # type: ignore[method-assign]
    ops.kernels_available = lambda device: True  # the CPU tensors stand in for CUDA ones

    class FirstConfig(tuning.TuningCache):
        """No benchmarking without a GPU: every key 'tunes' to its first config."""

        def tune(self, key: Any, configs: list[Any], run: Any) -> Any:  # noqa: ARG002
            return configs[0]

    launch.TUNING_CACHE = FirstConfig(None)  # type: ignore[assignment]
    torch.set_num_threads(1)
    adapter = FusedAdapter(D_MODEL, BOTTLENECK, "gelu").bfloat16()
    x = torch.randn(1, 1, D_MODEL, dtype=torch.bfloat16)
    eager = torch.nn.Sequential(torch.nn.Linear(D_MODEL, BOTTLENECK), torch.nn.GELU(),
                                torch.nn.Linear(BOTTLENECK, D_MODEL)).bfloat16()
    weight, bias = eager[0].weight, eager[0].bias
    results: dict[str, Any] = {"d": D_MODEL, "r": BOTTLENECK, "dtype": "bfloat16", "rows": 1,
                               "torch": torch.__version__, "calls": calls, "repeats": repeats}
    with torch.no_grad():
        adapter(x)  # first call: config choice and memo
        launched.clear()
        results["fused_module_us"] = _best_per_call(lambda: adapter(x), calls, repeats)
        results["launches_per_call"] = len(launched) / (calls * repeats)
        params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
        results["fused_function_us"] = _best_per_call(lambda: ops.fused_adapter(x, *params, "gelu", 1.0), calls,
                                                      repeats)
        results["eager_adapter_us"] = _best_per_call(lambda: x + eager(x), calls, repeats)
        results["linear_us"] = _best_per_call(lambda: F.linear(x, weight, bias), calls, repeats)
    x_train = x.clone().requires_grad_()
    results["fused_module_train_us"] = _best_per_call(lambda: adapter(x_train), calls // 4, repeats)
    return results


def measure(calls: int = 4000, repeats: int = 5, python: str | None = None) -> dict[str, Any]:
    """Run the measurement in a fresh process without the interpreter; return its figures
    (microseconds per call): ``fused_module_us`` (``FusedAdapter`` under no_grad, up to the launch),
    ``fused_function_us`` (``fused_adapter``), ``fused_module_train_us`` (with autograd recording),
    ``eager_adapter_us`` and ``linear_us`` (real CPU math)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json; from benchmarks.host_cost import _measure_here; print(json.dumps(_measure_here({calls}, {repeats})))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([python or sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"host cost measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the figures as JSON."""
    print(json.dumps(measure(), indent=1))


if __name__ == "__main__":
    main()
