"""Benchmark-test setup: without a GPU the kernels run in Triton's interpreter, which must be switched
on before the kernels are first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
