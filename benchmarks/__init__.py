"""Benchmarks of adapter-fused against eager PyTorch, torch.compile and AdapterHub, and against the
memory-bandwidth limit of the device.

Run ``python -m benchmarks --help`` from the repository root. The shared harness is
``benchmarks.harness``; model-level benchmarks live in ``benchmarks.models``; the results file, plots
and tables in ``benchmarks.report``.
"""
