"""The bound launch: a module's one-pass forward launched through its compiled kernel's handle, without
Triton's per-call argument binding, specialization and cache lookup. This is the one module of
adapter_fused that reaches into Triton's internals; every other launch goes through ``kernel[grid](...)``.

What it relies on, read in Triton's source for the versions in ``CHECKED_TRITON_VERSIONS`` (3.6, the
GPU image's, and 3.9): ``triton/runtime/jit.py`` (``JITFunction.run`` and ``warmup``),
``triton/compiler/compiler.py`` (``CompiledKernel``) and ``triton/backends/nvidia/driver.py`` (the
launcher behind ``CompiledKernel.run``).

- ``JITFunction.warmup(*args, grid=..., **kwargs)`` compiles, or finds in the JIT cache, the kernel that
  ``JITFunction.run`` would launch for these arguments, and returns it without launching (an
  asynchronous compile may hand back a future: ``.result()``).
- ``JITFunction.run`` launches that kernel, in both versions, as::

      kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
                 kernel.launch_metadata(grid, stream, *args),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)

  with ``args`` every parameter of the jit function in signature order, constexprs and block sizes
  included (the generated launcher skips the constexpr positions), ``device =
  driver.active.get_current_device()`` and ``stream = driver.active.get_current_stream(device)``.
  ``CompiledKernel.run`` is a property that loads the binary first, which sets ``function``.
- The two launch hooks are ``knobs.HookChain`` objects in both versions, never None; the launcher calls
  a hook that is not None (with ``launch_metadata``'s result, which is None when the enter hook is).
  A chain with no hooks added (``calls`` empty) does nothing when called, so a bound launch passes
  None in its place and skips ``launch_metadata``.
- ``JITFunction.run`` also calls the function's ``pre_run_hooks``: a kernel with any is not bound.
- Its JIT specializes an integer argument equal to 1 as a constant, one divisible by 16 with a hint,
  one of 2**31 or more as i64, and a pointer on 16-byte alignment (``rows_class`` follows this, and a
  bound launch takes only 16-byte aligned tensors).

On another Triton version, in the interpreter, or when any of these names is missing, nothing binds
and every launch goes through ``JITFunction.run``.
"""

from collections.abc import Callable
from typing import Any

import torch
import triton

from .fused import fused_rows_tuned
from .launch import chosen_config, fused_forward_launch, row_tiles
from .tuning import INTERPRET, MAX_FUSED_R, MAX_ROWS_BUCKET, MIN_ROWS_BUCKET, padded_rank

CHECKED_TRITON_VERSIONS = ("3.6", "3.9")
"""Triton releases (major.minor) whose launch convention this module was checked against."""

BIND_LAUNCHES = True
"""Whether ``bind_forward`` binds compiled kernels (False: every launch goes through Triton's
``JITFunction.run``; the acceptance run times both ways)."""

_HOOK_CHAIN = getattr(getattr(triton, "knobs", None), "HookChain", None)
"""The type of Triton's default launch hooks: a chain of added hooks, empty unless a profiler or user
added one, so never None (see the module docstring)."""

_COMPILED_NAMES = ("run", "function", "packed_metadata", "launch_metadata")  # in this order: run loads function


def version_checked(version: str) -> bool:
    """Whether a Triton version string (``triton.__version__``) is one of ``CHECKED_TRITON_VERSIONS``."""
    return ".".join(version.split(".")[:2]) in CHECKED_TRITON_VERSIONS


