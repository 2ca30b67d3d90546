"""The bound launch on the GPU launch path, checked on the CPU: run without ``TRITON_INTERPRET`` (the
interpreter has no compiled kernels to bind), with Triton's ``JITFunction.run`` replaced by a stand-in
that returns a compiled-kernel stand-in whose launcher records what it is given, as
``benchmarks/host_cost.py`` does; ``ops.kernels_available`` says yes for CPU tensors.

``python tests/kernels/binding_check.py`` prints one JSON object of facts (``tests/kernels/test_binding.py``
asserts them): what a bound launch passes to the compiled kernel, that it keeps no tensor of a call,
and that every gate (Triton version, launch hooks, driver functions, compiled-kernel attributes,
pre-run hooks) falls back to Triton's normal launch.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch


class Recorder:
    """Counts Triton's normal launches and records the bound ones."""

    def __init__(self) -> None:
        self.normal = 0
        self.bound: list[tuple[tuple[int, int, int], tuple[Any, ...]]] = []
        self.hooks: list[tuple[object, object]] = []  # (enter, exit) hook of each bound launch


def _stand_in(recorder: Recorder, missing: str | None = None) -> Any:
    """A compiled-kernel stand-in: ``run`` records the grid and the kernel arguments; ``missing`` names
    an attribute it lacks."""

    class Compiled:
        function, packed_metadata = "function", "packed"

        def run(self, g0: int, g1: int, g2: int, stream: object, function: object, packed: object, metadata: object,
                enter: object, leave: object, *args: Any) -> None:
            assert (stream, function, packed, metadata) == (5, "function", "packed", None)
            recorder.bound.append(((g0, g1, g2), args))
            recorder.hooks.append((enter, leave))

        def launch_metadata(self, *args: Any) -> None:
            return None

    compiled = Compiled()
    if missing is not None:
        setattr(Compiled, missing, property(lambda self: (_ for _ in ()).throw(AttributeError(missing))))
    return compiled


@contextmanager
def stubs(recorder: Recorder, missing: str | None = None) -> Iterator[None]:
    """Triton's launch replaced, the driver functions and the kernel availability stubbed, every
    tuning key choosing its first config; undone on exit."""
    from triton.runtime import jit

    from adapter_fused import ops
    from adapter_fused.kernels import binding, launch, tuning

    compiled = _stand_in(recorder, missing)

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:
            recorder.normal += 1
        return compiled

    class FirstConfig(tuning.TuningCache):
        def tune(self, key: Any, configs: list[Any], run: Any) -> Any:
            return configs[0]

    saved = (jit.JITFunction.run, binding._driver_functions, ops.kernels_available, launch.TUNING_CACHE)
    jit.JITFunction.run = run  # type: ignore[method-assign]
    binding._driver_functions = lambda: ((lambda: 0), (lambda index: 5))  # type: ignore[assignment]
    ops.kernels_available = lambda device: True  # type: ignore[assignment]
    launch.TUNING_CACHE = FirstConfig(None)  # type: ignore[assignment]
    try:
        yield
    finally:
        jit.JITFunction.run, binding._driver_functions, ops.kernels_available, launch.TUNING_CACHE = saved


def _module() -> Any:
    from adapter_fused import FusedAdapter

    torch.manual_seed(0)
    return FusedAdapter(64, 16, "gelu", scale=0.5).bfloat16()


def _hook_facts(layer: Any, x: torch.Tensor, recorder: Recorder) -> dict[str, Any]:
    """The launch hooks a bound launch passes: None for Triton's empty default chains, the chain itself
    once a hook is added to it (and the hook is called by the real launcher)."""
    from triton import knobs

    runtime = knobs.runtime
    facts: dict[str, Any] = {"default_chains": [type(runtime.launch_enter_hook).__name__,
                                                type(runtime.launch_exit_hook).__name__]}
    layer(x)
    facts["empty"] = [hook is None for hook in recorder.hooks[-1]]
    for name in ("launch_enter_hook", "launch_exit_hook"):
        chain = getattr(runtime, name)
        hook = lambda metadata: None
        chain.add(hook)
        try:
            layer(x)
        finally:
            chain.remove(hook)
        facts[name] = [hook is chain for hook in recorder.hooks[-1]]
    layer(x)
    facts["removed"] = [hook is None for hook in recorder.hooks[-1]]
    return facts


