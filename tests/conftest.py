"""pytest setup shared by the tests. Triton reads TRITON_INTERPRET when a @triton.jit decorator
runs, i.e. when kernels/attention.py is imported, so it is set here, before any test module
imports a kernel: without CUDA the kernels then run in Triton's CPU interpreter
(../docs/attention-kernel.md §5)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
