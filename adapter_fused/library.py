"""The fused adapter as registered torch operators, so torch.compile, CUDA graphs, DDP, FSDP2 and
activation checkpointing see one opaque op (forward) and one opaque op (backward).

    adapter_fused::adapter_forward(x, down_weight, down_bias, up_weight, up_bias,
                                   activation, scale, save_h, fixed_config,
                                   index=None, rows_per_index=1, residual=None) -> (y, h)
    adapter_fused::adapter_backward(grad, x, h, down_weight, up_weight, activation, scale,
                                    need_x, need_down_weight, need_down_bias, need_up_weight,
                                    need_up_bias, fixed_config, index=None, rows_per_index=1,
                                    residual_is_x=True) -> (dx, weight_grads)

With an ``index`` the same ops run the grouped adapter (weights stacked over n adapters, see
``grouped.py``).

Each op has a fake (meta) implementation giving output shapes without running anything, and the
forward op carries its autograd formula (``register_autograd``), which calls the backward op.

Why ``torch.library.custom_op`` and not ``torch.library.triton_op`` + ``wrap_triton``: a
``triton_op`` is traced by Inductor through its launcher, so every launch in ``kernels/launch.py``
would have to go through ``wrap_triton``, and the launcher picks configurations itself (an
``early_config_prune`` hook, and a fixed configuration launched on the bare ``JITFunction`` in
deterministic mode), which Inductor's user-kernel tracing does not reproduce. Under
``TRITON_INTERPRET=1`` this torch version's ``wrap_triton`` hands interpreted kernels back
unwrapped, so the CPU path would not be traceable at all and would differ from the GPU one. A
``custom_op`` is opaque to the compiler: the same launcher runs, unchanged, on CUDA and in the
interpreter, eager or compiled.
"""

import functools
from types import ModuleType

import torch
from torch import Tensor

NAMESPACE = "adapter_fused"


@functools.cache
def load_kernels() -> ModuleType | None:
    """The Triton kernels module, imported on first use (None where Triton is not installed)."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def _kernels_module() -> ModuleType:
    kernels = load_kernels()
    if kernels is None:  # the op is only dispatched to when the kernels imported
        raise RuntimeError("adapter_fused: the Triton kernels are not available on this machine")
    return kernels


# ---- forward --------------------------------------------------------------------------------------

def _forward_impl(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    activation: str,
    scale: float,
    save_h: bool,
    fixed_config: bool,
    index: Tensor | None = None,
    rows_per_index: int = 1,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x (M, d), down_weight (r, d), down_bias (r,) | None, up_weight (d, r), up_bias (d,) | None
    (stacked over n adapters with an ``index``: (n, r, d), (n, r), (n, d, r), (n, d)); residual
    (M, d) | None (None: x) -> y (M, d) contiguous in x's dtype, h (M, r) fp32 when ``save_h`` else
    an empty (0, r) fp32."""
    kernels = _kernels_module()
    y, h = kernels.adapter_forward(
        x, down_weight, down_bias, up_weight, up_bias, kernels.ACTIVATION_CODES[activation], scale, save_h,
        fixed_config, index=index, rows_per_index=rows_per_index, residual=residual,
    )
    if h is None:
        h = x.new_empty((0, down_weight.shape[-2]), dtype=torch.float32)
    return y, h


adapter_forward = torch.library.custom_op(f"{NAMESPACE}::adapter_forward", mutates_args=())(_forward_impl)


def launch_forward(*args: object) -> Tensor:
    """The forward launcher alone, for eager calls autograd does not record: the twelve arguments of
    ``adapter_forward`` (``save_h`` is ignored: h is not kept) -> y (M, d)."""
    x, down_weight, down_bias, up_weight, up_bias, activation, scale, _, fixed_config, index, per, residual = args
    kernels = _kernels_module()
    y, _ = kernels.adapter_forward(
        x, down_weight, down_bias, up_weight, up_bias, kernels.ACTIVATION_CODES[activation], scale, False,
        fixed_config, index=index, rows_per_index=per, residual=residual,
    )
    return y