def _launch_hooks() -> Any | None:
    """``triton.knobs.runtime`` (where the launch enter and exit hooks are set), or None without it."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    names = ("launch_enter_hook", "launch_exit_hook")
    return runtime if runtime is not None and all(hasattr(runtime, name) for name in names) else None


def _driver_functions() -> tuple[Callable[[], int], Callable[[int], Any]] | None:
    """(current device index, raw current stream of a device index), as Triton's launcher gets them;
    None where the active driver does not offer them."""
    try:
        from triton.runtime import driver

        active = driver.active
        return active.get_current_device, active.get_current_stream
    except (ImportError, AttributeError, RuntimeError):
        return None


def _compiled_kernel(fn: Any, grid: Any, args: tuple[Any, ...], config: dict[str, Any]) -> Any | None:
    """The compiled kernel ``fn[grid](*args, **config)`` launches (compiled now if it was not), without
    launching it; None where there is none to launch directly: the interpreter, a Triton version not
    in ``CHECKED_TRITON_VERSIONS``, a missing name, a kernel with pre-run hooks."""
    if INTERPRET or not version_checked(triton.__version__) or _launch_hooks() is None:
        return None
    if getattr(fn, "pre_run_hooks", None) or not callable(getattr(fn, "warmup", None)):
        return None
    kernel = fn.warmup(*args, grid=grid, **config)
    if hasattr(kernel, "result"):  # an asynchronous compile's future (as JITFunction.run checks it)
        kernel = kernel.result()
    return kernel if kernel is not None and all(hasattr(kernel, name) for name in _COMPILED_NAMES) else None


_MIN_EXPONENT, _MAX_EXPONENT = MIN_ROWS_BUCKET.bit_length() - 1, MAX_ROWS_BUCKET.bit_length() - 1
_SINGLE_ROW = (_MIN_EXPONENT, 1)


def rows_class(rows: int) -> tuple[int, int]:
    """What the compiled one-pass forward depends on in a row count (rows >= 1): (log2 of its tuning
    bucket, ``tuning.rows_bucket``; how Triton's JIT specializes the integer: 1 for a single row (a
    constant), else 16 for a multiple of 16, plus 64 from 2**31 rows on (i64)). Row counts of one class
    launch the same compiled kernel with the same config. Cheap: it keys every bound call."""
    if rows == 1:
        return _SINGLE_ROW
    exponent = (rows - 1).bit_length()
    if exponent < _MIN_EXPONENT:
        exponent = _MIN_EXPONENT
    elif exponent > _MAX_EXPONENT:
        exponent = _MAX_EXPONENT
    return exponent, (16 if rows & 15 == 0 else 0) + (64 if rows >= 2**31 else 0)


def bindable(x: torch.Tensor) -> bool:
    """Whether x can be launched by a bound forward, and so serve to bind one: contiguous and 16-byte
    aligned (the compiled kernel is specialized on aligned pointers)."""
    return x.is_contiguous() and not x.data_ptr() & 15


class BoundForward:
    """The one-pass forward (no h kept) for one set of 2-D parameters, activation, determinism setting,
    input dtype and class of row count (``rows_class``), bound once: the compiled kernel and its
    argument list prepared. It holds the parameters and constants only: a call copies the list, puts x,
    the residual, y, the row count and the scale into their slots and launches the compiled kernel as
    ``JITFunction.run`` does (current stream, launch hooks), without its per-call argument binding,
    specialization and cache lookup; the copy goes when the call returns.

    Valid while the parameters it was bound with are unchanged (same tensors, shapes, strides, data
    pointers), for inputs of its class with the bound width D: the caller checks both. A call whose x
    (or residual) is not contiguous and 16-byte aligned (the kernel was specialized on it), or that
    runs with another current device, returns None and launches nothing.
    """

    __slots__ = ("args", "block_m", "current_device", "current_stream", "device", "function", "hooks", "kernel",
                 "launcher", "out_slot", "packed", "res_slot", "rows_slot", "scale_slot", "x_slots")

    def __init__(self, kernel: Any, args: list[Any], slots: dict[str, Any], block_m: int, device: int,
                 current_device: Callable[[], int], current_stream: Callable[[int], Any], hooks: Any) -> None:
        self.kernel = kernel
        self.hooks = hooks  # triton.knobs.runtime: its launch hooks are read on every call
        self.launcher = kernel.run  # first: loading the binary sets ``function``
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.args = args
        self.x_slots: tuple[int, ...] = slots["x"]
        self.out_slot: int = slots["out_ptr"]
        self.res_slot: int = slots["res_ptr"]
        self.rows_slot: int = slots["M"]
        self.scale_slot: int = slots["scale"]
        self.block_m = block_m
        self.device = device
        self.current_device = current_device
        self.current_stream = current_stream

    def __call__(self, x: torch.Tensor, rows: int, scale: float, residual: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
        """x (..., D) holding ``rows`` rows of D -> y (..., D) contiguous in x's dtype, ``residual`` (x's
        shape and dtype) added in place of x when given; or None (nothing launched)."""
        if not x.is_contiguous() or x.data_ptr() & 15 or self.current_device() != self.device:
            return None
        if residual is not None and (not residual.is_contiguous() or residual.data_ptr() & 15):
            return None
        y = torch.empty_like(x)
        args = self.args.copy()
        for i in self.x_slots:
            args[i] = x
        if residual is not None:
            args[self.res_slot] = residual
        args[self.out_slot] = y
        args[self.rows_slot] = rows
        args[self.scale_slot] = scale
        programs = (rows + self.block_m - 1) // self.block_m
        stream = self.current_stream(self.device)
        hooks = self.hooks
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        if type(enter) is _HOOK_CHAIN and not enter.calls:  # nothing to call: the launcher skips None
            enter = None
        if type(leave) is _HOOK_CHAIN and not leave.calls:
            leave = None
        metadata = None if enter is None else self.kernel.launch_metadata((programs, 1, 1), stream, *args)
        self.launcher(programs, 1, 1, stream, self.function, self.packed, metadata, enter, leave, *args)
        return y


def bind_forward(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: int,
    fixed_config: bool = False,
) -> BoundForward | None:
    """Bind the one-pass forward for x's class of row count (``rows_class``) and these 2-D parameters
    (down_weight (R, D), down_bias (R,) | None, up_weight (D, R), up_bias (D,) | None), after
    ``adapter_forward`` has launched it once for this shape key (the configuration is chosen then).
    x (..., D) serves to specialize the kernel and is not kept.

    None when it cannot be bound: binding switched off (``BIND_LAUNCHES``), no compiled kernel to
    launch directly (see ``_compiled_kernel``), no device functions, an empty, non-contiguous or
    unaligned x, a bottleneck for the two-kernel path, no configuration chosen yet, or x on another
    device than the current one.
    """
    if not BIND_LAUNCHES or down_weight.dim() != 2 or x.dim() == 0:
        return None
    D, R = x.shape[-1], down_weight.shape[0]
    M = x.numel() // D if D else 0
    if M == 0 or padded_rank(R) > MAX_FUSED_R or not bindable(x):
        return None
    driver = _driver_functions()
    if driver is None:
        return None
    x2 = x.view(M, D)
    y2 = torch.empty_like(x2)
    args, memo = fused_forward_launch(x2, down_weight, down_bias, up_weight, up_bias, y2, None, x2, None, 1,
                                      activation, 1.0, fixed_config)
    tuned = fused_rows_tuned
    config = chosen_config(tuned, memo)
    names = list(tuned.arg_names)
    blocks = names[len(args):]
    if config is None or names[:len(args)] != list(args._fields) or any(name not in config for name in blocks):
        return None
    if args.out_ptr is not y2 or args.res_ptr is not x2:
        return None
    kernel = _compiled_kernel(tuned.fn, row_tiles(M), args, config)
    hooks = _launch_hooks()
    if kernel is None or hooks is None:
        return None
    current_device, current_stream = driver
    device = current_device()
    if x.is_cuda and x.device.index != device:
        return None
    values = [*args, *(config[name] for name in blocks)]
    x_slots = tuple(i for i, v in enumerate(values) if v is x2)
    slots: dict[str, Any] = {"x": x_slots}
    slots.update((name, args._fields.index(name)) for name in ("out_ptr", "res_ptr", "M", "scale"))
    for i in (*x_slots, slots["out_ptr"]):
        values[i] = None  # filled per call
    params = [p for p in (down_weight, down_bias, up_weight, up_bias) if p is not None]
    if any(isinstance(v, torch.Tensor) and not any(v is p for p in params) for v in values):
        return None  # a slot not filled per call would keep a tensor of this call alive
    return BoundForward(kernel, values, slots, config["BLOCK_M"], device, current_device, current_stream, hooks)
