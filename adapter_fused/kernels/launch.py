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

Every launch takes its kernel's named argument record, built from tensors by the kernel's builder in
``records.py``. The bound launch of the one-pass forward (through the compiled kernel's handle, for
module calls) is in ``binding.py``, the one module that touches Triton's internals.
"""

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton

from .fused import fused_rows_tuned
from .records import FusedRowsArgs, expand_args, fused_rows_args, project_args, reduce_groups_args, weight_grad_args
from .tuning import INTERPRET, MAX_FUSED_R, TUNING_CACHE, padded_rank, tuning_key
from .weight_grad import reduce_groups_kernel, weight_grad_tuned
from .wide import expand_tuned, project_tuned

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


# (autotuned kernel, deterministic?, its key values, pointer dtypes, device) -> (config, its launch kwargs):
# the config chosen for a key, so a launch after the first costs one dict lookup.
_CHOSEN: dict[tuple[Any, ...], tuple[triton.Config, dict[str, Any]]] = {}
_DTYPE = operator.attrgetter("dtype")
# (autotuned kernel, record length) -> (positions of its key names in the record, positions of its pointers)
_KEY_LAYOUT: dict[tuple[Any, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _key_layout(tuned: Any, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    layout = _KEY_LAYOUT.get((tuned, count))
    if layout is None:
        names = list(tuned.arg_names)[:count]
        keys = tuple(names.index(k) for k in tuned.keys)
        pointers = tuple(i for i, name in enumerate(names) if name.endswith("_ptr"))
        layout = _KEY_LAYOUT[(tuned, count)] = (keys, pointers)
    return layout


def _launch(tuned: Any, grid: Grid, args: NamedTuple, *, fixed_config: bool, memo: tuple[Any, ...] | None = None
            ) -> None:
    """Launch an autotuned kernel on its argument record (``records.py``): ``tuned.fn[grid](*args,
    **config)``.

    ``fixed_config``: skip tuning and use the first fitting config, so the reduction order (and so
    every bit of the result) does not depend on a timing race. Otherwise a config tuned before, in
    this process or (through the on-disk cache, see ``tuning.TUNING_CACHE``) in an earlier one on
    the same device, is launched directly; a new shape key is tuned once, with a notice on stderr.

    ``memo``: a caller-built key that determines the autotuning key and every pointer's dtype as the
    generic one does (the kernel is added to it), cheaper to build on a hot path.
    """
    configs = tuned.configs
    if len(configs) == 1:
        tuned.fn[grid](*args, **configs[0].all_kwargs())
        return
    if memo is None:
        keys, pointers = _key_layout(tuned, len(args))
        memo = (fixed_config, args[0].device, *map(args.__getitem__, keys),
                *map(_DTYPE, map(args.__getitem__, pointers)))
    memo = (tuned, *memo)
    chosen = _CHOSEN.get(memo)
    tuned_here: list[bool] = []
    if chosen is None:
        named = args._asdict()
        if fixed_config:
            config = tuned.early_config_prune(configs, named)[0]
        else:
            key = tuning_key(tuned, named, {}, args[0].device)
            config = TUNING_CACHE.lookup(key, configs)
            if config is None:

                def run() -> tuple[triton.Config, int]:
                    tuned_here.append(True)
                    return _tune(tuned, grid, args)

                config = TUNING_CACHE.tune(key, configs, run)
        chosen = _CHOSEN[memo] = (config, config.all_kwargs())
    if not tuned_here:  # tuning launched the best config itself
        tuned.fn[grid](*args, **chosen[1])


def _tune(tuned: Any, grid: Grid, args: NamedTuple) -> tuple[triton.Config, int]:
    """Run Triton's autotuner on this launch (it benchmarks every config the pruning keeps, then
    launches the fastest); return that config and how many were tried."""
    tried = len(tuned.early_config_prune(tuned.configs, args._asdict()))
    tuned[grid](*args)
    return tuned.best_config, tried


def chosen_config(tuned: Any, memo: tuple[Any, ...]) -> dict[str, Any] | None:
    """The launch keyword arguments (block sizes, warps, stages) of the config ``_launch`` chose for
    ``memo`` (as its caller passed it), or None while none has been chosen."""
    if len(tuned.configs) == 1:
        return tuned.configs[0].all_kwargs()
    chosen = _CHOSEN.get((tuned, *memo))
    return None if chosen is None else chosen[1]


_CUBLAS_ALLOW_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def tf32_allowed() -> bool:
    """Whether fp32 matrix products may use TF32 on CUDA (``torch.backends.cuda.matmul.allow_tf32``, read
    by one C call: the attribute goes through a Python ``__getattr__``, 0.5 µs a read)."""
    return _CUBLAS_ALLOW_TF32() if _CUBLAS_ALLOW_TF32 is not None else torch.backends.cuda.matmul.allow_tf32


def _dot_settings(compute_dtype: torch.dtype) -> tuple[bool, str]:
    """(widen dot operands to fp32, tl.dot input precision) for this dtype and machine."""
    if INTERPRET:
        return True, "ieee"
    if compute_dtype == torch.float32 and tf32_allowed():
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


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, R) with column stride 1, copied only when needed: the kernels read the saved h
    with a row stride and unit column stride."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def row_tiles(M: int) -> Grid:
    """The grid of a row-parallel launch: one program per BLOCK_M rows."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def fused_forward_launch(
    x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None, up_weight: torch.Tensor,
    up_bias: torch.Tensor | None, y: torch.Tensor, h: torch.Tensor | None, res: torch.Tensor,
    index: torch.Tensor | None, rows_per_index: int, activation: int, scale: float, fixed_config: bool,
) -> tuple[FusedRowsArgs, tuple[Any, ...]]:
    """(record, memo) of the one-pass forward: x, y, res (M, D); h (M, R) fp32 or None (not kept).
    The memo holds everything the autotuning key and the pointers' dtypes depend on (h is fp32, y is
    x's dtype, absent pointers are filled with x), for ``_launch`` and ``chosen_config``."""
    dot_f32, precision = _dot_settings(down_weight.dtype)
    args = fused_rows_args(
        src=x, w1=down_weight, b1=down_bias, saved_h=None, mid=h, w2=up_weight, b2=up_bias, out=y, res=res,
        index=index, rows_per_index=rows_per_index, scale=scale, act=activation, backward=False, add_residual=True,
        transposed=False, dot_f32=dot_f32, precision=precision,
    )
    memo = (fixed_config, x.device, args.D, args.R, args.rows_bucket, h is not None, index is not None, x.dtype,
            down_weight.dtype, None if index is None else index.dtype, res.dtype)
    return args, memo


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
    y = x.new_empty((M, D))
    h = x.new_empty((M, R), dtype=torch.float32) if save_h else None
    if M == 0:
        return y, h
    res = residual if residual is not None else x
    if padded_rank(R) <= MAX_FUSED_R:
        args, memo = fused_forward_launch(x, down_weight, down_bias, up_weight, up_bias, y, h, res, index,
                                          rows_per_index, activation, scale, fixed_config)
        _launch(fused_rows_tuned, row_tiles(M), args, fixed_config=fixed_config, memo=memo)
        return y, h
    dot_f32, precision = _dot_settings(down_weight.dtype)
    mid = h if h is not None else torch.empty((M, R), dtype=torch.float32, device=x.device)
    project = project_args(src=x, w1=down_weight, b1=down_bias, saved_h=None, mid=mid, index=index,
                           rows_per_index=rows_per_index, scale=scale, act=activation, backward=False,
                           transposed=False, dot_f32=dot_f32, precision=precision)
    _launch(project_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"])),
            project, fixed_config=fixed_config)
    expand = expand_args(res=res, mid=mid, w2=up_weight, b2=up_bias, out=y, index=index, rows_per_index=rows_per_index,
                         out_scale=scale, act=activation, apply_act=True, add_residual=True, transposed=False,
                         dot_f32=dot_f32, precision=precision)
    _launch(expand_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])),
            expand, fixed_config=fixed_config)
    return y, h


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
    wide = padded_rank(R) > MAX_FUSED_R
    h = _unit_columns(h)
    gh = None
    if M > 0 and (need_x or need_gh):
        gh = torch.empty((M, R), dtype=torch.float32, device=device) if (need_gh or wide) else None
        # The backward reads W_up as (R, D) for g @ W_up and W_down as (D, R) for g_h @ W_down: transposed.
        if not wide:
            rows = fused_rows_args(
                src=grad, w1=up_weight, b1=None, saved_h=h, mid=gh, w2=down_weight, b2=None, out=dx, res=grad,
                index=index, rows_per_index=rows_per_index, scale=scale, act=activation, backward=True,
                add_residual=residual_is_x, transposed=True, dot_f32=dot_f32, precision=precision,
            )
            _launch(fused_rows_tuned, row_tiles(M), rows, fixed_config=fixed_config)
        else:
            assert gh is not None
            project = project_args(src=grad, w1=up_weight, b1=None, saved_h=h, mid=gh, index=index,
                                   rows_per_index=rows_per_index, scale=scale, act=activation, backward=True,
                                   transposed=True, dot_f32=dot_f32, precision=precision)
            _launch(project_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"])),
                    project, fixed_config=fixed_config)
            if dx is not None:
                expand = expand_args(res=grad, mid=gh, w2=down_weight, b2=None, out=dx, index=index,
                                     rows_per_index=rows_per_index, out_scale=1.0, act=activation, apply_act=False,
                                     add_residual=residual_is_x, transposed=True, dot_f32=dot_f32, precision=precision)
                _launch(expand_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])),
                        expand, fixed_config=fixed_config)
    if not (need_gh or need_up_weight or need_up_bias):
        return dx, None

    layout = weight_grad_layout(n, D, R, index is not None)
    offsets = (layout["down_weight"][0], layout["up_bias"][0], layout["down_bias"][0])
    total = offsets[2] + n * R
    if M == 0:
        return dx, torch.zeros(total, dtype=wdtype, device=device)
    grads = torch.empty(total, dtype=wdtype, device=device)
    groups = row_groups if row_groups is not None else _row_groups(M, D, R, n, device)
    # The wide path already spent two launches on the input gradient: no reduction launch there.
    groups = 1 if wide else max(1, min(groups, M))
    partial = grads if groups == 1 else torch.empty((groups, total), dtype=torch.float32, device=device)
    weights = weight_grad_args(
        grad=grad, x=x, h=h, gh=gh, weight=down_weight, out=partial, offsets=offsets, groups=groups, index=index,
        rows_per_index=rows_per_index, scale=scale, act=activation, need_up_weight=need_up_weight,
        need_up_bias=need_up_bias, need_down_weight=need_down_weight, need_down_bias=need_down_bias,
        dot_f32=dot_f32, precision=precision,
    )
    _launch(weight_grad_tuned,
            lambda meta: (triton.cdiv(D, meta["BLOCK_N"]), triton.cdiv(R, meta["BLOCK_R"]), n * groups),
            weights, fixed_config=fixed_config)
    if groups > 1:
        reduce = reduce_groups_args(partial=partial, out=grads)
        reduce_groups_kernel[(triton.cdiv(total, reduce.BLOCK),)](*reduce)
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
