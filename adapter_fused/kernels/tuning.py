"""Launch configurations: the autotuning spaces, the interpreter's single configuration, the fixed
configuration used when PyTorch asks for deterministic algorithms, and the cache that keeps tuned
choices per device and shape key across processes (``TUNING_CACHE``).

Every config a first launch may try compiles for sm_90 without spilling registers
(``tests/kernels/test_compile_sm90.py`` checks it with ptxas; ``python tests/kernels/sm90.py`` prints
registers, spills and shared memory per config), and no kernel has more than 12.

Whether Triton runs in its CPU interpreter is decided when this package is imported, as Triton
itself decides when its own modules and each ``@triton.jit`` function are defined: set
``TRITON_INTERPRET=1`` before anything imports triton.
"""

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Widest padded bottleneck the one-pass kernel keeps in registers; wider ones take the two-kernel path.
MAX_FUSED_R = 256


def padded_rank(r: int) -> int:
    """r rounded up to a power of two of at least 16 (tl.dot needs >= 16, tl.arange powers of two)."""
    return max(16, 1 << (r - 1).bit_length())


# Row counts are tuned in power-of-two buckets from MIN_ROWS_BUCKET to MAX_ROWS_BUCKET: 12 buckets, so
# batches whose lengths change every step tune at most 12 times per kernel variant, d, r and dtype.
MIN_ROWS_BUCKET = 16
MAX_ROWS_BUCKET = 32768


def rows_bucket(rows: int) -> int:
    """Row count rounded up to a power of two and clamped to [MIN_ROWS_BUCKET, MAX_ROWS_BUCKET]: the
    autotuning key, so varying lengths share tuning and the number of keys stays bounded."""
    return min(max(1 << (rows - 1).bit_length(), MIN_ROWS_BUCKET), MAX_ROWS_BUCKET)


