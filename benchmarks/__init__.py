"""Benchmarks of adapter-fused against eager PyTorch, torch.compile and AdapterHub, and against the
memory-bandwidth limit of the device.

Run ``python -m benchmarks --help`` from the repository root. The shared harness is
``benchmarks.harness``; model-level benchmarks live in ``benchmarks.models``, the many-adapters batch in
``benchmarks.grouped``, the Trainer preset in ``benchmarks.train``; the results file, plots, tables and
targets in ``benchmarks.report``. ``python -m benchmarks.host_cost`` measures host cost on the GPU launch
path without a GPU (``--sites``: per adapter site inside models, ``benchmarks.sites``);
``bash benchmarks/gpu_check.sh`` is the GPU acceptance run (``benchmarks.gpu_check``).
"""
