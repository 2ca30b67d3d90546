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


class CheckedParameters:
    """A module's four parameters as checked once (present, one kernel dtype, one device the kernels
    run on, the module's shapes), with what a call may then skip: the stamp says whether they are
    still the same tensors in the same storage and unchanged in place (``_version`` counts in-place
    changes, ``resize_`` among them; ``.data`` assignment, as ``Module.to`` does, changes the data
    pointer), and ``plans`` keeps a bound kernel launch per input shape (see ``module_forward``)."""

    __slots__ = ("d", "device", "device_type", "dtype", "params", "plans", "stamp")

    MAX_PLANS = 16
    """Input shapes bound per module; more clear the table (varying prompt lengths)."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.stamp = parameter_stamp(params)
        weight = params[0]
        self.dtype, self.device, self.device_type = weight.dtype, weight.device, weight.device.type
        self.d = weight.shape[-1]
        self.plans: dict[tuple[object, ...], object] = {}

    def current(self, params: Params) -> bool:
        """Whether ``params`` are the checked tensors, unchanged but for their values."""
        mine = self.params
        return (params[0] is mine[0] and params[1] is mine[1] and params[2] is mine[2] and params[3] is mine[3]
                and parameter_stamp(params) == self.stamp)


def parameter_stamp(params: Params) -> tuple[int, ...]:
    """(version counter, data pointer) of each of four present parameters."""
    w1, b1, w2, b2 = params
    return (w1._version, w1.data_ptr(), b1._version, b1.data_ptr(),  # type: ignore[union-attr]
            w2._version, w2.data_ptr(), b2._version, b2.data_ptr())  # type: ignore[union-attr]


def check_module_parameters(params: Params, shapes: tuple[tuple[int, ...], ...]) -> CheckedParameters | None:
    """The checks a module's own parameters pass once, for ``module_forward``: all four present (not
    reparametrized), shaped as the module's ``shapes``, sharing a dtype the kernels run and a device
    they run on. None when any fails (the call then takes the validating path)."""
    if any(p is None or type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in params):
        return None
    dtype, device = params[0].dtype, params[0].device
    if dtype not in KERNEL_DTYPES:
        return None
    for p, shape in zip(params, shapes):
        if p.dtype != dtype or p.shape != shape or p.device != device:  # type: ignore[union-attr]
            return None
    return CheckedParameters(params) if kernels_available(device) else None


def module_forward(state: CheckedParameters, x: object, params: Params, activation: str, scale: float
                   ) -> torch.Tensor | None:
    """A module's call with parameters ``state`` checked (``state.current(params)`` holds): x (..., d)
    -> y, or None when the call needs the validating path (x not a plain tensor on the parameters'
    device in their dtype, autocast on, or being traced by torch.compile, which the caller checks
    first). No per-call check of the parameters, no dispatcher.

    Without autograd recording, the first call for an input shape launches through Triton's launcher
    and binds the compiled kernel (``kernels.bind_forward``); later calls for that shape launch it
    directly, filling in only the pointers of x and y."""
    if type(x) is not torch.Tensor or x.dtype is not state.dtype or x.device != state.device:
        return None
    if torch.is_autocast_enabled(state.device_type):
        return None
    record = torch.is_grad_enabled() and (x.requires_grad or params[0].requires_grad or params[1].requires_grad  # type: ignore[union-attr]
                                          or params[2].requires_grad or params[3].requires_grad)  # type: ignore[union-attr]
    if record:
        if x.dim() == 0 or x.shape[-1] != state.d:
            return None
        return run_kernels(x, params, activation, scale)
    fixed = torch.are_deterministic_algorithms_enabled()
    key = (x.shape, activation, fixed)
    plans = state.plans
    plan = plans.get(key)
    if plan:
        y = plan(x, scale)  # type: ignore[operator]
        if y is not None:
            return y
    if x.dim() == 0 or x.shape[-1] != state.d:
        return None
    y = run_kernels(x, params, activation, scale)
    if plan is None:
        if len(plans) >= state.MAX_PLANS:
            plans.clear()
        kernels = load_kernels()
        bound = kernels.bind_forward(x, *params, kernels.ACTIVATION_CODES[activation], fixed) if kernels else None
        plans[key] = bound or False  # False: not bindable, no further attempt
    return y


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