def _pruner(fits: Callable[[dict[str, int], dict[str, Any]], bool]):
    """An ``early_config_prune`` hook that keeps the configs for which ``fits`` holds (at least one)."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        kept = [c for c in configs if fits(c.kwargs, args)]
        return kept or [min(configs, key=lambda c: sum(c.kwargs.values()))]

    return prune


def _fused_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    # The (BLOCK_M, R_PAD) fp32 accumulator must stay in registers beside the (BLOCK_M, BLOCK_K) and
    # (R_PAD, BLOCK_N) operand tiles: up to 8192 elements with any tile, 16384 only with 64-wide tiles
    # and at most 64 rows (measured with ptxas: larger ones spill). No tile taller than the rows.
    block = meta["BLOCK_M"] * args["R_PAD"]
    small_tiles = max(meta["BLOCK_K"], meta["BLOCK_N"]) <= 64 and meta["BLOCK_M"] <= 64
    fits = block <= 8192 or (block <= 16384 and small_tiles)
    return fits and meta["BLOCK_M"] <= max(16, args["rows_bucket"])


def _tile_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    return meta["BLOCK_M"] <= max(16, args["rows_bucket"])


def _weight_grad_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    return meta["BLOCK_R"] <= args["R_PAD"] and meta["BLOCK_N"] * meta["BLOCK_R"] <= 8192


def _configs(*rows: tuple[tuple[int, ...], int, int], names: tuple[str, str, str]) -> list[triton.Config]:
    """Configs from rows ((block sizes...), num_warps, num_stages)."""
    return [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s) for blocks, w, s in rows]


if INTERPRET:
    # One small configuration: the interpreter runs every program in NumPy, and a single config
    # skips benchmarking entirely.
    FUSED_CONFIGS = _configs(((16, 32, 32), 4, 1), names=("BLOCK_M", "BLOCK_K", "BLOCK_N"))
    PROJECT_CONFIGS = _configs(((16, 64, 32), 4, 1), names=("BLOCK_M", "BLOCK_R", "BLOCK_K"))
    EXPAND_CONFIGS = _configs(((16, 32, 64), 4, 1), names=("BLOCK_M", "BLOCK_N", "BLOCK_R"))
    WEIGHT_GRAD_CONFIGS = _configs(((16, 32, 16), 4, 1), names=("BLOCK_M", "BLOCK_N", "BLOCK_R"))
else:
    # At most 12 configs per kernel, each compiling for sm_90 without register spills and within the
    # 227 KB of shared memory a block may use, at every bottleneck width its pruning admits (measured
    # with ptxas at d = 4096, bf16, r = 64, 128, 256 and 512; see tests/kernels/sm90.py). Four warps
    # spill at the larger tiles, so most configs use eight.
    FUSED_CONFIGS = _configs(
        ((16, 64, 64), 4, 3), ((16, 64, 64), 8, 2), ((16, 64, 64), 8, 3), ((16, 128, 128), 8, 2),
        ((16, 128, 128), 8, 3), ((32, 64, 64), 8, 3), ((32, 128, 128), 8, 3), ((64, 64, 64), 8, 2),
        ((64, 64, 64), 8, 3), ((64, 128, 128), 8, 2), ((128, 64, 64), 8, 2), ((128, 128, 128), 8, 2),
        names=("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    )
    PROJECT_CONFIGS = _configs(
        ((64, 64, 32), 4, 3), ((64, 64, 64), 4, 3), ((64, 64, 32), 8, 3), ((64, 64, 64), 8, 3),
        ((64, 128, 32), 8, 3), ((64, 128, 64), 8, 3), ((128, 64, 32), 8, 3), ((128, 64, 64), 8, 3),
        names=("BLOCK_M", "BLOCK_R", "BLOCK_K"),
    )
    EXPAND_CONFIGS = _configs(
        ((64, 64, 32), 4, 3), ((64, 128, 32), 4, 3), ((64, 64, 32), 8, 3), ((64, 64, 64), 8, 3),
        ((64, 128, 32), 8, 3), ((64, 128, 64), 8, 3), ((128, 64, 32), 8, 3), ((128, 64, 64), 8, 3),
        ((128, 128, 32), 8, 3), ((128, 128, 64), 8, 3),
        names=("BLOCK_M", "BLOCK_N", "BLOCK_R"),
    )
    WEIGHT_GRAD_CONFIGS = _configs(
        ((32, 64, 16), 8, 3), ((32, 64, 32), 8, 3), ((32, 64, 64), 8, 3), ((32, 64, 128), 8, 3),
        ((32, 128, 16), 8, 3), ((32, 128, 32), 8, 3), ((32, 128, 64), 8, 3), ((64, 64, 16), 8, 3),
        ((64, 64, 32), 8, 3), ((64, 64, 64), 8, 3), ((64, 128, 16), 8, 3), ((64, 128, 32), 8, 3),
        names=("BLOCK_M", "BLOCK_N", "BLOCK_R"),
    )

PRUNE_FUSED = _pruner(_fused_fits)
PRUNE_TILE = _pruner(_tile_fits)
PRUNE_WEIGHT_GRAD = _pruner(_weight_grad_fits)

# Reduction of the per-group weight-gradient partials: elements per program.
REDUCE_BLOCK = 256 if INTERPRET else 1024


# ---- tuned configurations that persist --------------------------------------------------------------

@dataclass(frozen=True)
class TuningKey:
    """What a tuned choice is valid for: the device, the kernel and its autotuning key (shape key,
    variant constants and the dtypes of its tensor arguments)."""

    device: str
    kernel: str
    values: tuple[str, ...]

    def label(self) -> str:
        return f"{self.kernel}({', '.join(self.values)})"


def device_label(device: Any) -> str:
    """A file-name-safe name of a CUDA device and its compute capability, e.g. ``NVIDIA-H100-80GB-HBM3-sm90``."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return str(getattr(device, "type", device))
    major, minor = torch.cuda.get_device_capability(device)
    name = re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return f"{name}-sm{major}{minor}"


