"""Widening 1-byte weights (int8, fp8 e4m3) to float32 in registers, for the
GEMV and the quantized matmul. Every variant gives the same float32 values
(an int8 or e4m3 value is exactly representable): they differ only in which
GPU units do the work, which decides the speed of a weight-streaming product.

int8 variants (`WIDEN`):
- CONVERT (0, the default): `w.to(float32)`, the I2F instruction: a
  quarter-rate unit on sm_90 (16 per clock per SM).
- MAGIC (1): the exact "magic number" conversion in plain Triton:
  bits(2^23 + 128 + q) = zero-extended byte of q ^ 0x4B000080 (flipping the
  sign bit biases q by 128), read as float32, minus 2^23 + 128. Integer
  ops and one FADD, all full rate, but more of them; runs under the
  interpreter too.
- PRMT (2): the same values from inline PTX on four packed bytes: one XOR
  per four weights, one PRMT and one FADD per weight. CUDA only.

e4m3 variants: CONVERT (0) is Triton's own conversion; VIA_F16 (1) asks for
the packed e4m3x2 -> f16x2 conversion explicitly, then f16 -> f32.

Both kinds keep a 1-byte tensor one byte per register and repack the bytes
for every conversion (most of the 7-9 instructions a weight the batch-1
GEMV issues). `widen_words` instead takes the weights as they are loaded,
four to an int32 word, and returns four float32 tensors (byte j of word i
is column 4i + j): WORDS_PTX (1) with PTX that works on whole registers
(e4m3: two packed e4m3x2 -> f16x2 conversions and four f16 -> f32; int8:
the PRMT trick above), WORDS_BITS (0) with shifts and masks in plain Triton
(runs under the interpreter; e4m3 through float32 bits 2^120 too small,
exact but for flushed denormals, so the GPU default is the PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CONVERT = tl.constexpr(0)
MAGIC = tl.constexpr(1)
PRMT = tl.constexpr(2)
VIA_F16 = tl.constexpr(1)
WORDS_BITS = tl.constexpr(0)
WORDS_PTX = tl.constexpr(1)
# the format of the weights in a word
WORDS_INT8 = tl.constexpr(1)
WORDS_E4M3 = tl.constexpr(2)
WORDS_INT4 = tl.constexpr(3)  # eight nibbles, each q + 8 (model/quantize.py)

# name -> constexpr value, per weight dtype (the tools choose by name)
INT8_VARIANTS = {"convert": 0, "magic": 1, "prmt": 2}
FP8_VARIANTS = {"convert": 0, "via_f16": 1}

# a constexpr: the only kind of global a kernel may read
_PRMT_ASM = tl.constexpr("""
{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7440;
prmt.b32 $1, t, 0x4B000000, 0x7441;
prmt.b32 $2, t, 0x4B000000, 0x7442;
prmt.b32 $3, t, 0x4B000000, 0x7443;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}
""")


_E4M3_WORD_ASM = tl.constexpr("""
{
.reg .b16 lo, hi, h0, h1, h2, h3;
.reg .b32 a, b;
mov.b32 {lo, hi}, $4;
cvt.rn.f16x2.e4m3x2 a, lo;
cvt.rn.f16x2.e4m3x2 b, hi;
mov.b32 {h0, h1}, a;
mov.b32 {h2, h3}, b;
cvt.f32.f16 $0, h0;
cvt.f32.f16 $1, h1;
cvt.f32.f16 $2, h2;
cvt.f32.f16 $3, h3;
}
""")


# int4: nibbles n and n + 4 of the word {word} into the halves of an f16x2 1024 +
# nibble (0x6400 is 1024.0, whose unit in the last place is 1), minus 1032
# (0x6408): q exactly, in registers a, b, c, d (nibbles 0 and 4, 1 and 5, ...;
# low halves hold nibbles 0-3, high halves 4-7).
_INT4_PAIRS_PTX = """
.reg .b32 t, a, b, c, d, bias;
mov.b32 bias, 0x64086408;
lop3.b32 a, {word}, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t, {word}, 4;
lop3.b32 b, t, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t, {word}, 8;
lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t, {word}, 12;
lop3.b32 d, t, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 a, a, bias;
sub.f16x2 b, b, bias;
sub.f16x2 c, c, bias;
sub.f16x2 d, d, bias;
"""

# ... then each to float32 ($0..$7, the word in $8)
_INT4_WORD_ASM = tl.constexpr("{" + _INT4_PAIRS_PTX.replace("{word}", "$8") + """
.reg .b16 h0, h1, h2, h3, h4, h5, h6, h7;
mov.b32 {h0, h4}, a;
mov.b32 {h1, h5}, b;
mov.b32 {h2, h6}, c;
mov.b32 {h3, h7}, d;
cvt.f32.f16 $0, h0;
cvt.f32.f16 $1, h1;
cvt.f32.f16 $2, h2;
cvt.f32.f16 $3, h3;
cvt.f32.f16 $4, h4;
cvt.f32.f16 $5, h5;
cvt.f32.f16 $6, h6;
cvt.f32.f16 $7, h7;
}
""")

# ... or the dot product of the word (in $1) in float16 pairs: times the input
# columns (j, j + 4) packed the same way ($2..$5), summed over j = 0..3 in the
# two f16 lanes by fma.rn.f16x2, then the lanes added in float32 ($0): a word
# costs four HFMA2, two conversions and an FADD where _INT4_WORD_ASM's caller
# pays eight of each.
_INT4_DOT_ASM = tl.constexpr("{" + _INT4_PAIRS_PTX.replace("{word}", "$1") + """
.reg .b32 s;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mul.rn.f16x2 s, a, $2;
fma.rn.f16x2 s, b, $3, s;
fma.rn.f16x2 s, c, $4, s;
fma.rn.f16x2 s, d, $5, s;
mov.b32 {lo, hi}, s;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")
# two float32 as an f16x2 (round to nearest): $1 the low half, $2 the high
_PACK_F16X2_ASM = tl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")
# half_pairs scales each word's input columns by a power of two that puts the
# largest in [512, 1024): a word's four-term float16 sums (|q| <= 8) then stay
# under 32 x 1024 = 32,768. HALF_EXP: that power's exponent is HALF_EXP minus
# the largest's (biased, 8 bits), clamped so both scales stay normal floats.
HALF_EXP = tl.constexpr(9)


