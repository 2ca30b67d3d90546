"""Host cost of one adapter call before the kernel launch, measured on the CPU.

Batch-1 decoding is bound by host time: at one row per call the GPU work of an adapter is about a
microsecond and the caller waits for Python. This measures what a ``FusedAdapter`` call costs on the
host up to the kernel launch, with the GPU's tuning lists and launch path but Triton's launch itself
replaced by a no-op (so it runs on a machine without a GPU), against the eager adapter it replaces
(real CPU math) and one ``F.linear``. The module's call launches a bound compiled kernel
(``kernels.bind_forward``); here a stand-in compiled kernel whose launcher does nothing, and the
current device and stream are 0. ``fused_module_unbound_us`` is the same call with binding switched
off, up to Triton's ``JITFunction.run`` (whose own cost, binding and specializing every argument, is
left out here: ``benchmarks/gpu_check.py`` times both launches on the GPU).

Every figure is the minimum over ``repeats`` timed loops of ``calls`` calls (``*_median_us``: the
median); the target is judged on the minimum, the machine's cost without interference.

Run ``python -m benchmarks.host_cost`` (prints JSON); ``measure()`` is what the benchmark run and the
GPU acceptance run record. It runs in a fresh subprocess without ``TRITON_INTERPRET``, because the
interpreter's single-config lists and launcher are not the GPU's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

D_MODEL, BOTTLENECK = 1024, 64
TARGET_US = 10.0
"""Target: a ``FusedAdapter`` call (no grad, eager) costs at most this on the host before the launch."""


def _per_call(fn: Callable[[], object], calls: int, repeats: int) -> tuple[float, float]:
    """Microseconds per call: (minimum, median) over ``repeats`` timed loops of ``calls`` calls each."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples), statistics.median(samples)


def _measure_here(calls: int, repeats: int) -> dict[str, Any]:
    """The measurement itself; the process must not have the interpreter on."""
    import torch
    import torch.nn.functional as F
    from triton.runtime import jit

    from adapter_fused import FusedAdapter, ops
    from adapter_fused.kernels import launch, tuning

    assert not tuning.INTERPRET, "host cost is measured on the GPU launch path: unset TRITON_INTERPRET"
    launched: list[int] = []

    class CompiledStandIn:
        """What ``JITFunction.run`` returns and a bound launch calls: a launcher that does nothing."""

        function, packed_metadata = 0, None

        @staticmethod
        def run(*args: Any) -> None:
            launched.append(1)

        @staticmethod
        def launch_metadata(*args: Any) -> None:
            return None

    def no_launch(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> CompiledStandIn:
        if not warmup:
            launched.append(1)
        return CompiledStandIn()

    jit.JITFunction.run = no_launch  # type: ignore[method-assign]
    launch._driver_functions = lambda: ((lambda: 0), (lambda index: 0))  # type: ignore[assignment]
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

    def record(name: str, fn: Callable[[], object], n: int = calls) -> None:
        results[f"{name}_us"], results[f"{name}_median_us"] = _per_call(fn, n, repeats)

    with torch.no_grad():
        adapter(x)  # first call: config choice, memo and binding
        results["bound"] = any(adapter._checked.plans.values()) if adapter._checked else False
        launched.clear()
        record("fused_module", lambda: adapter(x))
        results["launches_per_call"] = len(launched) / (calls * repeats)
        launch.BIND_LAUNCHES = False
        unbound = FusedAdapter(D_MODEL, BOTTLENECK, "gelu").bfloat16()
        unbound.load_state_dict(adapter.state_dict())
        unbound(x)
        record("fused_module_unbound", lambda: unbound(x))
        launch.BIND_LAUNCHES = True
        params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
        record("fused_function", lambda: ops.fused_adapter(x, *params, "gelu", 1.0))
        record("eager_adapter", lambda: x + eager(x))
        record("linear", lambda: F.linear(x, weight, bias))
    x_train = x.clone().requires_grad_()
    record("fused_module_train", lambda: adapter(x_train), calls // 4)
    results["target"] = {"what": "FusedAdapter call, no grad, x (1, 1, d), up to the launch", "target_us": TARGET_US,
                         "measured_us": results["fused_module_us"], "median_us": results["fused_module_median_us"],
                         "met": results["fused_module_us"] <= TARGET_US}
    return results


def measure(calls: int = 4000, repeats: int = 5, python: str | None = None) -> dict[str, Any]:
    """Run the measurement in a fresh process without the interpreter; return its figures
    (microseconds per call, each also as ``*_median_us``): ``fused_module_us`` (``FusedAdapter`` under
    no_grad, up to the launch of its bound kernel; ``bound`` says it was bound),
    ``fused_module_unbound_us`` (the same, binding switched off, up to Triton's launcher),
    ``fused_function_us`` (``fused_adapter``), ``fused_module_train_us`` (with autograd recording),
    ``eager_adapter_us`` and ``linear_us`` (real CPU math); ``target``: the module figure against
    ``TARGET_US`` (``met``)."""
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
