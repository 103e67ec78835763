"""MXFP4 decoding inside Triton kernels: every decode path the kernels use, in one module.

The rules are those of :mod:`apt_hal.mxfp4`: element ``2i`` in the low nibble of byte ``i``,
value ``E2M1(code) * 2^(scale - 127)``, scale 0xFF makes its 32 values NaN. Both factors are
built from bit patterns (no lookup table, no ``exp2``): every decoded value is exact, then
rounded once to the tile's dtype (a no-op unless the product leaves that dtype's range).

The paths, one per way a kernel consumes weights (tests/test_mxfp4_decode.py checks each against
:func:`apt_hal.mxfp4.dequantize`):

* :func:`dequantize_tile`: a ``[N, K]`` tile in the dot's dtype (the MoE expert GEMMs);
* :func:`float32_codes_from_words` with :func:`e8m0_to_float32` or :func:`scaled_block_sums`:
  codes for dot products on CUDA cores (the MoE decode GEMV, fp4_matmul's CUDA-core GEMV), summed
  per MX block by :func:`row_block_sums`;
* :func:`dequantize_mma_words`: bf16 tensor-core operands from 32-bit words (fp4_matmul).

``INTERPRETER`` (a constexpr every path takes) is :func:`apt_hal.backends.cuda_triton.hw.pure_triton`:
True under Triton's interpreter and for AMD and Intel targets, which then take plain Triton
arithmetic through float32; False only on NVIDIA, whose branch may use bf16 arithmetic and the
inline PTX of :mod:`.nvidia_ptx` (the only place the decoders' NVIDIA-only instructions live).
The interpreter mishandles bf16 arithmetic and subnormals, hence the float32 forms.

Each code's sign, exponent and mantissa bits (s e1 e0 m) are moved into a float's sign bit, the
two lowest bits of its exponent field and the top bit of its mantissa: that float is the code's
value times 2^-126 for every code (code 1, 0.5, lands on the subnormal 2^-127), so one
multiplication by 2^126 and one by the scale, both exact, finish.

For bfloat16 tiles on a GPU both codes of a byte are built at once as a bf16 pair in one 32-bit
word and multiplied two per instruction (mul.bf16x2): about 6.5 instructions per element on
sm_90 instead of about 10 through float32 (counted in the SASS of a decode-sized GEMM).
:func:`dequantize_mma_words` builds the pairs of codes 16 bits apart in a word, as the tensor
core's operand registers hold them, and scales them with one ``mul.bf16x2`` (two for scale codes
above 128).

Dot products on CUDA cores (:func:`float32_codes_from_words`, the decode GEMV of the MoE experts)
read the packed weights as 32-bit words of 8 codes and place codes ``j`` and ``j + 4`` of a word,
16 bits apart, as one float16 pair in a 32-bit register: one shift and one mask per pair for the
magnitudes, the same for the signs. A float16 half whose exponent field holds (e1 e0) and whose
top mantissa bit holds m is the code's value times 2^-14, for every code (code 1, 0.5, is the
float16 subnormal 2^-15), and widening it to float32 is one exact instruction per code. The
2^-14 is a power of two: the caller multiplies it back once per block, with the scale. About 3
instructions per code, then the multiply-adds.
"""

import triton
import triton.language as tl

# Imported by name, not as a module: torch.compile (Inductor) rebuilds a user kernel's source from
# the JIT functions its globals name, and does not follow a module attribute (nvidia_ptx.f).
from apt_hal.backends.cuda_triton.nvidia_ptx import float16x2_to_float32, mul_bf16x2


