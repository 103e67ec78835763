"""NVIDIA-only instructions of the shared Triton kernels, as inline PTX.

Only NVIDIA's compiler accepts these: every call is in the branch of a kernel's ``INTERPRETER``
constexpr that is False, which :func:`apt_hal.backends.cuda_triton.hw.pure_triton` sets only for
NVIDIA targets (AMD and Intel builds, and the interpreter, take the pure-Triton branch). Each
function here is a single instruction that Triton's own lowering would not produce as well.
"""

import triton
import triton.language as tl


@triton.jit
def mul_bf16x2(a, b):
    """Two bf16 products per uint32: ``a`` and ``b`` each hold a bf16 pair (low half, high half).
    Written as PTX: ptxas otherwise swaps the halves of each pair around the multiply."""
    return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                     dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def float16x2_to_float32(pair):
    """The two float16 halves of each uint32 ``pair`` widened to float32: (low, high). Written as
    PTX: from plain Triton, LLVM rebuilds each half on its own (shifts pushed through the masks)
    and repacks them, two instructions more per pair."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
        "=f,=f,r", [pair], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
