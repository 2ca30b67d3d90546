"""Host launchers: validate nothing (the torch side does), allocate, pick the path, launch.

Shapes (every tensor may have any strides unless said otherwise):
    x, grad      (M, D)     activations and the upstream gradient
    down_weight  (R, D)     nn.Linear layout            grouped: (n, R, D)
    up_weight    (D, R)     nn.Linear layout            grouped: (n, D, R)
    down_bias    (R,) or None, up_bias (D,) or None     grouped: (n, R), (n, D)
    h            (M, R)     fp32: the pre-activation saved for backward (copied first unless its
                            column stride is 1)
    index        grouped only: integer tensor, row m uses adapter index[m // rows_per_index]
                 (-1: no adapter); 1-D with any stride, values already checked by the caller

Paths: a padded bottleneck of at most MAX_FUSED_R runs the one-pass kernel (forward: 1 launch;
backward: input-gradient kernel, weight-gradient kernel, and an ordered reduction when the rows
are split into several groups). A wider one runs project + expand (forward: 2 launches; backward:
project, expand, weight-gradient kernel with a single row group). Never more than 3 launches, with
or without an index.
"""

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import triton

from .fused import fused_rows_tuned
from .tuning import INTERPRET, MAX_FUSED_R, REDUCE_BLOCK, TUNING_CACHE, padded_rank, rows_bucket, tuning_key
from .weight_grad import reduce_groups_kernel, weight_grad_tuned
from .wide import expand_tuned, project_tuned

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


# (autotuned kernel, deterministic?, its key values, pointer dtypes, device) -> (config, its launch kwargs):
# the config chosen for a key, so a launch after the first costs one dict lookup.
_CHOSEN: dict[tuple[Any, ...], tuple[triton.Config, dict[str, Any]]] = {}
_DTYPE = operator.attrgetter("dtype")
# (autotuned kernel, number of positional arguments) -> (positions of its key names among those,
# key names passed as keywords, positions of its pointer arguments)
_KEY_LAYOUT: dict[tuple[Any, int], tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]] = {}


def _key_layout(tuned: Any, count: int) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...]]:
    layout = _KEY_LAYOUT.get((tuned, count))
    if layout is None:
        names = list(tuned.arg_names)
        positional = tuple(names.index(k) for k in tuned.keys if names.index(k) < count)
        keywords = tuple(k for k in tuned.keys if names.index(k) >= count)
        pointers = tuple(i for i, name in enumerate(names[:count]) if name.endswith("_ptr"))
        layout = _KEY_LAYOUT[(tuned, count)] = (positional, keywords, pointers)
    return layout


def _launch(tuned: Any, grid: Grid, *args: Any, fixed_config: bool, memo: tuple[Any, ...] | None = None,
            **kwargs: Any) -> None:
    """Launch an autotuned kernel.

    ``fixed_config``: skip tuning and use the first fitting config, so the reduction order (and so
    every bit of the result) does not depend on a timing race. Otherwise a config tuned before, in
    this process or (through the on-disk cache, see ``tuning.TUNING_CACHE``) in an earlier one on
    the same device, is launched directly; a new shape key is tuned once, with a notice on stderr.

    ``memo``: a caller-built key that determines the autotuning key and every pointer's dtype as the
    generic one does (the kernel is added to it), cheaper to build on a hot path.
    """
    configs = tuned.configs
    if len(configs) == 1:
        tuned.fn[grid](*args, **kwargs, **configs[0].all_kwargs())
        return
    if memo is None:
        positional, keywords, pointers = _key_layout(tuned, len(args))
        memo = (fixed_config, args[0].device, *map(args.__getitem__, positional),
                *map(kwargs.__getitem__, keywords), *map(_DTYPE, map(args.__getitem__, pointers)))
    memo = (tuned, *memo)
    chosen = _CHOSEN.get(memo)
    tuned_here: list[bool] = []
    if chosen is None:
        named = dict(zip(tuned.arg_names, args))
        if fixed_config:
            config = tuned.early_config_prune(configs, named, **kwargs)[0]
        else:
            key = tuning_key(tuned, named, kwargs, args[0].device)
            config = TUNING_CACHE.lookup(key, configs)
            if config is None:

                def run() -> tuple[triton.Config, int]:
                    tuned_here.append(True)
                    return _tune(tuned, grid, named, args, kwargs)

                config = TUNING_CACHE.tune(key, configs, run)
        chosen = _CHOSEN[memo] = (config, config.all_kwargs())
    if not tuned_here:  # tuning launched the best config itself
        tuned.fn[grid](*args, **kwargs, **chosen[1])