@triton.jit
def _pack_f16x2(lo, hi):
    return tl.inline_asm_elementwise(_PACK_F16X2_ASM, "=r,r,r", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def half_pairs(x8, HOW: tl.constexpr):
    """The input columns of int4 words (`x8`, eight [BK / 8] float32: column
    j of each word) as `int4_word_dots` takes them, and what to multiply its
    dot products by ([BK / 8]): each word's columns scaled by a power of two
    that puts the largest in [512, 1024) (any finite input then stays in
    float16's range), then WORDS_PTX, four int32 f16x2 (columns j, j + 4);
    WORDS_BITS, the eight rounded to float16."""
    m = tl.maximum(tl.abs(x8[0]), tl.abs(x8[4]))
    for j in tl.static_range(1, 4):
        m = tl.maximum(m, tl.maximum(tl.abs(x8[j]), tl.abs(x8[j + 4])))
    # exponent arithmetic instead of a reciprocal: exact scales, integer
    # latency (a word of zero or tiny inputs gets the largest scale)
    e = tl.minimum(tl.maximum(m.to(tl.int32, bitcast=True) >> 23, HALF_EXP + 1), 254)
    r = ((-e + (254 + HALF_EXP)) << 23).to(tl.float32, bitcast=True)
    back = ((e - HALF_EXP) << 23).to(tl.float32, bitcast=True)
    if HOW == WORDS_PTX:
        out = (_pack_f16x2(x8[0] * r, x8[4] * r), _pack_f16x2(x8[1] * r, x8[5] * r),
               _pack_f16x2(x8[2] * r, x8[6] * r), _pack_f16x2(x8[3] * r, x8[7] * r))
    else:
        out = ((x8[0] * r).to(tl.float16), (x8[1] * r).to(tl.float16), (x8[2] * r).to(tl.float16),
               (x8[3] * r).to(tl.float16), (x8[4] * r).to(tl.float16), (x8[5] * r).to(tl.float16),
               (x8[6] * r).to(tl.float16), (x8[7] * r).to(tl.float16))
    return out, back


@triton.jit
def _half_fma(s, q, x):
    # fma.rn in float16: q * x is exact in float32 (4 x 11 bits), then one rounding
    return (s + q * x.to(tl.float32)[None, :]).to(tl.float16).to(tl.float32)


@triton.jit
def int4_word_dots(w, xh, HOW: tl.constexpr):
    """Per int32 word of w [BN, BK / 8] (eight nibbles, each q + 8), the sum
    of q_j times its input column, in float16 pairs as _INT4_DOT_ASM does
    (xh: `half_pairs` of the columns), as float32 [BN, BK / 8]. The products
    and the four-term sums round to float16: `half_pairs` keeps them in range
    (|sum| < 65504) by scaling each word's input."""
    if HOW == WORDS_PTX:
        out = tl.inline_asm_elementwise(_INT4_DOT_ASM, "=r,r,r,r,r,r",
                                        [w, tl.broadcast_to(xh[0][None, :], w.shape),
                                         tl.broadcast_to(xh[1][None, :], w.shape),
                                         tl.broadcast_to(xh[2][None, :], w.shape),
                                         tl.broadcast_to(xh[3][None, :], w.shape)],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = tl.zeros(w.shape, tl.float32)
        hi = lo
        for j in tl.static_range(4):
            lo = _half_fma(lo, _nibble_as_float(w, j), xh[j])
            hi = _half_fma(hi, _nibble_as_float(w, j + 4), xh[j + 4])
        out = lo + hi
    return out


@triton.jit
def _nibble_as_float(w, j: tl.constexpr):
    # 2^23 + nibble as float32 bits, minus 2^23 + 8: q exactly
    return (((w >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _byte_as_float(w, j: tl.constexpr, FORMAT: tl.constexpr):
    b = (w >> (8 * j)) & 0xFF
    if FORMAT == WORDS_INT8:
        out = ((b ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        # sign to bit 31, exponent and mantissa to bits 20-26: the value times 2^-120
        bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
        out = bits.to(tl.float32, bitcast=True) * 1.329227995784916e36
    return out


@triton.jit
def widen_words(w, FORMAT: tl.constexpr, HOW: tl.constexpr):
    """int32 words w, each four 1-byte weights of FORMAT (WORDS_INT8 or
    WORDS_E4M3), as four float32 tensors of w's shape: bytes 0..3 (columns
    4i..4i+3 of a little-endian row), exactly. WORDS_INT4: eight tensors,
    nibbles 0..7 (columns 8i..8i+7), each the stored nibble minus 8."""
    if FORMAT == WORDS_INT4:
        if HOW == WORDS_PTX:
            out = tl.inline_asm_elementwise(_INT4_WORD_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                                            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            out = (_nibble_as_float(w, 0), _nibble_as_float(w, 1), _nibble_as_float(w, 2), _nibble_as_float(w, 3),
                   _nibble_as_float(w, 4), _nibble_as_float(w, 5), _nibble_as_float(w, 6), _nibble_as_float(w, 7))
    elif HOW == WORDS_PTX:
        if FORMAT == WORDS_INT8:
            # the PRMT variant's PTX: it takes four packed bytes, as a word holds them
            out = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4,
                                            is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(_E4M3_WORD_ASM, "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4,
                                            is_pure=True, pack=1)
    else:
        out = (_byte_as_float(w, 0, FORMAT), _byte_as_float(w, 1, FORMAT), _byte_as_float(w, 2, FORMAT),
               _byte_as_float(w, 3, FORMAT))
    return out


@triton.jit
def widen(w, WIDEN: tl.constexpr):
    """w (int8, float8e4nv or a float type) as float32, exactly."""
    if w.dtype == tl.int8:
        if WIDEN == MAGIC:
            bits = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
            out = bits.to(tl.float32, bitcast=True) - 8388736.0
        elif WIDEN == PRMT:
            out = tl.inline_asm_elementwise(_PRMT_ASM, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True,
                                            pack=4)
        else:
            out = w.to(tl.float32)
    elif w.dtype == tl.float8e4nv:
        if WIDEN == VIA_F16:
            out = w.to(tl.float16).to(tl.float32)
        else:
            out = w.to(tl.float32)
    else:
        out = w.to(tl.float32)
    return out


def default_widen(weight: torch.Tensor) -> int:
    """The variant the kernels use for `weight` by default: CONVERT, for now.

    Offline SASS (Triton 3.9, sm_90, the batch-1 GEMV with BN=2, BK=1024,
    2 warps) gives per int8 weight: CONVERT 5.8 instructions, one of them a
    quarter-rate I2F; MAGIC 9.4 and PRMT 9.4, all full rate (Triton keeps int8
    tensors one byte per register and repacks them, which costs more than the
    I2F saves at 4 instructions per clock per SM). In qmatmul a direct int8 to
    bfloat16 cast compiles to packed integer operations already (467
    instructions per 128x128 tile against MAGIC's 673). Which is fastest on
    the device is measured by bench/dev/quant_profile.py, not assumed."""
    del weight
    return CONVERT.value
