"""Host cost of adapter calls on the GPU launch path, measured on the CPU.

Batch-1 decoding is bound by host time: at one row per call the GPU work of an adapter is about a
microsecond and the caller waits for Python. ``gpu_launch_path()`` stands up the path a GPU takes on a
machine without one: the kernels are reported available for CPU tensors, the tuning lists are the
GPU's (each key "tuned" to its first config), and Triton's launch is replaced by a stub that does
nothing, so a call costs what it costs on the host up to the launch and allocates only its output.
Every reach into the library's internals for this lives in that one context manager.

``measure()`` times one ``FusedAdapter`` call that way (x of one row, d 1024, r 64, bf16, no grad)
against the eager adapter it replaces (real CPU math) and one ``F.linear``: the module's call launches
a bound compiled kernel (``kernels.bind_forward``); here a stand-in compiled kernel whose launcher does
nothing, with current device and stream 0. ``fused_module_unbound_us`` is the same call with binding
switched off, up to Triton's ``JITFunction.run`` (whose own cost is left out; ``launch_overhead()``
times both launches on a real device). Every figure is the minimum over ``repeats`` timed loops of
``calls`` calls (``*_median_us``: the median); the target is judged on the minimum.

Run ``python -m benchmarks.host_cost`` (prints JSON) or ``python -m benchmarks.host_cost --sites``
(the per-adapter-site table of ``benchmarks.sites``, on the plain PyTorch path and on the GPU launch
path). Both run in fresh processes without ``TRITON_INTERPRET``: the interpreter's single-config lists
and launcher are not the GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

D_MODEL, BOTTLENECK = 1024, 64
TARGET_US = 10.0
"""Target: a ``FusedAdapter`` call (no grad, eager) costs at most this on the host before the launch."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class LaunchPath:
    """What ``gpu_launch_path`` hands out: the launches that reached the (stubbed) launcher, a switch
    for binding compiled kernels (``set_binding(False)``: every launch through Triton's
    ``JITFunction.run``), and ``bound``. What these read of the library's internals is here too."""

    launches: list[int] = field(default_factory=list)
    set_binding: Callable[[bool], None] = lambda on: None

    @staticmethod
    def bound(module: Any) -> bool:
        """Whether a ``FusedAdapter`` holds a bound launch (it launches its compiled kernel directly)."""
        checked = getattr(module, "_checked", None)
        return bool(checked is not None and any(checked.plans.values()))


