"""Triton kernels. `kernels.attention.attention` is the fused prefix attention (see
kernels/README.md)."""
