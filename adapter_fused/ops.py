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

import sys
from collections.abc import Callable, MutableMapping
from types import ModuleType
from typing import Any, TypeVar

import torch

from .library import EagerAdapterFunction, adapter_forward, launch_forward, load_kernels
from .reference import adapter_math, gather_rows, rows_math
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
    """Validate an adapter call and apply autocast, as ``F.linear`` would: under autocast x (and the
    residual) are cast to the type x + the autocast dtype promotes to, and the parameters to the
    autocast dtype when the Triton kernels run the call (the reference's ``F.linear`` casts them
    itself: it runs under the caller's autocast).

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
        x = x.to(torch.promote_types(x.dtype, compute))
        residual = residual.to(x.dtype) if residual is not None else None
        use_kernels = compute in KERNEL_DTYPES and x.dtype in KERNEL_DTYPES and kernels_available(x.device)
        if use_kernels:
            params = tuple(p.to(compute) if p is not None else None for p in params)  # type: ignore[assignment]
    else:
        use_kernels = params[0].dtype in KERNEL_DTYPES and x.dtype in KERNEL_DTYPES and kernels_available(x.device)
    return x, params, act, scale_f, use_kernels, residual


class CheckedParameters:
    """A module's four parameters as checked once, with what a call may then skip.

    ``usable``: the parameters passed the checks a call would make of them (all four plain tensors,
    floating point, one dtype and device, the module's shapes); ``kernels``: the kernels module when
    the Triton kernels run them (a kernel dtype on a device they run on), None when the reference runs
    them. An unusable set is kept too (a negative answer): calls take the validating path without
    checking the module's parameters again. The stamp (version counter and data pointer of each) says
    whether the parameters are unchanged in place and in the same storage (``_version`` counts in-place
    changes, ``resize_`` among them; ``.data`` assignment, as ``Module.to`` does, changes the data
    pointer); ``current`` reads as much of it as the path that runs them needs.
    ``plans`` keeps a bound kernel launch per activation, determinism setting, class of row count and
    (fp32) TF32 setting (see ``module_forward``): never more than ``MAX_PLANS``, holding parameters and
    constants only; ``last`` is the plan the latest bound call took, with the row count and settings
    it was taken for (a call like it skips the table)."""

    __slots__ = ("d", "device", "device_type", "dtype", "kernels", "last", "params", "plans", "stamp", "usable")
    dtype: torch.dtype | None
    device: torch.device | None

    MAX_PLANS = 32
    """Bound launches per module; more clear the table. However many distinct input shapes a module
    sees, their row counts fall into a few classes (``kernels.rows_class``: 12 tuning buckets, and in
    each how Triton specializes the integer), so the table stays small without clearing."""

    def __init__(self, params: Params, usable: bool = True, kernels: ModuleType | None = None) -> None:
        self.params = params
        self.stamp = parameter_stamp(params)
        self.usable = usable
        self.kernels = kernels
        weight = params[0]
        if usable and weight is not None:
            self.dtype, self.device, self.device_type = weight.dtype, weight.device, weight.device.type
            self.d = weight.shape[-1]
        else:
            self.dtype, self.device, self.device_type, self.d = None, None, "", -1
        self.plans: dict[tuple[object, ...], object] = {}
        self.last: tuple[object, ...] = ()

    def current(self, params: Params) -> bool:
        """Whether ``params`` are the checked tensors, unchanged but for their values.

        Where the reference runs them (``kernels`` None): whether they are the same tensors, with the
        down weight in the same storage (moving or casting the module, as ``Module.to`` does, gives it
        new storage). The reference's operators take the tensors as they are at each call and check
        them as they would for ``nn.Linear`` (see ``module_forward``). Where the kernels run them, also
        every parameter's storage and in-place version: a bound launch was specialized on their dtype,
        shape and alignment."""
        w1, b1, w2, b2 = params
        mine = self.params
        if w1 is not mine[0] or b1 is not mine[1] or w2 is not mine[2] or b2 is not mine[3]:
            return False
        if b1 is None or b2 is None or w1 is None or w2 is None:  # type: ignore[redundant-expr]
            return parameter_stamp(params) == self.stamp
        stamp = self.stamp  # compared one by one: no tuple built on the hot path
        if w1.data_ptr() != stamp[1]:
            return False
        return self.kernels is None or (
            w1._version == stamp[0] and b1._version == stamp[2] and b1.data_ptr() == stamp[3]
            and w2._version == stamp[4] and w2.data_ptr() == stamp[5] and b2._version == stamp[6]
            and b2.data_ptr() == stamp[7])


def parameter_stamp(params: Params) -> tuple[int, ...]:
    """(version counter, data pointer) of each of four parameters ((-1, 0) for an absent one)."""
    w1, b1, w2, b2 = params
    try:
        return (w1._version, w1.data_ptr(), b1._version, b1.data_ptr(),  # type: ignore[union-attr]
                w2._version, w2.data_ptr(), b2._version, b2.data_ptr())  # type: ignore[union-attr]
    except AttributeError:  # an absent parameter (None)
        return tuple(v for p in params for v in ((-1, 0) if p is None else (p._version, p.data_ptr())))


def _plain(t: object) -> bool:
    return type(t) is torch.nn.Parameter or type(t) is torch.Tensor


def check_module_parameters(params: Params, shapes: tuple[tuple[int, ...], ...]) -> CheckedParameters | None:
    """The checks a module's own parameters pass once, for ``module_forward``: all four present (not
    reparametrized, no bias removed), plain tensors shaped as the module's ``shapes``, sharing a
    floating dtype and a device; whether the kernels run them. A set that fails is returned unusable
    (the call then takes the validating path); None only for tensor subclasses, which are checked on
    every call."""
    if any(p is not None and not _plain(p) for p in params):
        return None
    if any(p is None for p in params):
        return CheckedParameters(params, usable=False)
    dtype, device = params[0].dtype, params[0].device  # type: ignore[union-attr]
    if not dtype.is_floating_point:
        return CheckedParameters(params, usable=False)
    for p, shape in zip(params, shapes):
        if p.dtype != dtype or p.shape != shape or p.device != device:  # type: ignore[union-attr]
            return CheckedParameters(params, usable=False)
    kernels = load_kernels() if dtype in KERNEL_DTYPES and kernels_available(device) else None
    return CheckedParameters(params, usable=True, kernels=kernels)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
"""Whether autocast is on for any device (one C call; the per-device question costs twice as much)."""


def autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, answered by one cheaper call when no autocast is on
    (eager only: torch.compile does not know the cheaper call)."""
    if _any_autocast is not None and not _any_autocast():
        return False
    return torch.is_autocast_enabled(device_type)