def _tune(tuned: Any, grid: Grid, named: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
          ) -> tuple[triton.Config, int]:
    """Run Triton's autotuner on this launch (it benchmarks every config the pruning keeps, then
    launches the fastest); return that config and how many were tried."""
    tried = len(tuned.early_config_prune(tuned.configs, named, **kwargs))
    tuned[grid](*args, **kwargs)
    return tuned.best_config, tried


def _dot_settings(compute_dtype: torch.dtype) -> tuple[bool, str]:
    """(widen dot operands to fp32, tl.dot input precision) for this dtype and machine."""
    if INTERPRET:
        return True, "ieee"
    if compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return False, "tf32"
    return False, "ieee"


def _row_groups(M: int, D: int, R: int, n_adapters: int, device: torch.device) -> int:
    """How many row groups the weight-gradient kernel splits M into (1: no reduction launch)."""
    if padded_rank(R) > MAX_FUSED_R or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    column_programs = triton.cdiv(D, 64) * triton.cdiv(R, 64) * n_adapters
    groups = max(1, (2 * sms) // column_programs)
    return max(1, min(groups, triton.cdiv(M, 512)))


def _matrix(w: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, adapter stride, row stride, column stride) of a 2-D or stacked 3-D weight."""
    adapter_stride = w.stride(0) if w.dim() == 3 else 0
    rows, cols = w.stride(-2), w.stride(-1)
    return (w, adapter_stride, cols, rows) if transpose else (w, adapter_stride, rows, cols)


def _vector(b: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, adapter stride, element stride) of a bias, 1-D or stacked 2-D; a placeholder when
    there is none."""
    if b is None:
        return fallback, 0, 0
    return b, (b.stride(0) if b.dim() == 2 else 0), b.stride(-1)


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, R) with column stride 1, copied only when needed: the kernels read the saved h
    with a row stride and unit column stride."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _index_args(index: torch.Tensor | None, rows_per_index: int, fallback: torch.Tensor, n: int) -> tuple[Any, ...]:
    if index is None:
        return fallback, 0, 1, 1
    return index, index.stride(0), rows_per_index, n


def _fused_forward_call(
    x: torch.Tensor, down_weight: torch.Tensor, down_b: tuple[Any, ...], up_weight: torch.Tensor,
    up_b: tuple[Any, ...], y: torch.Tensor, h: torch.Tensor | None, res: torch.Tensor, idx: tuple[Any, ...],
    activation: int, scale: float, index: torch.Tensor | None, r_pad: int, common: dict[str, Any],
    has_b1: bool, has_b2: bool,
) -> tuple[Grid, tuple[Any, ...], dict[str, Any], tuple[Any, ...]]:
    """(grid, positional arguments, keyword arguments, memo) of the one-pass forward launch: x, y, res
    (M, D); h (M, R) or None; biases and index as ``_vector`` and ``_index_args`` give them."""
    M, D = x.shape
    R = down_weight.shape[-2]
    stacked = down_weight.dim() == 3
    bucket = rows_bucket(M)
    save_h = h is not None
    # Everything the autotuning key and the pointers' dtypes depend on (h is fp32, y is x's dtype).
    memo = (common["fixed_config"], x.device, D, R, bucket, save_h, index is not None, x.dtype, down_weight.dtype,
            None if index is None else index.dtype, res.dtype)
    args = (
        x, *x.stride(), down_weight, *(down_weight.stride() if stacked else (0, *down_weight.stride())),
        *down_b, y, 0, h if h is not None else y, R,
        up_weight, *(up_weight.stride() if stacked else (0, *up_weight.stride())),
        *up_b, y, D, 1, res, *res.stride(), *idx,
        M, D, R, scale, bucket,
    )
    kwargs = dict(ACT=activation, BACKWARD=False, HAS_B1=has_b1, HAS_B2=has_b2,
                  STORE_MID=save_h, STORE_OUT=True, ADD_RESIDUAL=True, R_PAD=r_pad, **common)
    return (lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)), args, kwargs, memo


