"""The shared benchmark harness: shapes, providers, ops, timing, byte counts and result records.

Everything that measures goes through here: the command line (``python -m benchmarks``), the
model-level benchmarks and the pytest-benchmark tests.

Timing: on CUDA, ``triton.testing.do_bench`` (median, p20, p80 of per-call times); row counts up to
``GRAPH_MAX_ROWS`` are replayed from a CUDA graph (``do_bench_cudagraph``) so that launch overhead
does not hide the kernel, except for the ``latency`` op, which is the host-inclusive time of one
inference call. On CPU (kernels in Triton's interpreter) a ``time.perf_counter`` loop stands in;
those numbers describe the interpreter, not the kernels, and are never comparable to GPU figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch import nn

from adapter_fused import ACTIVATIONS, FusedAdapter
from adapter_fused.activations import canonical_activation
from adapter_fused.ops import kernels_available

OPS: tuple[str, ...] = ("forward", "forward_train", "backward", "forward_backward", "latency")
PROVIDERS: tuple[str, ...] = ("fused", "eager", "compile", "compile_max_autotune", "adapterhub")
SMOKE_PROVIDERS: tuple[str, ...] = ("fused", "eager", "compile")
RECORD_KEYS: tuple[str, ...] = (
    "op", "provider", "dtype", "M", "d", "r", "ms_median", "ms_p20", "ms_p80", "gbps", "pct_of_copy_bw",
    "peak_mem_bytes",
)
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRAPH_MAX_ROWS = 256
"""Row counts up to this are timed from a CUDA graph (launch overhead would dominate otherwise)."""
LATENCY_MAX_ROWS = 256
"""The ``latency`` op runs only for row counts up to this."""
QUANTILES = (0.5, 0.2, 0.8)

RankSpec = int | str  # an int, or "d/16" for a rank that follows the model width


@dataclass(frozen=True)
class GridSpec:
    """A shape grid: every combination of width d, rank r, row count and dtype."""

    d: tuple[int, ...]
    r: tuple[RankSpec, ...]
    rows: tuple[int, ...]
    dtypes: tuple[str, ...]


FULL_GRID = GridSpec(d=(768, 1024, 4096, 8192), r=(16, 64, 256, "d/16"),
                     rows=(1, 16, 256, 4096, 16384, 65536), dtypes=("bfloat16", "float16", "float32"))
QUICK_GRID = GridSpec(d=(1024, 4096), r=(16, 64), rows=(1, 256, 4096, 65536), dtypes=("bfloat16",))
SMOKE_GRID = GridSpec(d=(64,), r=(16,), rows=(1, 16, 64), dtypes=("float32",))


@dataclass(frozen=True)
class Case:
    """One shape: x is (M, d), the bottleneck is r, everything in ``dtype``."""

    M: int
    d: int
    r: int
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        """The dtype spelled as in the results file (``bfloat16``)."""
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"M={self.M} d={self.d} r={self.r} {self.dtype_name}"


def resolve_rank(spec: RankSpec, d: int) -> int:
    """The bottleneck for ``spec`` at width ``d`` (``"d/16"`` -> d // 16)."""
    if isinstance(spec, int):
        return spec
    if spec.replace(" ", "") == "d/16":
        return max(1, d // 16)
    raise ValueError(f"unknown rank spec {spec!r}; expected an int or 'd/16'")


def parse_rank(text: str) -> RankSpec:
    """Parse a rank given on the command line: an int, or ``d/16``."""
    text = text.strip()
    return int(text) if text.isdigit() else text


def expand_grid(spec: GridSpec) -> list[Case]:
    """Every case of ``spec``, duplicates (``d/16`` equal to a listed rank) removed, in a stable order."""
    cases: list[Case] = []
    for dtype_name in spec.dtypes:
        if dtype_name not in DTYPES:
            raise ValueError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
        for d in spec.d:
            ranks = sorted({resolve_rank(r, d) for r in spec.r})
            for r in ranks:
                for M in spec.rows:
                    cases.append(Case(M=M, d=d, r=r, dtype=DTYPES[dtype_name]))
    return cases


def ops_for(case: Case, ops: Iterable[str]) -> list[str]:
    """The ops that apply to ``case`` (``latency`` only for small row counts)."""
    return [op for op in ops if op != "latency" or case.M <= LATENCY_MAX_ROWS]


# ---------------------------------------------------------------- byte and FLOP counts (design §2)


def minimal_bytes(op: str, M: int, d: int, r: int, elt: int, weight_elt: int | None = None) -> int:
    """The bytes an ideal implementation of ``op`` must move (the floor the kernels are judged by).

    forward / latency: read x, write y, read the weights (2·d·r + r + d parameters).
    forward_train: the same plus write h (M·r, counted at the activation element size).
    backward: read g, read x, write dx (3·M·d), read h, read both weights, write the gradients of all
    four parameters.
    forward_backward: forward_train + backward.
    """
    w_elt = elt if weight_elt is None else weight_elt
    params = 2 * d * r + r + d
    if op in ("forward", "latency"):
        return 2 * M * d * elt + params * w_elt
    if op == "forward_train":
        return 2 * M * d * elt + M * r * elt + params * w_elt
    if op == "backward":
        return 3 * M * d * elt + M * r * elt + 2 * d * r * w_elt + params * w_elt
    if op == "forward_backward":
        return minimal_bytes("forward_train", M, d, r, elt, w_elt) + minimal_bytes("backward", M, d, r, elt, w_elt)
    raise ValueError(f"unknown op {op!r}")


def nominal_flops(op: str, M: int, d: int, r: int) -> int:
    """Matmul FLOPs of ``op``: 4·M·d·r forward (two projections), 8·M·d·r backward (four products)."""
    if op in ("forward", "forward_train", "latency"):
        return 4 * M * d * r
    if op == "backward":
        return 8 * M * d * r
    if op == "forward_backward":
        return 12 * M * d * r
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------- providers


class EagerAdapter(nn.Module):
    """The plain PyTorch adapter, ``x + scale * up(act(down(x)))``: the same math as
    ``reference_adapter`` written the way users write it, and the module torch.compile is given.
    State dict keys match ``FusedAdapter``."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scale: float = 1.0) -> None:
        super().__init__()
        self.activation = canonical_activation(activation)
        self.act = ACTIVATIONS[self.activation]
        self.scale = float(scale)
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return x + self.scale * self.up(self.act(self.down(x)))


class AdapterHubAdapter(nn.Module):
    """AdapterHub's sequential bottleneck block (``adapters.methods.modeling.Adapter``), built from its
    own config class, called as the library calls it: ``block(x, residual_input=x)``."""

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scale: float = 1.0) -> None:
        super().__init__()
        from adapters import SeqBnConfig
        from adapters.methods.modeling import Adapter

        config = SeqBnConfig(reduction_factor=d_model / bottleneck, non_linearity=activation, scaling=float(scale),
                             init_weights="bert")
        self.block = Adapter("bench", d_model, bottleneck, config)

    def load_adapter_weights(self, source: nn.Module) -> None:
        """Copy ``down``/``up`` weights from a FusedAdapter or EagerAdapter."""
        down, up = self.block.adapter_down[0], self.block.adapter_up
        with torch.no_grad():
            down.weight.copy_(source.down.weight)
            down.bias.copy_(source.down.bias)
            up.weight.copy_(source.up.weight)
            up.bias.copy_(source.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return self.block(x, residual_input=x)[0]


def adapterhub_available() -> str | None:
    """None when the ``adapters`` library imports, else why not."""
    try:
        import adapters  # noqa: F401
        from adapters.methods.modeling import Adapter  # noqa: F401
    except Exception as exc:  # any import-time failure means the provider cannot run
        return f"adapters library not importable: {type(exc).__name__}: {exc}"
    return None


def provider_unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` (None when it can)."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}"
    if provider == "fused" and not kernels_available(device):
        return "Triton kernels unavailable here (on CPU set TRITON_INTERPRET=1 before the kernels are imported)"
    if provider == "adapterhub":
        return adapterhub_available()
    return None


def make_adapter(kind: str, d: int, r: int, activation: str = "relu", scale: float = 1.0,
                 init: str = "bert") -> nn.Module:
    """A fresh adapter module of ``kind`` (``fused``, ``eager`` or ``adapterhub``) with random weights
    drawn by FusedAdapter's ``init`` scheme, so every kind starts from identically distributed weights."""
    fused = FusedAdapter(d, r, activation=activation, scale=scale, init=init)
    if kind == "fused":
        return fused
    if kind == "eager":
        eager = EagerAdapter(d, r, activation, scale)
        eager.load_state_dict(fused.state_dict())
        return eager
    if kind == "adapterhub":
        hub = AdapterHubAdapter(d, r, activation, scale)
        hub.load_adapter_weights(fused)
        return hub
    raise ValueError(f"unknown adapter kind {kind!r}")


def build_provider(provider: str, source: EagerAdapter, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module ``provider`` runs, carrying the weights of ``source`` (so every provider sees the
    same parameters), on ``device`` in ``dtype``, in eval mode (no dropout anywhere)."""
    d, r = source.down.in_features, source.down.out_features
    module: nn.Module
    if provider == "fused":
        module = FusedAdapter(d, r, activation=source.activation, scale=source.scale)
        module.load_state_dict(source.state_dict())
    elif provider in ("eager", "compile", "compile_max_autotune"):
        module = EagerAdapter(d, r, source.activation, source.scale)
        module.load_state_dict(source.state_dict())
    elif provider == "adapterhub":
        hub = AdapterHubAdapter(d, r, source.activation, source.scale)
        hub.load_adapter_weights(source)
        module = hub
    else:
        raise ValueError(f"unknown provider {provider!r}")
    module = module.to(device=device, dtype=dtype).eval()
    if provider.startswith("compile"):
        # The backward-only op replays one graph's backward (retain_graph=True), which compiled graphs
        # refuse when AOTAutograd donates their saved buffers (a memory-only optimization).
        functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
        if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    if provider == "compile":
        return torch.compile(module, dynamic=False)  # type: ignore[return-value]
    if provider == "compile_max_autotune":
        return torch.compile(module, mode="max-autotune", dynamic=False)  # type: ignore[return-value]
    return module


# ---------------------------------------------------------------- inputs and ops


@dataclass
class Inputs:
    """The tensors of one case: x for inference, a leaf copy that requires grad, and the upstream
    gradient g (all (M, d))."""

    x: torch.Tensor
    x_train: torch.Tensor
    grad: torch.Tensor


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` (fixed seed, so every provider sees the same values)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(case.M, case.d, generator=gen).to(device=device, dtype=case.dtype)
    grad = torch.randn(case.M, case.d, generator=gen).to(device=device, dtype=case.dtype)
    return Inputs(x=x, x_train=x.detach().clone().requires_grad_(True), grad=grad)


def op_runner(op: str, module: nn.Module, inputs: Inputs,
              mark_step: bool = False) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """(a zero-argument callable doing one ``op`` with ``module``, the tensors whose ``.grad`` must be
    reset between calls). ``mark_step`` tells torch.compile's CUDA-graph trees that each call is a new
    iteration (needed for ``compile_max_autotune`` on CUDA)."""
    params = [p for p in module.parameters() if p.requires_grad]
    train_leaves = [inputs.x_train, *params]

    def step() -> None:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()

    if op in ("forward", "latency"):
        def run_forward() -> torch.Tensor:
            step()
            with torch.no_grad():
                return module(inputs.x)
        return run_forward, []
    if op == "forward_train":
        def run_forward_train() -> torch.Tensor:
            step()
            return module(inputs.x_train)
        return run_forward_train, train_leaves
    if op == "backward":
        step()
        out = module(inputs.x_train)

        def run_backward() -> None:
            out.backward(inputs.grad, retain_graph=True)
        return run_backward, train_leaves
    if op == "forward_backward":
        def run_forward_backward() -> None:
            step()
            module(inputs.x_train).backward(inputs.grad)
        return run_forward_backward, train_leaves
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingSettings:
    """How long to measure. ``rep_ms``/``warmup_ms``: time budgets per measurement (do_bench's ``rep``
    and ``warmup``); ``warmup``: fewest untimed calls before a CPU loop; ``min_reps``/``max_reps``:
    bounds on the calls of a CPU loop."""

    rep_ms: float = 100.0
    warmup_ms: float = 25.0
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 200


SMOKE_TIMING = TimingSettings(rep_ms=60.0, warmup=1, min_reps=3, max_reps=20)


@dataclass(frozen=True)
class Timing:
    """Per-call milliseconds: median and the 20th/80th percentiles."""

    median: float
    p20: float
    p80: float


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (q in [0, 1])."""
    ordered = sorted(values)
    point = q * (len(ordered) - 1)
    lo, hi = math.floor(point), math.ceil(point)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (point - lo)


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_cpu(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor], settings: TimingSettings) -> Timing:
    """Time ``fn`` with a ``time.perf_counter`` loop: untimed calls until both ``warmup`` calls and
    ``warmup_ms`` have passed (at most ``max_reps``), then at least ``min_reps`` timed calls and more
    while the ``rep_ms`` budget lasts (at most ``max_reps``)."""
    warm_start, calls = time.perf_counter(), 0
    while calls < settings.warmup or (
        (time.perf_counter() - warm_start) * 1e3 < settings.warmup_ms and calls < settings.max_reps
    ):
        _reset_grads(grad_to_none)
        fn()
        calls += 1
    times: list[float] = []
    spent = 0.0
    while len(times) < settings.min_reps or (spent < settings.rep_ms and len(times) < settings.max_reps):
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - start) * 1e3
        times.append(elapsed)
        spent += elapsed
    return Timing(*(quantile(times, q) for q in QUANTILES))


def time_cuda(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor], settings: TimingSettings,
              use_graph: bool, notes: list[str] | None = None) -> Timing:
    """Time ``fn`` on CUDA with ``triton.testing.do_bench`` (or ``do_bench_cudagraph`` when
    ``use_graph``; if graph capture fails, plain do_bench, and the reason is appended to ``notes``)."""
    from triton.testing import do_bench, do_bench_cudagraph

    grads = list(grad_to_none) or None
    if use_graph:
        try:
            result = do_bench_cudagraph(fn, rep=int(settings.rep_ms), grad_to_none=grads, quantiles=list(QUANTILES))
            return Timing(*result)
        except Exception as exc:  # capture is not possible for every provider; time without the graph
            torch.cuda.synchronize()
            if notes is not None:
                notes.append(f"timed without CUDA graph ({_short(exc)})")
    result = do_bench(fn, warmup=int(settings.warmup_ms), rep=int(settings.rep_ms), grad_to_none=grads,
                      quantiles=list(QUANTILES))
    return Timing(*result)