CheckedTable = MutableMapping[Any, "CheckedParameters | None"]
"""Where a module's checked parameters are kept between calls: the module's own ``__dict__``, or a weak
table beside modules that are not ours (keyed by the module)."""


def module_forward(table: CheckedTable, key: object, params: Params, shapes: tuple[tuple[int, ...], ...] | None,
                   x: object, activation: str, scale: float, residual: object = None) -> torch.Tensor | None:
    """A module's eager call: x (..., d), residual (x's shape) or None -> y, or None when the call needs
    the validating path (``fused_adapter``): parameters that fail the once-checks, x or the residual not
    a plain tensor on the parameters' device in their dtype, shapes that do not fit, autocast on. The
    caller checks first that torch.compile is not tracing.

    The parameters (down_weight (r, d), down_bias (r,), up_weight (d, r), up_bias (d,), as ``shapes``
    says; None: their own shapes) are checked once, kept in ``table[key]``, and checked again only when
    one is replaced, moved or changed other than in value (``CheckedParameters.current``; a failed check
    is kept too). No per-call check of the parameters, no dispatcher.

    Where the kernels do not run the parameters, the reference's math runs directly; without a residual
    it runs before any check of x, whose operators check it as they do for ``nn.Linear`` (a call they
    refuse takes the validating path for the library's error). Without autograd recording, the first
    call of a class of row counts (``kernels.rows_class``) launches through Triton's launcher and binds the compiled kernel (``kernels.bind_forward``); later calls
    of that class launch it directly, filling in only x, the residual, y, the row count and the scale.
    A call with the row count, activation and settings of the module's previous bound call takes that
    plan without building its key (the steady state of decoding and of a fixed-shape forward)."""
    state = table.get(key)
    if state is None or not state.current(params):
        if shapes is None:
            shapes = tuple(() if p is None else tuple(p.shape) for p in params)
        state = table[key] = check_module_parameters(params, shapes)
    if state is None or not state.usable:
        return None
    autocast = autocast_on(state.device_type)
    if state.kernels is None and residual is None and not autocast:
        # The reference runs it: its operators check x as they would for nn.Linear, and a call they
        # refuse goes to the validating path, which raises the error that names what is wrong.
        try:
            return adapter_math(x, *params, activation, scale, None)  # type: ignore[arg-type]
        except (RuntimeError, TypeError):
            return None
    if type(x) is not torch.Tensor or x.dtype is not state.dtype or x.device != state.device:
        return None
    shape = x.shape
    d = state.d
    if not shape or shape[-1] != d:
        return None
    if residual is not None and (type(residual) is not torch.Tensor or residual.dtype is not state.dtype
                                 or residual.device != state.device or residual.shape != shape):
        return None
    if autocast:
        return None
    kernels = state.kernels
    if kernels is None:
        return adapter_math(x, *params, activation, scale, residual)  # type: ignore[arg-type]
    if torch.is_grad_enabled() and (
            x.requires_grad or params[0].requires_grad or params[1].requires_grad  # type: ignore[union-attr]
            or params[2].requires_grad or params[3].requires_grad  # type: ignore[union-attr]
            or residual is not None and residual.requires_grad):  # type: ignore[union-attr]
        return run_kernels(x, params, activation, scale, residual=residual)  # type: ignore[arg-type]
    rows = x.numel() // d
    fixed = torch.are_deterministic_algorithms_enabled()
    tf32 = state.dtype is torch.float32 and kernels.tf32_allowed()
    last = state.last
    if last and last[0] == rows and last[1] is activation and last[2] is fixed and last[3] is tf32:
        y = last[4](x, rows, scale, residual)  # type: ignore[operator]
        if y is not None:
            return y
    if rows == 0:
        return run_kernels(x, params, activation, scale, residual=residual)  # type: ignore[arg-type]
    plan_key: tuple[object, ...] = (activation, fixed, kernels.rows_class(rows))
    if state.dtype is torch.float32:  # the dots' precision was bound too: TF32 only where allowed
        plan_key += (tf32,)
    plans = state.plans
    plan = plans.get(plan_key)
    if plan:
        y = plan(x, rows, scale, residual)  # type: ignore[operator]
        if y is not None:
            state.last = (rows, activation, fixed, tf32, plan)
            return y
    y = run_kernels(x, params, activation, scale, residual=residual)  # type: ignore[arg-type]
    if plan is None and kernels.bindable(x):
        if len(plans) >= state.MAX_PLANS:
            plans.clear()
            state.last = ()
        plans[plan_key] = kernels.bind_forward(x, *params, kernels.ACTIVATION_CODES[activation], fixed) or False
    return y