def tuning_key(tuned: Any, named: dict[str, Any], kwargs: dict[str, Any], device: Any) -> TuningKey:
    """The key of a launch of the autotuned kernel ``tuned`` with positional arguments ``named`` (by
    name) and keyword constants ``kwargs``: the values of its autotuning key names and the dtype of
    each tensor argument, as Triton's autotuner keys its own cache, plus the device."""
    args = {**named, **kwargs}
    values = [f"{name}={args[name]}" for name in tuned.keys if name in args]
    values += [str(v.dtype).removeprefix("torch.") for v in named.values() if hasattr(v, "dtype")]
    return TuningKey(device_label(device), tuned.fn.__name__, tuple(values))


def _config_record(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


class TuningCache:
    """Tuned configurations by ``TuningKey``: in memory, and on disk in one JSON file per device and
    Triton version under ``directory``, so another process (a DDP rank, the next run) launches the
    tuned config at once instead of tuning again. A process about to tune holds a file lock, so
    processes starting together tune each key once. ``directory=None`` keeps choices in memory only.

    A stored choice is used only while it is still one of the kernel's configurations.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.memory: dict[TuningKey, triton.Config] = {}
        self.lock = threading.Lock()

    def path(self, device: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"tuning-{device}-triton{triton.__version__}.json"

    def _read(self, device: str) -> dict[str, Any]:
        path = self.path(device)
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable or half-written by a crashed process: tune again
        return data if isinstance(data, dict) else {}

    def lookup(self, key: TuningKey, configs: list[triton.Config]) -> triton.Config | None:
        """The stored choice for ``key`` among ``configs``, or None."""
        config = self.memory.get(key)
        if config is not None:
            return config
        record = self._read(key.device).get(key.label())
        if record is None:
            return None
        for candidate in configs:
            if _config_record(candidate) == record:
                self.memory[key] = candidate
                return candidate
        return None

    def tune(self, key: TuningKey, configs: list[triton.Config],
             run: Callable[[], tuple[triton.Config, int]]) -> triton.Config:
        """Tune ``key`` by calling ``run`` (which benchmarks, launches the best config once and returns
        it with the number of configs tried), unless another process stored it meanwhile; store the
        choice and print one line on stderr saying what was tuned, how many configs and how long."""
        with self.lock, self._file_lock(key.device):
            found = self.lookup(key, configs)
            if found is not None:
                return found
            sys.stderr.write(f"adapter_fused: tuning {key.label()} on {key.device} (first launch of this shape "
                             f"key; later launches and processes reuse the choice) ...")
            sys.stderr.flush()
            start = time.perf_counter()
            config, tried = run()
            seconds = time.perf_counter() - start
            self.memory[key] = config
            stored = self._store(key, config)
            where = f"; kept in {stored}" if stored else ""
            sys.stderr.write(f" {tried} configs in {seconds:.1f} s{where}\n")
            sys.stderr.flush()
            return config

    def _store(self, key: TuningKey, config: triton.Config) -> Path | None:
        path = self.path(key.device)
        if path is None:
            return None
        try:
            data = self._read(key.device)
            data[key.label()] = _config_record(config)
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(data, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)
        except OSError:
            return None  # a read-only home: the choice lives in memory for this process
        return path

    @contextlib.contextmanager
    def _file_lock(self, device: str) -> Iterator[None]:
        path = self.path(device)
        if path is None:
            yield
            return
        try:
            import fcntl

            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_suffix(".lock"), "w")
        except (ImportError, OSError):
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_directory() -> Path | None:
    """``$ADAPTER_FUSED_CACHE_DIR`` (empty or ``0``: no disk cache), else ``$XDG_CACHE_HOME/adapter_fused``
    (``~/.cache/adapter_fused``)."""
    configured = os.environ.get("ADAPTER_FUSED_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured not in ("", "0") else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapter_fused"


TUNING_CACHE = TuningCache(_cache_directory())
