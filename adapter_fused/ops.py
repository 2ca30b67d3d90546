"""The fused adapter op: dispatch and autocast around the registered torch operators.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before Triton was first imported (importing this
package imports it), and the reference otherwise. float64 (and any dtype or device the kernels do
not cover) runs the reference.

The kernels are reached through ``torch.ops.adapter_fused.adapter_forward`` (and its registered
backward, ``adapter_backward``; see ``library.py``), so torch.compile traces ``fused_adapter``
without a graph break and CUDA graphs, DDP, FSDP2 and checkpointing see ordinary operators.

Importing this module imports neither the compiler stack (``torch._dynamo``, sympy) nor Triton:
both load on first use.
"""

import contextlib
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from .library import EagerAdapterFunction, adapter_forward, launch_forward, load_kernels
from .reference import reference_adapter
from .validation import check_adapter_args

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FnT = TypeVar("FnT", bound=Callable[..., object])

# The attribute torch.compiler.assume_constant_result sets; torch's public decorator imports
# torch._dynamo (about two seconds) just to set it. tests/test_import.py checks that the public
# decorator still marks functions this way.
CONSTANT_RESULT_MARKER = "_dynamo_marked_constant"


def assume_constant_result(fn: FnT) -> FnT:
    """``torch.compiler.assume_constant_result`` without importing the compiler: torch.compile
    evaluates ``fn`` once while tracing instead of tracing into it. Uses the public decorator when
    the compiler is already loaded, and otherwise sets the same marker it sets."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, CONSTANT_RESULT_MARKER, True)
    return fn


@assume_constant_result
def kernels_available(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the Triton kernels (on the GPU or in the interpreter).

    Fixed for the life of the process, so torch.compile evaluates it once while tracing."""
    kernels = load_kernels()
    if kernels is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(kernels.INTERPRET)


Params = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def checked_call(
    fn: str,
    x: torch.Tensor,
    params: Params,
    activation: str,
    scale: float,
    stacked: bool = False,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Params, str, float, bool, torch.Tensor | None]:
    """Validate an adapter call and apply autocast, as ``F.linear`` would: under autocast the
    parameters are cast to the autocast dtype and x (and the residual) to the type x + that dtype
    promotes to.

    Returns (x, params, canonical activation, scale, whether the Triton kernels run it, residual).
    """
    if torch.compiler.is_compiling() and isinstance(scale, (float, torch.SymFloat)):
        # torch.compile(dynamic=True) turns float attributes such as FusedAdapter.scale into
        # symbolic floats, which the finiteness check cannot inspect: specialize on the value
        # (a guard; a changed scale recompiles). Imported here: the module pulls in sympy.
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        scale = guard_scalar(scale)
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    act, scale_f = check_adapter_args(fn, x, *params, activation, scale, same_dtype=not autocast, stacked=stacked,
                                      residual=residual)
    if autocast:
        compute = torch.get_autocast_dtype(x.device.type)
        params = tuple(p.to(compute) if p is not None else None for p in params)  # type: ignore[assignment]
        x = x.to(torch.promote_types(x.dtype, compute))
        residual = residual.to(x.dtype) if residual is not None else None
    use_kernels = params[0].dtype in KERNEL_DTYPES and x.dtype in KERNEL_DTYPES and kernels_available(x.device)
    return x, params, act, scale_f, use_kernels, residual


def module_call_ready(x: object, params: Params, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a module's call may skip validation and go straight to ``run_kernels``: eager (not
    traced), no autocast, x a plain tensor (..., d) on the parameters' device in their dtype (one the
    kernels run), and the four parameters present with the module's ``shapes`` (checked per call:
    cheap, and a parameter may have been replaced). Anything else takes the validating path."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    dtype, device = x.dtype, x.device
    if dtype not in KERNEL_DTYPES or x.dim() == 0 or x.shape[-1] != shapes[0][1]:
        return False
    for p, shape in zip(params, shapes):
        if p is None or p.dtype != dtype or p.shape != shape or p.device != device:
            return False
    return not torch.is_autocast_enabled(device.type) and kernels_available(device)


def run_kernels(x: torch.Tensor, params: Params, activation: str, scale: float,
                index: torch.Tensor | None = None, rows_per_index: int = 1,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """The fused op on x (..., d) viewed as (M, d); h is kept only when autograd needs it.

    Traced by torch.compile, this is the registered operator (one opaque node). Eager, the
    operator's dispatcher is skipped: with autograd recording, its formula runs as an
    ``autograd.Function``; without, the launcher runs directly."""
    grad = torch.is_grad_enabled()
    save_h = grad and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    fixed = torch.are_deterministic_algorithms_enabled()
    d = x.shape[-1]
    res = residual.reshape(-1, d) if residual is not None else None
    args = (x.reshape(-1, d), *params, activation, scale, save_h, fixed, index, rows_per_index, res)
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            y, _ = adapter_forward(*args)
        elif save_h or (grad and res is not None and res.requires_grad):
            y, _ = EagerAdapterFunction.apply(*args)
        else:
            y = launch_forward(*args)
    return y.view(x.shape)


def fused_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scale: float = 1.0,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A bottleneck adapter in one fused pass:
    ``y = x + scale * (act(x @ down_weight.T + down_bias) @ up_weight.T + up_bias)``, or with
    ``residual`` (shaped like x) ``y = residual + scale * (...)`` (for placements whose residual is
    not the adapter's input), still one pass.

    Shapes (nn.Linear layout): x (..., d) with any leading dims and strides; down_weight (r, d);
    down_bias (r,) or None; up_weight (d, r); up_bias (d,) or None. Returns a contiguous tensor
    shaped like x. x and the parameters share a dtype (fp32, fp16 or bf16 run the kernels);
    under ``torch.autocast`` the projections run in the autocast dtype, as ``F.linear`` would, and
    the residual is added in x's dtype. Differentiable in x and every parameter.

    Raises TypeError/ValueError naming the offending argument before anything is launched.
    """
    x, params, act, scale_f, use_kernels, residual = checked_call(
        "fused_adapter", x, (down_weight, down_bias, up_weight, up_bias), activation, scale, residual=residual)
    if not use_kernels:
        with torch.autocast(x.device.type, enabled=False):
            return reference_adapter(x, *params, act, scale_f, residual=residual)
    return run_kernels(x, params, act, scale_f, residual=residual)
