"""File names of results (no dependencies beyond the standard library: the GPU acceptance run imports
this on an image that may lack the benchmark extras)."""

from __future__ import annotations

import re
from datetime import datetime


def file_stem(device: str, when: datetime) -> str:
    """``adapter_bench_<device>_<date>``, e.g. ``adapter_bench_nvidia-h200_2025-01-31_120501``."""
    if device.startswith("CPU"):
        slug = "cpu-interpreter" if "interpreter" in device else "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"
    return f"adapter_bench_{slug}_{when:%Y-%m-%d_%H%M%S}"