@triton.jit
def e8m0_to_float32(scales):
    """E8M0 codes (uint8) -> float32 ``2^(code - 127)``; 0 is the subnormal 2^-127, 0xFF is NaN."""
    s = scales.to(tl.int32)
    bits = tl.where(s == 0, 0x00400000, s << 23)
    return tl.where(s == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_bfloat16(scales):
    """E8M0 codes (uint8) -> bfloat16 ``2^(code - 127)`` (bf16 has float32's exponent range)."""
    s = scales.to(tl.uint16)
    bits = tl.where(s == 0, 0x0040, s << 7)
    return tl.where(s == 255, 0x7FC0, bits).to(tl.bfloat16, bitcast=True)


@triton.jit
def float32_codes(p):
    """Both codes of each byte (int32 ``p``) as float32 values times 2^-126, [..., 2]."""
    lo = ((p << 28) & -2147483648) | ((p << 22) & 0x01C00000)
    hi = ((p << 24) & -2147483648) | ((p << 18) & 0x01C00000)
    return tl.join(lo, hi).to(tl.float32, bitcast=True)


@triton.jit
def bfloat16_codes(p):
    """Both codes of each byte (uint32 ``p``) as bfloat16 values times 2^-126, [..., 2].
    ``p * 0x40040`` copies the byte to bits 6 and 18 and ``p * 0x1001000`` to bits 12 and 24:
    the masks keep each code's (e1 e0 m) under the exponent field of its bf16 half and its sign
    on that half's bit 15, so the word is the bf16 pair (low code, high code)."""
    pair = ((p * 0x40040) & 0x01C001C0) | ((p * 0x1001000) & 0x80008000)
    lo = (pair & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    hi = (pair >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def dequantize_tile(packed, scales, N: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr,
                    INTERPRETER: tl.constexpr):
    """Decode ``packed`` uint8 ``[N, K/2]`` with ``scales`` uint8 ``[N, K/32]`` to DTYPE ``[N, K]``."""
    if DTYPE == tl.bfloat16 and not INTERPRETER:
        codes = tl.reshape(bfloat16_codes(packed.to(tl.uint32)), [N, K // 32, 32])
        values = codes * 8.507059173023462e37 * tl.reshape(e8m0_to_bfloat16(scales), [N, K // 32, 1])  # 2^126
    else:
        codes = tl.reshape(float32_codes(packed.to(tl.int32)), [N, K // 32, 32])
        values = codes * 8.507059173023462e37 * tl.reshape(e8m0_to_float32(scales), [N, K // 32, 1])
    return decoded_to(tl.reshape(values, [N, K]), DTYPE, INTERPRETER)


@triton.jit
def decoded_to(values, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """Decoded float32 ``values`` rounded once to DTYPE. Every MXFP4 value is a bfloat16 value, so
    for bfloat16 on the portable path the result is the top half of each float32: exact (NaN stays
    NaN) and the same bits a conversion gives, which the interpreter's does not for subnormals
    (scale code 0)."""
    if DTYPE == tl.bfloat16 and INTERPRETER:
        return (values.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(DTYPE)


# 2^14: codes from float32_codes_from_words are their values times 2^-14.
WORD_CODE_SCALE = tl.constexpr(16384.0)


@triton.jit
def _float16_pair_to_float32(pair, INTERPRETER: tl.constexpr):
    """The two float16 halves of each uint32 ``pair`` widened to float32, [..., 2] (low half first)."""
    if INTERPRETER:
        halves = tl.join((pair & 0xFFFF).to(tl.uint16), (pair >> 16).to(tl.uint16))
        return halves.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo, hi = float16x2_to_float32(pair)
        return tl.join(lo, hi)


@triton.jit
def _float16_code_pair(words, J: tl.constexpr, INTERPRETER: tl.constexpr):
    """Codes ``J`` and ``J + 4`` of each uint32 word as float32 values times 2^-14, [..., 2]. Code
    ``J``'s bits (4J+3 sign, 4J+2..4J magnitude) go to bit 15 and bits 11..9 of the low float16
    half; code ``J + 4``, 16 bits higher, lands likewise in the high half."""
    MAG_SHIFT: tl.constexpr = 9 - 4 * J
    if MAG_SHIFT >= 0:
        mag = words << MAG_SHIFT
    else:
        mag = words >> (-MAG_SHIFT)
    pair = (mag & 0x0E000E00) | ((words << (12 - 4 * J)) & 0x80008000)
    return _float16_pair_to_float32(pair, INTERPRETER)


@triton.jit
def float32_codes_from_words(words, INTERPRETER: tl.constexpr):
    """Packed codes as uint32 words ``[R, W]`` (code ``8w + i`` in nibble ``i`` of word ``w``) ->
    float32 ``[R, 8W]`` in code order, each the code's E2M1 value times 2^-14 (exact)."""
    pairs = tl.join(tl.join(_float16_code_pair(words, 0, INTERPRETER), _float16_code_pair(words, 1, INTERPRETER)),
                    tl.join(_float16_code_pair(words, 2, INTERPRETER), _float16_code_pair(words, 3, INTERPRETER)))
    # pairs[r, w, a, j0, j1] is code 4a + 2j1 + j0 of word w (each join appends its axis last).
    return tl.reshape(tl.permute(pairs, (0, 1, 2, 4, 3)), [words.shape[0], words.shape[1] * 8])


@triton.jit
def row_block_sums(codes, x, BLOCK_M: tl.constexpr):
    """codes [R, KB, 32] and x [BLOCK_M, KB, 32] -> [R, KB, BLOCK_M]: per row of x, the sums over
    the last axis of codes * x. Each x row is split off with split/join (no 4-D broadcast: that
    would spread the 32 summed values over a warp's lanes instead of one thread's registers)."""
    if BLOCK_M == 1:
        sums = tl.sum(codes * tl.reshape(x, [x.shape[1], 32])[None, :, :], axis=2)[:, :, None]
    elif BLOCK_M == 2:
        x0, x1 = tl.split(tl.permute(x, (1, 2, 0)))
        sums = tl.join(tl.sum(codes * x0[None, :, :], axis=2), tl.sum(codes * x1[None, :, :], axis=2))
    else:
        tl.static_assert(BLOCK_M == 4, "gemv tiles take 1, 2 or 4 rows")
        # Row m = 2*hi + lo: split off lo, then hi.
        x_lo0, x_lo1 = tl.split(tl.permute(tl.reshape(x, [2, 2, x.shape[1], 32]), (0, 2, 3, 1)))
        x0, x2 = tl.split(tl.permute(x_lo0, (1, 2, 0)))
        x1, x3 = tl.split(tl.permute(x_lo1, (1, 2, 0)))
        s01 = tl.join(tl.sum(codes * x0[None, :, :], axis=2), tl.sum(codes * x1[None, :, :], axis=2))
        s23 = tl.join(tl.sum(codes * x2[None, :, :], axis=2), tl.sum(codes * x3[None, :, :], axis=2))
        sums = tl.reshape(tl.permute(tl.join(s01, s23), (0, 1, 3, 2)), [codes.shape[0], codes.shape[1], 4])
    return sums


@triton.jit
def scaled_block_sums(sums, scale_codes):
    """Block sums of codes from :func:`float32_codes_from_words` times x (values * 2^-14), [R, KB,
    BLOCK_M], times their E8M0 scales [R, KB]: the blocks' contributions in float32. The factor
    2^14 * 2^(code - 127) = 2^(code - 113) is a normal float32 for codes up to 240; above, a
    second factor 2^(code - 240) follows 2^127 (NaN for code 0xFF). Each multiplication is by a
    power of two, so the result is rounded at most once (where it leaves float32's range), and no
    intermediate overflows unless the result does."""
    # Widened to [R, KB, 1] first: the factors then take the sums' register layout from the codes
    # alone (one layout conversion per K step instead of one per factor).
    c = scale_codes.to(tl.int32)[:, :, None]
    f1 = ((tl.minimum(c, 240) + 14) << 23).to(tl.float32, bitcast=True)
    f2 = tl.where(c == 255, 0x7FC00000, (tl.maximum(c, 240) - 113) << 23).to(tl.float32, bitcast=True)
    return sums * f1 * f2


@triton.jit
def _bfloat16_scale_factors(codes, INTERPRETER: tl.constexpr):
    """E8M0 scale codes (uint8) -> (f1, f2) with f1 * f2 = 2^126 * 2^(code-127) exactly: the
    factor that turns the codes of :func:`_bfloat16_code_pairs` (value * 2^-126) into weights.
    f1 = 2^(min(code,128)-1) is a normal bf16 number; f2 = 2^(max(code,128)-128) is 1 except for
    scales above 2 (code > 128), and NaN for code 0xFF. On the GPU both are bf16 pairs (the
    factor in both halves of a uint32), float32 under the interpreter."""
    c = codes.to(tl.uint32)
    f1 = tl.minimum(c, 128) + 126
    f2 = tl.maximum(c, 128) - 1
    if INTERPRETER:
        f1 = (f1 << 23).to(tl.float32, bitcast=True)
        f2 = tl.where(c == 255, 0x7FC00000, f2 << 23).to(tl.float32, bitcast=True)
    else:
        f1 = (f1 << 7) * 0x10001
        f2 = tl.where(c == 255, 0x7FC0, f2 << 7) * 0x10001
    return f1, f2


@triton.jit
def _bfloat16_code_pairs(words, J: tl.constexpr):
    """Codes J and J+4 of each uint32 word (code i in nibble i), as the bf16 pair (low half, high
    half) of a uint32, each the code's value times 2^-126: the code's sign on the half's bit 15 and
    its 3 exponent/mantissa bits right under bf16's exponent field, which encodes value * 2^-126
    for every code (code 1, 0.5, lands on a bf16 subnormal, so the encoding is uniform).
    Both halves move together: the two nibbles are isolated (J >= 2: shifted into the low byte of
    their half), one multiplication places two copies of each (the copies' bits do not overlap, so
    nothing carries), and a mask keeps the sign of one copy and the magnitude of the other.
    3-4 integer instructions per pair."""
    nibbles = words & (0x000F000F << (4 * J))
    if J >= 2:
        nibbles = nibbles >> 8
    if J % 2 == 0:
        pair = nibbles * 0x1040  # copies shifted by 12 (sign 3 -> 15) and 6 (magnitude 0..2 -> 6..8)
    else:
        pair = nibbles * 0x104  # nibble at bits 4..7: copies shifted by 8 and 2
    return pair & 0x81C081C0


@triton.jit
def _scaled_pairs(pairs, f, INTERPRETER: tl.constexpr):
    """bf16 pairs (uint32) times bf16 pair factors f (uint32), exact here: one mul.bf16x2 each.
    Under the interpreter and off NVIDIA, pairs are float32 [..., 2] and f float32."""
    if INTERPRETER:
        return pairs * f[:, :, None]
    else:
        return mul_bf16x2(pairs, f)


@triton.jit
def _pairs_as_operand(pairs, INTERPRETER: tl.constexpr):
    """bf16 pairs held as uint32 -> bf16 [..., 2] (float32 under the interpreter, already split)."""
    if INTERPRETER:
        return pairs
    else:
        lo = (pairs & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        hi = (pairs >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.join(lo, hi)


@triton.jit
def _weight_pairs(words, J: tl.constexpr, f1, f2, BIG_SCALES: tl.constexpr, INTERPRETER: tl.constexpr):
    """Weights 8v + J and 8v + J + 4 of words [R, V] as operands [R, V, 2]; f1, f2 [R, V]."""
    pairs = _bfloat16_code_pairs(words, J)
    if INTERPRETER:
        pairs = tl.join((pairs << 16).to(tl.float32, bitcast=True), (pairs & 0xFFFF0000).to(tl.float32, bitcast=True))
    pairs = _scaled_pairs(pairs, f1, INTERPRETER)
    if BIG_SCALES:
        pairs = _scaled_pairs(pairs, f2, INTERPRETER)
    return _pairs_as_operand(pairs, INTERPRETER)


@triton.jit
def dequantize_mma_words(words, codes, BIG_SCALES: tl.constexpr, INTERPRETER: tl.constexpr):
    """Packed E2M1 codes as uint32 words [R, W] (8 codes each, K order) and their E8M0 scale
    codes [R, W / 4] -> the weights [R, 8W] in K order, as tensor-core operands (bf16; float32
    under the interpreter). Every value is exact: E2M1 times a power of two is a bf16 value.
    ``BIG_SCALES``: some scale code of the tile may exceed 128 (see :func:`_bfloat16_scale_factors`):
    one more multiplication."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    f1, f2 = _bfloat16_scale_factors(codes, INTERPRETER)
    f1 = tl.broadcast_to(f1[:, :, None], (R, W // 4, 4)).reshape(R, W)
    f2 = tl.broadcast_to(f2[:, :, None], (R, W // 4, 4)).reshape(R, W)
    w = tl.join(tl.join(_weight_pairs(words, 0, f1, f2, BIG_SCALES, INTERPRETER),
                        _weight_pairs(words, 1, f1, f2, BIG_SCALES, INTERPRETER)),
                tl.join(_weight_pairs(words, 2, f1, f2, BIG_SCALES, INTERPRETER),
                        _weight_pairs(words, 3, f1, f2, BIG_SCALES, INTERPRETER)))
    # w[r, v, e, j0, j1] is weight 8v + 4e + 2 j1 + j0 of row r
    return w.permute(0, 1, 2, 4, 3).reshape(R, 8 * W)