def _launch_op(args: tuple, grad: bool, save_h: bool) -> torch.Tensor:
    """y (M, d) of the fused op on ``adapter_forward``'s twelve arguments, by the cheapest route for the
    world the call is in."""
    if torch.compiler.is_compiling():
        return adapter_forward(*args)[0]
    residual = args[-1]
    if save_h or (grad and residual is not None and residual.requires_grad):
        return EagerAdapterFunction.apply(*args)[0]
    return launch_forward(*args)


def _exported(x: torch.Tensor, params: Params, activation: str, scale: float, index: torch.Tensor | None,
              rows_per_index: int, residual: torch.Tensor | None) -> torch.Tensor:
    """The fused op as ``torch.export`` records it: the reference's operators (matrix products, the
    activation, additions) in place of the kernels' operator, which no other runtime knows."""
    if index is None:
        return adapter_math(x, *params, activation, scale, residual)
    d = x.shape[-1]
    x3 = x.reshape(index.shape[0], rows_per_index, d)
    res3 = residual.reshape(x3.shape) if residual is not None else None
    return rows_math(x3, gather_rows(index, *params), activation, scale, res3).reshape(x.shape)


def run_kernels(x: torch.Tensor, params: Params, activation: str, scale: float,
                index: torch.Tensor | None = None, rows_per_index: int = 1,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """The fused op on x (..., d) viewed as (M, d); h is kept only when autograd needs it.

    Traced by torch.compile, this is the registered operator (one opaque node). Eager, the
    operator's dispatcher is skipped: with autograd recording, its formula runs as an
    ``autograd.Function``; without, the launcher runs directly."""
    if torch.compiler.is_exporting():  # an exported program holds plain operators (ONNX and other runtimes)
        return _exported(x, params, activation, scale, index, rows_per_index, residual)
    grad = torch.is_grad_enabled()
    save_h = grad and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    fixed = torch.are_deterministic_algorithms_enabled()
    d = x.shape[-1]
    res = residual.reshape(-1, d) if residual is not None else None
    args = (x.reshape(-1, d), *params, activation, scale, save_h, fixed, index, rows_per_index, res)
    if torch.is_autocast_enabled(x.device.type):  # the inputs are cast already
        with torch.autocast(x.device.type, enabled=False):
            y = _launch_op(args, grad, save_h)
    else:
        y = _launch_op(args, grad, save_h)
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
        return adapter_math(x, *params, act, scale_f, residual)
    return run_kernels(x, params, act, scale_f, residual=residual)
