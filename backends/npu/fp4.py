"""fp4_matmul on the Ascend 950: ``npu_weight_quant_batchmatmul`` with MXFP4 weights.

The contract multiplies an unquantized ``x`` by MXFP4 weights, which is this weight-only
("antiquant") matmul: ``x [M, K]`` bf16/fp16, the weight as the transposed view ``[K/2, N]`` of
``w_packed`` (uint8 carrier, ``weight_dtype=torch_npu.float4_e2m1fn_x2``), the E8M0 scales as the
transposed view ``[K/32, N]`` viewed as ``float8_e8m0fnu``, ``antiquant_group_size=32``. Both
are views, so no repacking step is needed; the op documents transposed (non-contiguous) weight
and scale inputs. ``npu_quant_matmul`` with MXFP4 is *not* used: it multiplies MXFP4 by MXFP4,
so ``x`` would have to be quantized first, which the contract does not do.

The bias goes in as float32 for bf16 ``x`` and as fp16 for fp16 ``x``, as the op requires.
"""

from __future__ import annotations

import torch
import torch_npu

from apt_hal import mxfp4

# npu_weight_quant_batchmatmul: K and N in [1, 65535]; no empty inputs; x in bf16 or fp16.
MAX_DIM = 65535
X_DTYPES = (torch.bfloat16, torch.float16)


def supports(chip, x, w_packed, w_scales, bias) -> bool:
    k, n = x.shape[-1], w_packed.shape[0]
    return (chip.mxfp4_weights and x.dtype in X_DTYPES and x.numel() > 0
            and k <= MAX_DIM and 0 < n <= MAX_DIM)


def fp4_matmul(chip, x, w_packed, w_scales, bias):
    k, n = x.shape[-1], w_packed.shape[0]
    weight = mxfp4.as_uint8(w_packed).t()
    scales = mxfp4.as_uint8(w_scales).t().view(torch.float8_e8m0fnu)
    if bias is not None and x.dtype == torch.bfloat16:
        bias = bias.float()
    y = torch_npu.npu_weight_quant_batchmatmul(x.reshape(-1, k), weight, scales, bias=bias,
                                               antiquant_group_size=mxfp4.BLOCK,
                                               weight_dtype=torch_npu.float4_e2m1fn_x2)
    return y.reshape(*x.shape[:-1], n)


def declines(chip, x, w_packed, w_scales, bias) -> bool:
    """The predicate registered on chips without MXFP4: every call goes to the reference."""
    return False