def adapter_forward(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: int,
    scale: float,
    save_h: bool,
    fixed_config: bool = False,
    index: torch.Tensor | None = None,
    rows_per_index: int = 1,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = res + scale * (act(x @ down_weight^T + down_bias) @ up_weight^T + up_bias), per row's
    adapter when ``index`` is given; res is ``residual`` (M, D) when given, else x. Rows with index
    -1 get res.

    Returns y (M, D) contiguous in x's dtype, and h (M, R) fp32 when ``save_h`` (else None).
    The dots run in the weights' dtype (x is rounded to it), accumulating in fp32; the adapter's
    output is added in fp32 to res as given.
    """
    M, D = x.shape
    R = down_weight.shape[-2]
    n = down_weight.shape[0] if index is not None else 1
    y = x.new_empty((M, D))
    h = x.new_empty((M, R), dtype=torch.float32) if save_h else None
    if M == 0:
        return y, h
    dot_f32, precision = _dot_settings(down_weight.dtype)
    common = dict(GROUPED=index is not None, DOT_F32=dot_f32, PRECISION=precision, fixed_config=fixed_config)
    down_b, up_b = _vector(down_bias, down_weight), _vector(up_bias, up_weight)
    idx = _index_args(index, rows_per_index, x, n)
    res = residual if residual is not None else x
    r_pad = padded_rank(R)
    if r_pad <= MAX_FUSED_R:
        grid, args, kwargs, memo = _fused_forward_call(x, down_weight, down_b, up_weight, up_b, y, h, res, idx,
                                                       activation, scale, index, r_pad, common,
                                                       down_bias is not None, up_bias is not None)
        _launch(fused_rows_tuned, grid, *args, memo=memo, **kwargs)
        return y, h
    down, up = _matrix(down_weight), _matrix(up_weight)
    mid = h if h is not None else torch.empty((M, R), dtype=torch.float32, device=x.device)
    _launch(
        project_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"])),
        x, x.stride(0), x.stride(1), *down, *down_b, mid, 0, mid, mid.stride(0), *idx,
        M, D, R, scale, rows_bucket(M),
        ACT=activation, BACKWARD=False, HAS_B1=down_bias is not None, **common,
    )
    _launch(
        expand_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])),
        res, res.stride(0), res.stride(1), mid, mid.stride(0), *up, *up_b, y, y.stride(0), y.stride(1), *idx,
        M, D, R, scale, rows_bucket(M),
        ACT=activation, APPLY_ACT=True, HAS_B2=up_bias is not None, ADD_RESIDUAL=True, **common,
    )
    return y, h


BIND_LAUNCHES = True
"""Whether ``bind_forward`` binds compiled kernels (False: every launch goes through Triton's
``JITFunction.run``; the acceptance run times both ways)."""


def _driver_functions() -> tuple[Callable[[], int], Callable[[int], Any]]:
    """(current device index, raw current stream of a device index), as Triton's launcher gets them."""
    from triton.runtime import driver

    return driver.active.get_current_device, driver.active.get_current_stream


def _compiled_kernel(fn: Any, grid: Grid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
    """The compiled kernel ``fn[grid](*args, **kwargs)`` launches (compiled now if it was not), without
    launching it; None where there is none to launch directly: the interpreter, a Triton without
    ``triton.knobs`` (before 3.4: another launch convention), a kernel with pre-run hooks."""
    if INTERPRET or not hasattr(triton, "knobs") or getattr(fn, "pre_run_hooks", None):
        return None
    kernel = fn.warmup(*args, grid=grid, **kwargs)
    if hasattr(kernel, "result"):  # an asynchronous compile (Triton 3.5+ may hand back a future)
        kernel = kernel.result()
    needed = ("run", "function", "packed_metadata", "launch_metadata")
    return kernel if kernel is not None and all(hasattr(kernel, name) for name in needed) else None


class BoundForward:
    """The one-pass forward (no h kept) for one input shape, dtype and set of parameters, bound once:
    the compiled kernel, its grid and every constant argument prepared. A call allocates y, puts the
    pointers of x and y and the scale into the argument list and launches the compiled kernel as
    ``JITFunction.run`` does (current stream, launch hooks), without its per-call argument binding,
    specialization and cache lookup.

    Valid while the parameters it was bound with are unchanged (same tensors, shapes, strides, data
    pointers): the caller checks that. x must be contiguous, 16-byte aligned (the kernel was
    specialized on it) and shaped as when bound; a call that does not fit returns None and launches
    nothing.
    """

    __slots__ = ("args", "current_device", "current_stream", "device", "function", "grid", "kernel", "launcher",
                 "packed", "scale_slot", "shape", "x_slots", "y_slots")

    def __init__(self, kernel: Any, grid: tuple[int, int, int], args: list[Any], x_slots: tuple[int, ...],
                 y_slots: tuple[int, ...], scale_slot: int, device: int, shape: torch.Size,
                 current_device: Callable[[], int], current_stream: Callable[[int], Any]) -> None:
        self.kernel = kernel
        self.launcher = kernel.run
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.grid = grid
        self.args = args
        self.x_slots = x_slots
        self.y_slots = y_slots
        self.scale_slot = scale_slot
        self.device = device
        self.shape = shape
        self.current_device = current_device
        self.current_stream = current_stream

    def __call__(self, x: torch.Tensor, scale: float) -> torch.Tensor | None:
        """x (..., D), shaped as when bound (the caller keys bindings on the shape) -> y (..., D)
        contiguous in x's dtype, or None (nothing launched)."""
        if not x.is_contiguous() or x.data_ptr() & 15 or self.current_device() != self.device:
            return None
        y = torch.empty_like(x)
        args = self.args.copy()
        for i in self.x_slots:
            args[i] = x
        for i in self.y_slots:
            args[i] = y
        args[self.scale_slot] = scale
        stream = self.current_stream(self.device)
        hooks = triton.knobs.runtime
        enter = hooks.launch_enter_hook
        metadata = None if enter is None else self.kernel.launch_metadata(self.grid, stream, *args)
        self.launcher(*self.grid, stream, self.function, self.packed, metadata, enter, hooks.launch_exit_hook, *args)
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
    """Bind the one-pass forward for x's shape and these 2-D parameters (down_weight (R, D),
    down_bias (R,) | None, up_weight (D, R), up_bias (D,) | None), after ``adapter_forward`` has
    launched it once for this shape key (the configuration is chosen then).

    None when it cannot be bound: binding switched off (``BIND_LAUNCHES``), no compiled kernel (the
    interpreter), an empty, non-contiguous or unaligned x, a bottleneck for the two-kernel path, no
    configuration chosen yet, or x on another device than the current one.
    """
    if not BIND_LAUNCHES or down_weight.dim() != 2 or x.dim() == 0:
        return None
    D, R = x.shape[-1], down_weight.shape[0]
    M = x.numel() // D if D else 0
    r_pad = padded_rank(R)
    if M == 0 or r_pad > MAX_FUSED_R or not x.is_contiguous() or x.data_ptr() & 15:
        return None
    x2 = x.view(M, D)
    y = torch.empty_like(x)
    y2 = y.view(M, D)
    dot_f32, precision = _dot_settings(down_weight.dtype)
    common: dict[str, Any] = {"GROUPED": False, "DOT_F32": dot_f32, "PRECISION": precision,
                              "fixed_config": fixed_config}
    grid, args, kwargs, memo = _fused_forward_call(
        x2, down_weight, _vector(down_bias, down_weight), up_weight, _vector(up_bias, up_weight), y2, None, x2,
        _index_args(None, 1, x2, 1), activation, 1.0, None, r_pad, common, down_bias is not None, up_bias is not None)
    tuned = fused_rows_tuned
    if len(tuned.configs) == 1:
        config_kwargs = tuned.configs[0].all_kwargs()
    else:
        chosen = _CHOSEN.get((tuned, *memo))
        if chosen is None:
            return None
        config_kwargs = chosen[1]
    del kwargs["fixed_config"]
    kwargs.update(config_kwargs)
    kernel = _compiled_kernel(tuned.fn, grid, args, kwargs)
    if kernel is None:
        return None
    current_device, current_stream = _driver_functions()
    device = current_device()
    if x.is_cuda and x.device.index != device:
        return None
    signature = inspect.signature(tuned.fn.fn)  # the @triton.jit function's Python signature
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    bound.apply_defaults()
    values = list(bound.arguments.values())
    g = tuple(grid(bound.arguments))
    grid3 = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
    x_slots = tuple(i for i, v in enumerate(values) if v is x2)
    y_slots = tuple(i for i, v in enumerate(values) if v is y2)
    scale_slot = list(bound.arguments).index("scale")
    return BoundForward(kernel, grid3, values, x_slots, y_slots, scale_slot, device, x.shape, current_device,
                        current_stream)


def weight_grad_layout(n: int, D: int, R: int, grouped: bool) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Where each parameter gradient sits in the flat buffer of ``adapter_backward_packed``:
    name -> (offset, shape); shapes carry the adapter dimension n when ``grouped``. The buffer
    holds ``2*n*D*R + n*D + n*R`` elements."""
    lead = (n,) if grouped else ()
    return {
        "up_weight": (0, (*lead, D, R)),
        "down_weight": (n * D * R, (*lead, R, D)),
        "up_bias": (2 * n * D * R, (*lead, D)),
        "down_bias": (2 * n * D * R + n * D, (*lead, R)),
    }


def adapter_backward_packed(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activation: int,
    scale: float,
    *,
    need_x: bool,
    need_down_weight: bool,
    need_down_bias: bool,
    need_up_weight: bool,
    need_up_bias: bool,
    fixed_config: bool = False,
    row_groups: int | None = None,
    index: torch.Tensor | None = None,
    rows_per_index: int = 1,
    residual_is_x: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx (M, D) in x's dtype or None, the parameter gradients in one flat buffer in the weights'
    dtype laid out as ``weight_grad_layout`` says, or None when no parameter needs one). Slots of
    gradients not asked for hold unspecified values.

    ``row_groups`` overrides how many row groups the weight-gradient reduction uses (one-pass
    path only; the wide path always uses one). ``residual_is_x=False`` (the forward was given a
    separate residual): dx leaves out the residual's share, g, which is that residual's gradient.
    """
    M, D = grad.shape
    R = down_weight.shape[-2]
    n = down_weight.shape[0] if index is not None else 1
    wdtype = down_weight.dtype
    device = grad.device
    need_gh = need_down_weight or need_down_bias
    dx = torch.empty((M, D), dtype=x.dtype, device=device) if need_x else None
    dot_f32, precision = _dot_settings(wdtype)
    common = dict(GROUPED=index is not None, DOT_F32=dot_f32, PRECISION=precision, fixed_config=fixed_config)
    idx = _index_args(index, rows_per_index, grad, n)
    r_pad = padded_rank(R)
    h = _unit_columns(h)
    gh = None
    if M > 0 and (need_x or need_gh):
        gh = torch.empty((M, R), dtype=torch.float32, device=device) if (need_gh or r_pad > MAX_FUSED_R) else None
        out = dx if dx is not None else grad
        mid = gh if gh is not None else h
        # Backward operand views: W_up read as (R, D) for g @ W_up, W_down as (D, R) for g_h @ W_down.
        up_t, down_t = _matrix(up_weight, transpose=True), _matrix(down_weight, transpose=True)
        no_bias = (down_weight, 0, 0)
        if r_pad <= MAX_FUSED_R:
            _launch(
                fused_rows_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
                grad, grad.stride(0), grad.stride(1), *up_t, *no_bias, h, h.stride(0), mid, R, *down_t, *no_bias,
                out, out.stride(0), out.stride(1), grad, grad.stride(0), grad.stride(1), *idx,
                M, D, R, scale, rows_bucket(M),
                ACT=activation, BACKWARD=True, HAS_B1=False, HAS_B2=False,
                STORE_MID=need_gh, STORE_OUT=need_x, ADD_RESIDUAL=residual_is_x, R_PAD=r_pad, **common,
            )
        else:
            assert gh is not None
            _launch(
                project_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"])),
                grad, grad.stride(0), grad.stride(1), *up_t, *no_bias, h, h.stride(0), gh, gh.stride(0), *idx,
                M, D, R, scale, rows_bucket(M),
                ACT=activation, BACKWARD=True, HAS_B1=False, **common,
            )
            if need_x:
                _launch(
                    expand_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])),
                    grad, grad.stride(0), grad.stride(1), gh, gh.stride(0), *down_t, *no_bias,
                    out, out.stride(0), out.stride(1), *idx,
                    M, D, R, 1.0, rows_bucket(M),
                    ACT=activation, APPLY_ACT=False, HAS_B2=False, ADD_RESIDUAL=residual_is_x, **common,
                )
    if not (need_gh or need_up_weight or need_up_bias):
        return dx, None

    layout = weight_grad_layout(n, D, R, index is not None)
    off_wd, off_bu, off_bd = layout["down_weight"][0], layout["up_bias"][0], layout["down_bias"][0]
    total = off_bd + n * R
    if M == 0:
        return dx, torch.zeros(total, dtype=wdtype, device=device)
    grads = torch.empty(total, dtype=wdtype, device=device)
    groups = row_groups if row_groups is not None else _row_groups(M, D, R, n, device)
    # The wide path already spent two launches on the input gradient: no reduction launch there.
    groups = 1 if r_pad > MAX_FUSED_R else max(1, min(groups, M))
    partial = grads if groups == 1 else torch.empty((groups, total), dtype=torch.float32, device=device)
    _launch(
        weight_grad_tuned,
        lambda meta: (triton.cdiv(D, meta["BLOCK_N"]), triton.cdiv(R, meta["BLOCK_R"]), n * groups),
        grad, grad.stride(0), grad.stride(1),
        x, x.stride(0), x.stride(1),
        h, h.stride(0),
        gh if gh is not None else h, R,
        down_weight,
        partial, total, off_wd, off_bu, off_bd,
        *idx[:3],
        M, D, R, scale, triton.cdiv(M, groups), groups, rows_bucket(M),
        ACT=activation, NEED_DWU=need_up_weight, NEED_DBU=need_up_bias,
        NEED_DWD=need_down_weight, NEED_DBD=need_down_bias, R_PAD=r_pad, **common,
    )
    if groups > 1:
        reduce_groups_kernel[(triton.cdiv(total, REDUCE_BLOCK),)](partial, grads, total, groups, BLOCK=REDUCE_BLOCK)
    return dx, grads


