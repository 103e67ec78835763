"""Register the cuda-triton kernels: one module per op contract, each registering itself."""

from apt_hal.backends.cuda_triton import fp4_matmul, moe, paged, rotary  # noqa: F401
