"""Parity and timing report: the fused adapter against the eager reference on this machine.

``python -m adapter_fused`` runs it. On a CUDA device it times the Triton kernels; on a CPU it runs
them in Triton's interpreter (switched on here before the kernels are imported), which checks the
numbers but says nothing about speed: those timings are labelled as interpreter timings.

The options are parsed before torch is imported, so ``--help`` and bad options answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bfloat16", "float16", "float32")
GRAD_NAMES = ["dx", "dW_down", "db_down", "dW_up", "db_up"]
# (GPU, CPU) defaults of the shape options; the CPU ones keep the interpreter run short
SHAPE_DEFAULTS = {"rows": (16384, 128), "d": (4096, 256), "r": (64, 16)}


def _dtype_list(text: str) -> list[str]:
    """Comma-separated dtype names, each one of ``DTYPE_NAMES``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DTYPE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DTYPE_NAMES)}, "
                                         f"got {text!r}")
    return names


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options; shape options left unset are None (their default depends on the device)."""
    parser = argparse.ArgumentParser(
        prog="python -m adapter_fused",
        description="Check the fused adapter against float64 truth and time it against the eager reference.",
    )
    for name, help_text in (("rows", "rows of x (tokens)"), ("d", "model width d"), ("r", "bottleneck width r")):
        gpu, cpu = SHAPE_DEFAULTS[name]
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_text} (default {gpu} on a GPU, {cpu} on a CPU)")
    parser.add_argument("--dtypes", type=_dtype_list, default=list(DTYPE_NAMES),
                        help=f"comma-separated dtypes (default {','.join(DTYPE_NAMES)})")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats on CPU (default 3)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def _time_ms(fn: Callable[[], Any], on_gpu: bool, repeats: int) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA, perf_counter loops on CPU."""
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _errors(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor,
            truth: list[torch.Tensor], activation: str, scale: float) -> dict[str, float]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, activation=activation, scale=scale)
    y.backward(grad)
    errors = {}
    for name, got, want in zip(["y", *GRAD_NAMES], [y.detach(), *(t.grad for t in leaves)], truth):
        assert got is not None
        scale_ = want.abs().max().item() or 1.0
        errors[name] = (got.double() - want.to(got.device)).abs().max().item() / scale_
    return errors


def run_case(rows: int, d: int, r: int, dtype: torch.dtype, activation: str, scale: float,
             device: torch.device, repeats: int) -> dict[str, Any]:
    """One shape and dtype: relative errors of fused and eager against float64 truth, and timings."""
    import torch

    from . import fused_adapter, reference_adapter

    on_gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    inputs = [rand(rows, d), rand(r, d, std=d**-0.5), rand(r, std=0.1), rand(d, r, std=r**-0.5), rand(d, std=0.1)]
    grad = rand(rows, d)
    leaves64 = [t.double().requires_grad_() for t in inputs]
    y64 = reference_adapter(*leaves64, activation=activation, scale=scale)
    y64.backward(grad.double())
    truth = [y64.detach(), *(t.grad for t in leaves64)]
    del leaves64, y64

    result: dict[str, Any] = dict(rows=rows, d=d, r=r, dtype=str(dtype).replace("torch.", ""), activation=activation)
    result["fused_error"] = _errors(fused_adapter, inputs, grad, truth, activation, scale)
    result["eager_error"] = _errors(reference_adapter, inputs, grad, truth, activation, scale)
    del truth

    params = [t.detach().clone().requires_grad_() for t in inputs[1:]]
    x = inputs[0].detach().clone().requires_grad_()
    for name, fn in (("fused", fused_adapter), ("eager", reference_adapter)):
        def forward(fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
            with torch.no_grad():
                return fn(x, *params, activation=activation, scale=scale)

        def forward_backward(fn: Callable[..., torch.Tensor] = fn) -> None:
            fn(x, *params, activation=activation, scale=scale).backward(grad)

        result[f"{name}_forward_ms"] = _time_ms(forward, on_gpu, repeats)
        result[f"{name}_forward_backward_ms"] = _time_ms(forward_backward, on_gpu, repeats)
    result["speedup_forward"] = result["eager_forward_ms"] / result["fused_forward_ms"]
    result["speedup_forward_backward"] = result["eager_forward_backward_ms"] / result["fused_forward_backward_ms"]
    return result


def _table(results: list[dict[str, Any]], timing_label: str) -> str:
    head = (f"{'dtype':>9} {'rows':>6} {'d':>5} {'r':>4} | {'max rel err fused':>17} {'eager':>9} | "
            f"{'fwd fused ms':>12} {'eager':>9} {'x':>6} | {'fwd+bwd fused':>13} {'eager':>9} {'x':>6}")
    lines = [f"timings: {timing_label}", head, "-" * len(head)]
    for res in results:
        fused_err = max(res["fused_error"].values())
        eager_err = max(res["eager_error"].values())
        lines.append(
            f"{res['dtype']:>9} {res['rows']:>6} {res['d']:>5} {res['r']:>4} | {fused_err:>17.2e} {eager_err:>9.2e} | "
            f"{res['fused_forward_ms']:>12.3f} {res['eager_forward_ms']:>9.3f} {res['speedup_forward']:>6.2f} | "
            f"{res['fused_forward_backward_ms']:>13.3f} {res['eager_forward_backward_ms']:>9.3f} "
            f"{res['speedup_forward_backward']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m adapter_fused``; returns the process exit code."""
    forwarded = list(argv) if argv is not None else sys.argv[1:]
    args = _parse(forwarded)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            # Triton decides interpretation when its modules are imported, and they already were:
            # start again with the interpreter switched on.
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            os.execve(sys.executable, [sys.executable, "-m", "adapter_fused", *forwarded], env)
        os.environ["TRITON_INTERPRET"] = "1"
    from .ops import kernels_available

    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        label = f"CUDA, {torch.cuda.get_device_name(device)}, triton.testing.do_bench median"
    elif kernels_available(device):
        label = "CPU, Triton interpreter (checks numbers; these times are not performance figures)"
    else:
        label = "CPU, no Triton: the fused op runs the reference"
    given = {name: getattr(args, name) for name in SHAPE_DEFAULTS}
    rows, d, r = (SHAPE_DEFAULTS[name][0 if on_gpu else 1] if value is None else value
                  for name, value in given.items())
    repeats = args.repeats or 3
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print(f"adapter-fused report on {label}", flush=True)
    results = []
    for i, dtype in enumerate(dtypes, 1):
        print(f"[{i}/{len(dtypes)}] {dtype} rows={rows} d={d} r={r} {args.activation} ...", flush=True)
        results.append(run_case(rows, d, r, dtype, args.activation, args.scale, device, repeats))
    print(_table(results, label))
    if args.json_path:
        payload = dict(device=label, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                       command=" ".join(["python -m adapter_fused", *forwarded]), results=results)
        with open(args.json_path, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {args.json_path}")
    return 0