@contextmanager
def gpu_launch_path(stub_launch: bool = True) -> Iterator[LaunchPath]:
    """Within the block, adapter calls take the launch path a GPU takes.

    ``stub_launch=True`` (on a CPU, without ``TRITON_INTERPRET``): CPU tensors are reported as running
    the kernels, every tuning key takes its first config (no benchmarking), Triton's ``JITFunction.run``
    and a bound kernel's launcher do nothing but count the launch, and the current device and stream
    are 0; the launchers still allocate their outputs. ``stub_launch=False``: nothing is replaced (a
    real GPU, or the interpreter); only ``set_binding`` applies. Everything is restored on exit. Build
    the models inside the block: what a module checks once depends on what the kernels report."""
    from triton.runtime import jit

    from adapter_fused import ops
    from adapter_fused.kernels import binding, launch, tuning

    saved = (jit.JITFunction.run, binding._driver_functions, launch.TUNING_CACHE, binding.BIND_LAUNCHES,
             ops.kernels_available)

    def set_binding(on: bool) -> None:
        binding.BIND_LAUNCHES = on

    path = LaunchPath(set_binding=set_binding)
    if stub_launch:
        assert not tuning.INTERPRET, "the GPU launch path is stood up without the interpreter: unset TRITON_INTERPRET"

        class CompiledStandIn:
            """What ``JITFunction.run`` returns and a bound launch calls: a launcher that only counts."""

            function, packed_metadata = 0, None

            @staticmethod
            def run(*args: Any) -> None:
                path.launches.append(1)

            @staticmethod
            def launch_metadata(*args: Any) -> None:
                return None

        def no_launch(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> CompiledStandIn:
            if not warmup:
                path.launches.append(1)
            return CompiledStandIn()

        class FirstConfig(tuning.TuningCache):
            """No benchmarking without a GPU: every key 'tunes' to its first config."""

            def tune(self, key: Any, configs: list[Any], run: Any) -> Any:
                return configs[0]

        jit.JITFunction.run = no_launch  # type: ignore[method-assign]
        binding._driver_functions = lambda: ((lambda: 0), (lambda index: 0))  # type: ignore[assignment]
        launch.TUNING_CACHE = FirstConfig(None)  # type: ignore[assignment]
        ops.kernels_available = lambda device: True  # type: ignore[assignment]
    try:
        yield path
    finally:
        (jit.JITFunction.run, binding._driver_functions, launch.TUNING_CACHE,  # type: ignore[method-assign]
         binding.BIND_LAUNCHES, ops.kernels_available) = saved


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
    """The one-call measurement itself; the process must not have the interpreter on."""
    import torch
    import torch.nn.functional as F

    from adapter_fused import FusedAdapter, fused_adapter

    torch.set_num_threads(1)
    results: dict[str, Any] = {"d": D_MODEL, "r": BOTTLENECK, "dtype": "bfloat16", "rows": 1,
                               "torch": torch.__version__, "calls": calls, "repeats": repeats}

    def record(name: str, fn: Callable[[], object], n: int = calls) -> None:
        results[f"{name}_us"], results[f"{name}_median_us"] = _per_call(fn, n, repeats)

    with gpu_launch_path() as path:
        adapter = FusedAdapter(D_MODEL, BOTTLENECK, "gelu").bfloat16()
        x = torch.randn(1, 1, D_MODEL, dtype=torch.bfloat16)
        eager = torch.nn.Sequential(torch.nn.Linear(D_MODEL, BOTTLENECK), torch.nn.GELU(),
                                    torch.nn.Linear(BOTTLENECK, D_MODEL)).bfloat16()
        weight, bias = eager[0].weight, eager[0].bias
        with torch.no_grad():
            adapter(x)  # first call: config choice, memo and binding
            results["bound"] = path.bound(adapter)
            path.launches.clear()
            record("fused_module", lambda: adapter(x))
            results["launches_per_call"] = len(path.launches) / (calls * repeats)
            record("fused_module_residual", lambda residual=x.clone(): adapter(x, residual=residual))
            path.set_binding(False)
            unbound = FusedAdapter(D_MODEL, BOTTLENECK, "gelu").bfloat16()
            unbound.load_state_dict(adapter.state_dict())
            unbound(x)
            record("fused_module_unbound", lambda: unbound(x))
            path.set_binding(True)
            params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
            record("fused_function", lambda: fused_adapter(x, *params, "gelu", 1.0))
            record("eager_adapter", lambda: x + eager(x))
            record("linear", lambda: F.linear(x, weight, bias))
        x_train = x.clone().requires_grad_()
        record("fused_module_train", lambda: adapter(x_train), calls // 4)
    results["target"] = {"what": "FusedAdapter call, no grad, x (1, 1, d), up to the launch", "target_us": TARGET_US,
                         "measured_us": results["fused_module_us"], "median_us": results["fused_module_median_us"],
                         "met": results["fused_module_us"] <= TARGET_US}
    return results


def in_fresh_process(call: str, python: str | None = None, timeout: float = 1800) -> Any:
    """Evaluate ``call`` (a Python expression over ``benchmarks`` modules, imported by the caller's
    ``call``) in a new process without ``TRITON_INTERPRET``; its JSON printed as the last stdout line
    is returned. Its stderr (progress) goes to this process's stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    code = f"import json, benchmarks.host_cost, benchmarks.sites; print(json.dumps({call}))"
    proc = subprocess.run([python or sys.executable, "-c", code], check=False, env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{call} failed in a fresh process (exit status {proc.returncode}; its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(calls: int = 4000, repeats: int = 5, python: str | None = None) -> dict[str, Any]:
    """Run the one-call measurement in a fresh process without the interpreter; return its figures
    (microseconds per call, each also as ``*_median_us``): ``fused_module_us`` (``FusedAdapter`` under
    no_grad, up to the launch of its bound kernel; ``bound`` says it was bound),
    ``fused_module_unbound_us`` (the same, binding switched off, up to Triton's launcher),
    ``fused_function_us`` (``fused_adapter``), ``fused_module_train_us`` (with autograd recording),
    ``eager_adapter_us`` and ``linear_us`` (real CPU math); ``target``: the module figure against
    ``TARGET_US`` (``met``)."""
    return in_fresh_process(f"benchmarks.host_cost._measure_here({calls}, {repeats})", python)


def launch_overhead(device: Any, d: int, r: int, dtype: str, iters: int, repeats: int) -> dict[str, Any]:
    """Host-inclusive cost of small calls on ``device`` itself (no stub): loops of ``iters`` no-grad calls
    on x (1, d) then one synchronisation, each the median of ``repeats`` loops, microseconds per call:
    ``fused_adapter``, a ``FusedAdapter`` launching its bound compiled kernel (``module_bound_us``;
    ``module_bound`` says whether it bound: never in the interpreter), the same module with binding off,
    launching through Triton's ``JITFunction.run`` (``module_triton_launch_us``), an empty loop and a
    one-element torch op."""
    import torch

    from adapter_fused import FusedAdapter, fused_adapter

    torch.manual_seed(0)
    modules = [FusedAdapter(d, r, "relu").to(device, getattr(torch, dtype)) for _ in range(2)]
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(1, 1, d, device=device, dtype=getattr(torch, dtype))
    params = (modules[0].down.weight, modules[0].down.bias, modules[0].up.weight, modules[0].up.bias)

    def per_call(body: Callable[[], Any]) -> float:
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                body()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append((time.perf_counter() - start) / iters * 1e6)
        return statistics.median(samples)

    with torch.no_grad(), gpu_launch_path(stub_launch=False) as path:
        for _ in range(2):  # compile, tune and bind first
            fused_adapter(x, *params, "relu", 1.0)
            modules[0](x)
        path.set_binding(False)
        modules[1](x)
        figures = {"module_bound": path.bound(modules[0]),
                   "empty_loop_us": per_call(lambda: None),
                   "fused_call_us": per_call(lambda: fused_adapter(x, *params, "relu", 1.0)),
                   "module_triton_launch_us": per_call(lambda: modules[1](x))}
        path.set_binding(True)
        figures["module_bound_us"] = per_call(lambda: modules[0](x))
        figures["torch_add_us"] = per_call(lambda: x.add(1.0))
    return {"device": str(device), "d": d, "r": r, "dtype": dtype, "iters": iters, "repeats": repeats, **figures}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the one-call figures as JSON, with ``--sites`` the per-site table in markdown, or with
    ``--block-entry`` the cost of entering a block of per-row adapter names as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", action="store_true",
                        help="per adapter site inside a model: base, hand-written eager adapter, ours per placement, "
                             "per-sample, an inactive adapter, AdapterHub and accelerated AdapterHub (when installed); "
                             "on the plain PyTorch path and on the GPU launch path")
    parser.add_argument("--repeats", type=int, default=40, help="--sites: repetitions (the median is kept)")
    parser.add_argument("--layers", type=int, default=None,
                        help="--sites, --block-entry: layers of the models (default: GPT-2 24, BERT 12)")
    parser.add_argument("--workloads", default=None, help="--sites: comma-separated subset of gpt2-decode,bert-forward")
    parser.add_argument("--paths", default="plain,gpu", help="--sites: comma-separated subset of plain,gpu")
    parser.add_argument("--json", default=None, help="--sites: also write the figures to this file")
    parser.add_argument("--block-entry", action="store_true",
                        help="entering per_sample_adapters for 8 adapters on a 24-layer GPT-2: the first block, the "
                             "same names again and new mixes of names (JSON)")
    args = parser.parse_args(argv)
    if args.block_entry:
        print(json.dumps(in_fresh_process(f"benchmarks.sites.block_entry(layers={args.layers or 24})"), indent=1))
        return 0
    if not args.sites:
        print(json.dumps(measure(), indent=1))
        return 0
    from . import sites

    command = "python -m benchmarks.host_cost" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    return sites.main(args, command)


if __name__ == "__main__":
    raise SystemExit(main())