def bound_facts() -> dict[str, Any]:
    """What a bound launch passes and keeps."""
    from adapter_fused.kernels import binding, fused
    from adapter_fused.kernels.records import FusedRowsArgs

    recorder = Recorder()
    names = list(fused.fused_rows_tuned.arg_names)
    facts: dict[str, Any] = {}
    with stubs(recorder), torch.no_grad():
        layer = _module()
        params = list(layer.parameters())
        first = torch.randn(1, 5, 64, dtype=torch.bfloat16)
        first_ref = weakref.ref(first)
        layer(first)  # Triton's launcher, then binding
        del first
        plans = list(layer._checked.plans.values())
        facts["binding"] = {"normal_launches": recorder.normal, "bound_launches": len(recorder.bound),
                            "plans": [type(p).__name__ for p in plans]}
        x = torch.randn(1, 7, 64, dtype=torch.bfloat16)  # another row count of the class
        residual = torch.randn(1, 7, 64, dtype=torch.bfloat16)
        y = layer(x)
        grid, args = recorder.bound[-1]
        named = dict(zip(names, args))
        facts["call"] = {
            "normal_launches": recorder.normal, "grid": list(grid), "argument_count": [len(args), len(names)],
            "x_slots": sorted(k for k, v in named.items() if v is x),
            "y_slots": sorted(k for k, v in named.items() if v is y),
            "M": named["M"], "scale": named["scale"], "constants_as_bound": all(
                named[k] == v for k, v in zip(FusedRowsArgs._fields, plans[0].args)
                if v is not None and not isinstance(v, torch.Tensor) and k not in ("M", "scale")),
            "parameters": [k for k, v in named.items() if any(v is p for p in params)],
            "block_m": named["BLOCK_M"], "plan_block_m": plans[0].block_m,
            "STORE_MID": named["STORE_MID"], "ADD_RESIDUAL": named["ADD_RESIDUAL"], "ACT": named["ACT"],
        }
        z = layer(x, residual=residual)
        named = dict(zip(names, recorder.bound[-1][1]))
        facts["residual_call"] = {"res_is_residual": named["res_ptr"] is residual, "src_is_x": named["src_ptr"] is x,
                                  "out_is_result": named["out_ptr"] is z, "plans": len(layer._checked.plans)}
        facts["hooks"] = _hook_facts(layer, x, recorder)
        refs = [weakref.ref(t) for t in (x, y, residual, z)]
        del x, y, residual, z, args, named, grid
        recorder.bound.clear()
        gc.collect()
        facts["freed"] = [ref() is None for ref in [first_ref, *refs]]
        held = [v for plan in layer._checked.plans.values() for v in plan.args if isinstance(v, torch.Tensor)]
        facts["held_are_parameters"] = bool(held) and all(any(v is p for p in params) for v in held)
    facts["checked_versions"] = list(binding.CHECKED_TRITON_VERSIONS)
    return facts


def _fallback(setup: Callable[[], Callable[[], None]], missing: str | None = None) -> dict[str, Any]:
    """Two no-grad calls of a fresh module with ``setup`` applied (it returns its undo): how many went
    through Triton's launcher, how many were bound, what the module keeps."""
    recorder = Recorder()
    with stubs(recorder, missing), torch.no_grad():
        undo = setup()
        try:
            layer = _module()
            x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
            layer(x)
            layer(x)
            plans = list(layer._checked.plans.values())
        finally:
            undo()
    return {"normal_launches": recorder.normal, "bound_launches": len(recorder.bound), "plans": plans}


def _set(obj: Any, name: str, value: Any) -> Callable[[], Callable[[], None]]:
    def setup() -> Callable[[], None]:
        old = getattr(obj, name)
        setattr(obj, name, value)
        return lambda: setattr(obj, name, old)

    return setup


def fallback_facts() -> dict[str, Any]:
    """Each gate that must fall back to ``JITFunction.run``, and a checked version that binds."""
    import triton

    from adapter_fused.kernels import binding, fused

    nothing = _set(binding, "BIND_LAUNCHES", True)
    hooked = _set(fused.fused_rows_tuned.fn, "pre_run_hooks", [lambda *args, **kwargs: None])
    cases = {
        "checked_3.6": _fallback(_set(triton, "__version__", "3.6.0")),
        "checked_3.9": _fallback(_set(triton, "__version__", "3.9.0")),
        "version_3.5": _fallback(_set(triton, "__version__", "3.5.0")),
        "version_3.10": _fallback(_set(triton, "__version__", "3.10.0")),
        "no_launch_hooks": _fallback(_set(triton, "knobs", types.SimpleNamespace(runtime=types.SimpleNamespace()))),
        "no_driver_functions": _fallback(_set(binding, "_driver_functions", lambda: None)),
        "no_packed_metadata": _fallback(nothing, missing="packed_metadata"),
        "no_launch_metadata": _fallback(nothing, missing="launch_metadata"),
        "pre_run_hooks": _fallback(hooked),
        "binding_off": _fallback(_set(binding, "BIND_LAUNCHES", False)),
    }
    return {name: {**case, "plans": [type(p).__name__ for p in case["plans"]]} for name, case in cases.items()}


def main() -> None:
    from adapter_fused.kernels import tuning

    assert not tuning.INTERPRET, "the bound launch is checked on the GPU launch path: unset TRITON_INTERPRET"
    print(json.dumps({"bound": bound_facts(), "fallback": fallback_facts()}))


if __name__ == "__main__":
    main()