def measure(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor], device: torch.device,
            settings: TimingSettings, use_graph: bool = False, notes: list[str] | None = None) -> Timing:
    """Time ``fn`` on ``device`` (CUDA: do_bench, from a CUDA graph when ``use_graph``; CPU:
    perf_counter loop). Deviations from the plan are appended to ``notes``."""
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none, settings, use_graph, notes)
    return time_cpu(fn, grad_to_none, settings)


def peak_memory(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor], device: torch.device,
                absolute: bool = False) -> int | None:
    """Peak bytes allocated during one call of ``fn`` on CUDA: above what was allocated before the call,
    or in all with ``absolute``. None on CPU (PyTorch keeps no CPU peak statistics)."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return int(peak if absolute else peak - before)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None,
                        settings: TimingSettings | None = None) -> float:
    """Device copy bandwidth in GB/s counting read + write (2 · bytes per copy), measured now with a
    tensor copy of ``nbytes`` (default 1 GiB on CUDA, 64 MiB on CPU)."""
    settings = settings or TimingSettings()
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), [], device, settings)
    return 2 * src.numel() * 4 / (timing.median * 1e-3) / 1e9


# ---------------------------------------------------------------- records


def make_record(op: str, provider: str, case: Case, timing: Timing | None, copy_bw_gbps: float,
                peak_mem_bytes: int | None, nbytes: int | None = None) -> dict[str, Any]:
    """One results-file record (keys ``RECORD_KEYS``); timing None marks a skipped measurement
    (every measured field null). ``nbytes``: the minimal bytes of the work when they differ from
    ``minimal_bytes(op, ...)`` of one adapter (several adapters in one batch)."""
    gbps = pct = None
    if timing is not None:
        if nbytes is None:
            nbytes = minimal_bytes(op, case.M, case.d, case.r, case.dtype.itemsize)
        gbps = nbytes / (timing.median * 1e-3) / 1e9
        pct = 100.0 * gbps / copy_bw_gbps if copy_bw_gbps > 0 else None
    return {
        "op": op, "provider": provider, "dtype": case.dtype_name, "M": case.M, "d": case.d, "r": case.r,
        "ms_median": timing.median if timing else None,
        "ms_p20": timing.p20 if timing else None,
        "ms_p80": timing.p80 if timing else None,
        "gbps": gbps, "pct_of_copy_bw": pct, "peak_mem_bytes": peak_mem_bytes,
    }


def tflops(record: dict[str, Any]) -> float | None:
    """TFLOP/s of a record (nominal matmul FLOPs over its median time)."""
    if record["ms_median"] is None:
        return None
    flops = nominal_flops(record["op"], record["M"], record["d"], record["r"])
    return flops / (record["ms_median"] * 1e-3) / 1e12


@dataclass
class Skip:
    """A provider/op that could not be measured (or was measured differently than planned), and why."""

    provider: str
    op: str
    case: str
    reason: str


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def bench_case(case: Case, providers: Sequence[str], ops: Sequence[str], device: torch.device,
               copy_bw: float, settings: TimingSettings, activation: str = "relu", scale: float = 1.0,
               seed: int = 0, skips: list[Skip] | None = None,
               on_provider_done: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Measure every (provider, op) of one case on the same inputs and weights; records in order.
    A provider or op that fails is recorded with null timings and its reason appended to ``skips``."""
    skips = skips if skips is not None else []
    torch.manual_seed(seed)
    source = make_adapter("eager", case.d, case.r, activation, scale)
    assert isinstance(source, EagerAdapter)
    inputs = make_inputs(case, device, seed)
    records: list[dict[str, Any]] = []
    case_ops = ops_for(case, ops)
    for provider in providers:
        reason = provider_unavailable(provider, device)
        module: nn.Module | None = None
        if reason is None:
            if provider.startswith("compile"):
                torch._dynamo.reset()  # a fresh cache per case: no silent fallback at the recompile limit
            try:
                module = build_provider(provider, source, device, case.dtype)
            except Exception as exc:
                reason = f"build failed: {_short(exc)}"
        for op in case_ops:
            timing = peak = None
            op_reason = reason
            if module is not None:
                try:
                    mark = provider == "compile_max_autotune" and device.type == "cuda"
                    fn, leaves = op_runner(op, module, inputs, mark_step=mark)
                    use_graph = case.M <= GRAPH_MAX_ROWS and op != "latency" and provider != "compile_max_autotune"
                    notes: list[str] = []
                    timing = measure(fn, leaves, device, settings, use_graph=use_graph, notes=notes)
                    skips.extend(Skip(provider, op, str(case), note) for note in notes)
                    peak = peak_memory(fn, leaves, device)
                    _reset_grads(leaves)
                except Exception as exc:
                    op_reason, timing, peak = _short(exc), None, None
            if timing is None:
                skips.append(Skip(provider, op, str(case), op_reason or "not measured"))
            records.append(make_record(op, provider, case, timing, copy_bw, peak))
        del module
        if on_provider_done is not None:
            on_provider_done()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def device_label(device: torch.device) -> str:
    """The results file's ``device`` field: the GPU name, or the CPU marked as the Triton interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_model()
    mode = "Triton interpreter" if kernels_available(device) else "no Triton kernels"
    threads = torch.get_num_threads()
    return (f"CPU / {mode} ({cpu}, {threads} torch thread{'s' if threads != 1 else ''}); "
            "CPU timings, not comparable with GPU figures")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; ``CPU`` where that cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def versions() -> dict[str, str]:
    """torch and triton versions for the results file."""
    return {"torch": torch.__version__, "triton": triton.__version__}