def unpack_weight_grads(flat: torch.Tensor | None, layout: dict[str, tuple[int, tuple[int, ...]]],
                        wanted: dict[str, bool]) -> dict[str, torch.Tensor | None]:
    """Views of the gradients in ``flat`` named by ``layout``, None where not ``wanted``."""
    out: dict[str, torch.Tensor | None] = {}
    for name, (offset, shape) in layout.items():
        if flat is None or not wanted[name]:
            out[name] = None
        else:
            out[name] = flat.narrow(0, offset, math.prod(shape)).view(shape)
    return out


def adapter_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activation: int,
    scale: float,
    **options: Any,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the adapter, each only when asked for (None otherwise):
    (dx (M, D) in x's dtype, d_down_weight, d_down_bias, d_up_weight, d_up_bias), the weight and
    bias gradients shaped like the weights (stacked when an ``index`` is given) in the weights'
    dtype. Keyword options (the ``need_*`` flags among them) as for ``adapter_backward_packed``.
    """
    dx, flat = adapter_backward_packed(grad, x, h, down_weight, up_weight, activation, scale, **options)
    grouped = options.get("index") is not None
    n = down_weight.shape[0] if grouped else 1
    layout = weight_grad_layout(n, grad.shape[1], down_weight.shape[-2], grouped)
    wanted = {name: options[f"need_{name}"] for name in layout}
    grads = unpack_weight_grads(flat, layout, wanted)
    return dx, grads["down_weight"], grads["down_bias"], grads["up_weight"], grads["up_bias"]