@adapter_forward.register_fake
def _forward_fake(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    activation: str,
    scale: float,
    save_h: bool,
    fixed_config: bool,
    index: Tensor | None = None,
    rows_per_index: int = 1,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Shapes only: y (M, d) like x, h (M, r) or (0, r) fp32."""
    rows, r = x.shape[0], down_weight.shape[-2]
    y = x.new_empty((rows, x.shape[1]))
    h = x.new_empty((rows if save_h else 0, r), dtype=torch.float32)
    return y, h


# ---- backward -------------------------------------------------------------------------------------

def _packed_size(down_weight: Tensor, index: Tensor | None) -> int:
    """Elements of the flat parameter-gradient buffer: n * (2*d*r + d + r)."""
    r, d = down_weight.shape[-2:]
    n = down_weight.shape[0] if index is not None else 1
    return n * (2 * d * r + d + r)


def _backward_impl(
    grad: Tensor,
    x: Tensor,
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    activation: str,
    scale: float,
    need_x: bool,
    need_down_weight: bool,
    need_down_bias: bool,
    need_up_weight: bool,
    need_up_bias: bool,
    fixed_config: bool,
    index: Tensor | None = None,
    rows_per_index: int = 1,
    residual_is_x: bool = True,
) -> tuple[Tensor, Tensor]:
    """grad, x (M, d); h (M, r) fp32; weights as in the forward ->
    dx (M, d) in x's dtype (empty (0,) unless ``need_x``) and the parameter gradients packed into one
    flat buffer in the weights' dtype, laid out as ``kernels.weight_grad_layout`` says (empty (0,)
    when no parameter gradient is asked for). A custom op may not return outputs that overlap, so the
    gradients travel as one buffer and are cut into views by the autograd formula."""
    kernels = _kernels_module()
    dx, flat = kernels.adapter_backward_packed(
        grad, x, h, down_weight, up_weight, kernels.ACTIVATION_CODES[activation], scale,
        need_x=need_x, need_down_weight=need_down_weight, need_down_bias=need_down_bias,
        need_up_weight=need_up_weight, need_up_bias=need_up_bias, fixed_config=fixed_config,
        index=index, rows_per_index=rows_per_index, residual_is_x=residual_is_x,
    )
    return (dx if dx is not None else x.new_empty((0,)),
            flat if flat is not None else down_weight.new_empty((0,)))


adapter_backward = torch.library.custom_op(f"{NAMESPACE}::adapter_backward", mutates_args=())(_backward_impl)


@adapter_backward.register_fake
def _backward_fake(
    grad: Tensor,
    x: Tensor,
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    activation: str,
    scale: float,
    need_x: bool,
    need_down_weight: bool,
    need_down_bias: bool,
    need_up_weight: bool,
    need_up_bias: bool,
    fixed_config: bool,
    index: Tensor | None = None,
    rows_per_index: int = 1,
    residual_is_x: bool = True,
) -> tuple[Tensor, Tensor]:
    """Shapes only: dx (M, d) or (0,), weight grads (n * (2*d*r + d + r),) or (0,)."""
    dx = x.new_empty(tuple(x.shape) if need_x else (0,))
    any_param = need_down_weight or need_down_bias or need_up_weight or need_up_bias
    flat = down_weight.new_empty((_packed_size(down_weight, index),) if any_param else (0,))
    return dx, flat


# ---- autograd -------------------------------------------------------------------------------------

def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, down_weight, down_bias, up_weight, up_bias, activation, scale, save_h, fixed_config, index, per, residual = inputs
    _, h = output
    ctx.save_for_backward(x, h, down_weight, down_bias, up_weight, up_bias, index)
    ctx.residual_is_x = residual is None
    ctx.saved_h = save_h
    ctx.activation = activation
    ctx.scale = scale
    ctx.rows_per_index = per
    ctx.mark_non_differentiable(h)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _grad_h: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients for the twelve inputs of ``adapter_forward`` (None for the non-tensor ones, the
    index, and every input autograd does not ask for); a separate residual's gradient is ``grad``."""
    x, h, down_weight, down_bias, up_weight, up_bias, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    residual_grad = grad if len(need) > 11 and need[11] else None  # (absent when not passed)
    if not any(need[:5]):  # only a separate residual needs a gradient: nothing to launch
        return (None,) * 11 + (residual_grad,)
    fixed = torch.are_deterministic_algorithms_enabled()
    if not ctx.saved_h:
        # The forward was asked not to keep h (``fused_adapter`` never does this while an input
        # requires grad): run it again, keeping h. One extra launch, only on this path.
        _, h = adapter_forward(x, down_weight, down_bias, up_weight, up_bias, ctx.activation, ctx.scale, True,
                               fixed, index, ctx.rows_per_index, None)
    dx, flat = adapter_backward(
        grad, x, h, down_weight, up_weight, ctx.activation, ctx.scale,
        need[0], need[1], need[2], need[3], need[4], fixed, index, ctx.rows_per_index, ctx.residual_is_x,
    )
    kernels = _kernels_module()
    r, d = down_weight.shape[-2:]
    n = down_weight.shape[0] if index is not None else 1
    grads = kernels.unpack_weight_grads(
        flat if flat.numel() else None, kernels.weight_grad_layout(n, d, r, index is not None),
        dict(down_weight=need[1], down_bias=need[2], up_weight=need[3], up_bias=need[4]),
    )
    return (
        dx if need[0] else None,
        grads["down_weight"], grads["down_bias"], grads["up_weight"], grads["up_bias"],
        None, None, None, None, None, None,
        residual_grad,
    )


adapter_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerAdapterFunction(torch.autograd.Function):
    """``adapter_forward`` with its registered autograd formula, called without the operator
    dispatcher: what an eager call (not traced by torch.compile) runs when autograd records it.

    The same twelve inputs and the same (y, h) outputs as the operator; the backward is the
    operator's own formula (``_backward``), so both paths give the same bits."""

    @staticmethod
    def forward(*inputs: object) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return _forward_impl(*inputs)  # type: ignore[arg-type]

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple[Tensor, Tensor]
                      ) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor,  # type: ignore[override]
                 grad_h: Tensor | None) -> tuple[Tensor | None, ...]:
        return _backward(ctx, grad, grad_h)

IMPLEMENTATIONS = {"adapter_forward": _forward_impl, "adapter_backward": _backward_impl}
"""The Python bodies of the registered ops by op name (tests run them under a dispatch mode)."""
