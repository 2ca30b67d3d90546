"""Compile the kernels for a Hopper GPU (sm_90) without one, exactly as a first launch would, and read
ptxas's resource usage (registers, spill bytes, shared memory) for every configuration that launch may
try.

The launchers in ``kernels/launch.py`` run on meta tensors with the kernel launch replaced by a
recorder, so each recorded launch carries the real argument values; every tuning configuration that
survives the launcher's pruning is then compiled with the specialization Triton's JIT gives those
values (integers equal to 1 become constants, integers divisible by 16 and tensor pointers carry a
divisibility-16 hint) and ptxas's ``-v`` report is parsed.

Run as a script for the per-configuration table (``python tests/kernels/sm90.py``); the interpreter
must be off (it is: this file unsets ``TRITON_INTERPRET`` before importing Triton when run directly).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas and its report
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch

# The launches a first call makes, at the headline width and every padded bottleneck class with
# configs of its own: (rows, d, r, dtype). r = 64 is the headline problem; 256 the widest one-pass
# bottleneck; 512 the two-kernel path.
SHAPES: tuple[tuple[int, int, int, torch.dtype], ...] = (
    (16384, 4096, 64, torch.bfloat16),
    (16384, 4096, 128, torch.bfloat16),
    (16384, 4096, 256, torch.bfloat16),
    (4096, 4096, 512, torch.bfloat16),
)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes one block may use on sm_90


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the autotuned kernel and its argument record (``kernels/records.py``)."""

    tuned: Any
    args: Any

    @property
    def named(self) -> dict[str, Any]:
        """The kernel's arguments by name (all but the configuration's block sizes)."""
        return dict(self.args._asdict())

    @property
    def name(self) -> str:
        """The kernel and the pass it serves, e.g. ``fused_rows_kernel backward``."""
        named = self.named
        backward = named.get("BACKWARD", not named.get("APPLY_ACT", True))
        if self.tuned.fn.__name__ == "weight_grad_kernel":
            return "weight_grad_kernel backward"
        return f"{self.tuned.fn.__name__} {'backward' if backward else 'forward'}"

    def configs(self) -> list[Any]:
        """The configurations this launch may try on its first call (after the launcher's pruning)."""
        return list(self.tuned.early_config_prune(self.tuned.configs, self.named))


@dataclass(frozen=True)
class Usage:
    """ptxas's report for one compiled configuration."""

    kernel: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    seconds: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Replace the launchers' kernel launch with a recorder for the duration of the block."""
    from adapter_fused.kernels import launch as launch_module

    recorded: list[Launch] = []
    original = launch_module._launch

    def record(tuned: Any, grid: Any, args: Any, *, fixed_config: bool, memo: Any = None) -> None:
        recorded.append(Launch(tuned, args))

    launch_module._launch = record
    try:
        yield recorded
    finally:
        launch_module._launch = original


def first_call_launches(rows: int, d: int, r: int, dtype: torch.dtype) -> list[Launch]:
    """The tuned launches of a training step (forward keeping h, backward of every input) on meta tensors."""
    from adapter_fused.kernels import adapter_backward_packed, adapter_forward

    meta = torch.device("meta")
    x = torch.empty(rows, d, dtype=dtype, device=meta)
    down_w, up_w = torch.empty(r, d, dtype=dtype, device=meta), torch.empty(d, r, dtype=dtype, device=meta)
    down_b, up_b = torch.empty(r, dtype=dtype, device=meta), torch.empty(d, dtype=dtype, device=meta)
    h = torch.empty(rows, r, dtype=torch.float32, device=meta)
    with recording() as recorded:
        adapter_forward(x, down_w, down_b, up_w, up_b, 2, 1.0, save_h=True)
        adapter_backward_packed(x, x, h, down_w, up_w, 2, 1.0, need_x=True, need_down_weight=True,
                                need_down_bias=True, need_up_weight=True, need_up_bias=True, row_groups=1)
    return recorded


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                 torch.int32: "i32"}


def specialize(kernel: Any, args: dict[str, Any]) -> tuple[dict[str, str], dict[tuple[int, ...], Any],
                                                            dict[tuple[int, ...], list[list[Any]]]]:
    """(signature, constants, attributes) of ``kernel`` for these argument values, as Triton's JIT
    specializes them: constexpr parameters and integers equal to 1 become constants; tensors are
    pointers (16-byte aligned, as PyTorch allocates) and integers divisible by 16 get a hint."""
    signature: dict[str, str] = {}
    constants: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if i in kernel.constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, bool) or value == 1:
            signature[name] = "constexpr"
            constants[(i,)] = value
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_config(launch: Launch, config: Any) -> Usage:
    """Compile one configuration of a recorded launch for sm_90 and parse ptxas's report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    kernel = launch.tuned.fn
    values = {**launch.named, **config.kwargs}
    signature, constants, attrs = specialize(kernel, values)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.perf_counter() - start
    report = log.getvalue()
    registers = _REGISTERS.search(report)
    spills = _SPILLS.search(report)
    if registers is None or spills is None:
        raise RuntimeError(f"{kernel.__name__}: no ptxas report (is TRITON_DUMP_PTXAS_LOG=1 set and the cache "
                           f"empty?):\n{report[-2000:]}")
    return Usage(kernel.__name__, describe(config), int(registers.group(1)), int(spills.group(1)),
                 int(spills.group(2)), int(compiled.metadata.shared), seconds)


def describe(config: Any) -> str:
    """``BLOCK_M=64 BLOCK_K=64 BLOCK_N=64 w8 s3``."""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def survey(shapes: tuple[tuple[int, int, int, torch.dtype], ...] = SHAPES
           ) -> Iterator[tuple[tuple[int, int, int, str], str, Usage]]:
    """Every configuration every first-call launch of ``shapes`` may try, compiled:
    (shape, launch name, usage)."""
    for m, d, r, dtype in shapes:
        for launch in first_call_launches(m, d, r, dtype):
            for config in launch.configs():
                yield (m, d, r, str(dtype).removeprefix("torch.")), launch.name, compile_config(launch, config)


def main(shapes: tuple[tuple[int, int, int, torch.dtype], ...] = SHAPES) -> None:
    """Print one row per compiled configuration, then the count per kernel and shape."""
    print(f"{'rows':>6} {'d':>5} {'r':>4} {'dtype':<9} {'kernel':<20} {'config':<44} {'regs':>4} {'spill':>6} "
          f"{'smem':>7} {'secs':>5}", flush=True)
    counts: dict[str, int] = {}
    for (m, d, r, dtype), name, u in survey(shapes):
        label = f"{name} r={r}"
        counts[label] = counts.get(label, 0) + 1
        print(f"{m:>6} {d:>5} {r:>4} {dtype:<9} {u.kernel:<20} {u.config:<44} {u.registers:>4} {u.spills:>6} "
              f"{u.shared_bytes:>7} {u.seconds:>5.1f}", flush=True)
    for label, count in counts.items():
        print(f"configs tried by a first launch: {label}: {count}", flush=True)


if __name__ == "__main__":
    # Optional arguments pick shapes by index into SHAPES (the test splits them over two processes).
    picked = tuple(SHAPES[int(i)] for i in sys.argv[1:]) or SHAPES
    main(picked)
