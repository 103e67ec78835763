"""MXFP4 decoding inside Triton kernels: packed E2M1 codes and E8M0 scales to weight tiles.

The rules are those of :mod:`apt_hal.mxfp4`: element ``2i`` in the low nibble of byte ``i``,
value ``E2M1(code) * 2^(scale - 127)``, scale 0xFF makes its 32 values NaN. Both factors are
built from bit patterns (no lookup table, no ``exp2``): every decoded value is exact, then
rounded once to the tile's dtype (a no-op unless the product leaves that dtype's range).

Each code's sign, exponent and mantissa bits (s e1 e0 m) are moved into a float's sign bit, the
two lowest bits of its exponent field and the top bit of its mantissa: that float is the code's
value times 2^-126 for every code (code 1, 0.5, lands on the subnormal 2^-127), so one
multiplication by 2^126 and one by the scale, both exact, finish.

For bfloat16 tiles on a GPU both codes of a byte are built at once as a bf16 pair in one 32-bit
word and multiplied two per instruction (mul.bf16x2; the fp4_matmul kernel's technique): about
6.5 instructions per element on sm_90 instead of about 10 through float32 (counted in the SASS
of a decode-sized GEMM). Under Triton 3.6's interpreter, which mishandles bf16 arithmetic and
subnormals, and for float16 and float32 tiles, the codes go through float32.

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
    return tl.reshape(values, [N, K]).to(DTYPE)


# 2^14: codes from float32_codes_from_words are their values times 2^-14.
WORD_CODE_SCALE = tl.constexpr(16384.0)


@triton.jit
def _float16_pair_to_float32(pair, INTERPRETER: tl.constexpr):
    """The two float16 halves of each uint32 ``pair`` widened to float32, [..., 2] (low half first)."""
    if INTERPRETER:
        halves = tl.join((pair & 0xFFFF).to(tl.uint16), (pair >> 16).to(tl.uint16))
        return halves.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        # Spelled out: written as the lines above, LLVM rebuilds each half on its own (shifts
        # pushed through the masks) and repacks them, two instructions more per pair.
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=f,=f,r", [pair], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
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
