"""Launch configurations: the autotuning spaces, the interpreter's single configuration, and the
fixed configuration used when PyTorch asks for deterministic algorithms.

Whether Triton runs in its CPU interpreter is decided when this package is imported, as Triton
itself decides when its own modules and each ``@triton.jit`` function are defined: set
``TRITON_INTERPRET=1`` before anything imports triton.
"""

import os
from collections.abc import Callable, Iterable
from typing import Any

import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Widest padded bottleneck the one-pass kernel keeps in registers; wider ones take the two-kernel path.
MAX_FUSED_R = 256


def padded_rank(r: int) -> int:
    """r rounded up to a power of two of at least 16 (tl.dot needs >= 16, tl.arange powers of two)."""
    return max(16, triton.next_power_of_2(r))


def rows_bucket(rows: int) -> int:
    """Row count rounded up to a power of two: the autotuning key, so varying lengths share tuning."""
    return triton.next_power_of_2(max(rows, 1))


def _space(grid: Iterable[dict[str, int]], warps: Iterable[int], stages: Iterable[int]) -> list[triton.Config]:
    return [
        triton.Config(dict(meta), num_warps=w, num_stages=s)
        for meta in grid
        for w in warps
        for s in stages
    ]


def _pruner(fits: Callable[[dict[str, int], dict[str, Any]], bool]):
    """An ``early_config_prune`` hook that keeps the configs for which ``fits`` holds (at least one)."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        kept = [c for c in configs if fits(c.kwargs, args)]
        return kept or [min(configs, key=lambda c: sum(c.kwargs.values()))]

    return prune


def _fused_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    # The (BLOCK_M, R_PAD) fp32 accumulator must stay in registers; no tile taller than the rows.
    return meta["BLOCK_M"] * args["R_PAD"] <= 16384 and meta["BLOCK_M"] <= max(16, args["rows_bucket"])


def _tile_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    return meta["BLOCK_M"] <= max(16, args["rows_bucket"])


def _weight_grad_fits(meta: dict[str, int], args: dict[str, Any]) -> bool:
    return meta["BLOCK_R"] <= args["R_PAD"] and meta["BLOCK_N"] * meta["BLOCK_R"] <= 8192


if INTERPRET:
    # One small configuration: the interpreter runs every program in NumPy, and a single config
    # skips benchmarking entirely.
    FUSED_CONFIGS = _space([dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32)], [4], [1])
    PROJECT_CONFIGS = _space([dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=32)], [4], [1])
    EXPAND_CONFIGS = _space([dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=64)], [4], [1])
    WEIGHT_GRAD_CONFIGS = _space([dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16)], [4], [1])
else:
    FUSED_CONFIGS = _space(
        [dict(BLOCK_M=m, BLOCK_K=k, BLOCK_N=k) for m in (16, 32, 64, 128) for k in (64, 128)],
        [4, 8],
        [2, 3],
    )
    PROJECT_CONFIGS = _space(
        [dict(BLOCK_M=m, BLOCK_R=r, BLOCK_K=k) for m in (64, 128) for r in (64, 128) for k in (32, 64)],
        [4, 8],
        [3],
    )
    EXPAND_CONFIGS = _space(
        [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_R=r) for m in (64, 128) for n in (64, 128) for r in (32, 64)],
        [4, 8],
        [3],
    )
    # Pruned to at most 28 per shape (BLOCK_N * BLOCK_R <= 8192, BLOCK_R <= R_PAD): every config is
    # compiled and timed on the first backward of each shape.
    WEIGHT_GRAD_CONFIGS = _space(
        [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_R=r) for m in (32, 64) for n in (64, 128) for r in (16, 32, 64, 128)],
        [4, 8],
        [3],
    )

PRUNE_FUSED = _pruner(_fused_fits)
PRUNE_TILE = _pruner(_tile_fits)
PRUNE_WEIGHT_GRAD = _pruner(_weight_grad_fits)

# Reduction of the per-group weight-gradient partials: elements per program.
REDUCE_BLOCK = 256 if INTERPRET else 1024
