"""Intel GPU configuration of the shared Triton kernels, as data.

Hardware facts (Intel's Xe-HPC / Xe2 documentation): 64 KiB of shared local memory (SLM) per
work-group is available on every Xe GPU Intel's Triton targets (Data Center GPU Max has 128 KiB
per Xe-core); DPAS (the matrix engine) multiplies bf16 tiles of M 8 x N 16 x K 16 per
sub-group; Intel's Triton backend runs 32 work-items per warp unless told otherwise.

The tiles are **untuned**: chosen to fit these limits (tests/test_rocm_xpu.py checks them) and
never compiled here: Intel's Triton backend (triton-xpu) replaces the triton package, so it is
not installed next to the standard wheel. No Intel GPU has run them.
"""

from apt_hal.backends.triton_vendor import TritonVendor

KIB = 1024
DPAS_SHAPE = (8, 16, 16)  # M, N, K of a bf16 DPAS: tile sides must be multiples
MAX_WARPS = 32  # 1024 work-items per work-group, 32 per warp


def _tile(block_m, block_n, block_k, warps):
    return dict(KIND="mma", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=2)


def _fp4(block_m, block_n, block_k, warps, swap_ab):
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=2, swap_ab=swap_ab)


XE = TritonVendor(
    "intel", "xpu", "xe", warp_size=32, shared_memory_bytes=64 * KIB, half_dot_precision="ieee",
    moe_gemm_tiles=((16, _tile(16, 64, 64, 4), _tile(16, 64, 64, 4)),
                    (64, _tile(64, 64, 64, 4), _tile(64, 64, 64, 4)),
                    (float("inf"), _tile(128, 64, 32, 8), _tile(128, 128, 32, 8))),
    fp4_matmul_tiles=((16, _fp4(16, 64, 128, 4, True)), (64, _fp4(64, 64, 64, 4, True)),
                      (float("inf"), _fp4(128, 64, 64, 8, False))),
)
