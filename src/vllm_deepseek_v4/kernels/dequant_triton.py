"""Triton device functions that multiply activations with on-disk weight tiles, dequantised in registers.

Imported only by the Triton kernel modules (this module imports ``triton``). Formats and their decode
(``quant/`` holds the torch versions these must match, ``docs/checkpoint-formats.md §6``):

- ``FMT_DENSE`` (scheme bf16; any float weight): a cast;
- ``FMT_FP8``: e4m3 times the ``[out/128, in/128]`` block multiplier (e8m0 bytes, f32 or bf16);
- ``FMT_MXFP4``: e2m1 codes, low nibble first, times ``2^(e - 127)`` per 32 inputs;
- ``FMT_NVFP4``: e2m1 codes times an e4m3 scale per 16 inputs, divided by ``weight_global_scale``
  (compressed-tensors) or multiplied by ``weight_scale_2`` (ModelOpt).

The loop over ``in`` goes in chunks of ``CHUNK`` columns. Dense formats load a chunk as two contiguous
``[BN, CHUNK/2]`` halves. fp4 formats load it as 32-bit words (8 codes each, code ``n`` in bits ``4n..4n+3``,
which is the low-nibble-first byte order read little-endian) and decode code pairs ``(j, j + 4)`` of every word
with one shift-shift-mask: both land in one 32-bit register as two fp16 bit patterns. That is why the tiles
multiply the activation columns ``8w + j`` and ``8w + j + 4`` rather than contiguous ones.

e2m1 without a lookup table: a code's magnitude bits ``eem`` at fp16 bits 9-11 (sign at 15) are the fp16
number ``value * 2^-14`` exactly, subnormals included (``0.5`` is the fp16 subnormal ``2^-15``); the ``2^14``
is folded into the group scale, and fp16 -> fp32 conversion keeps subnormals, so no flush-to-zero mode loses
the ``0.5`` codes. In the GEMV path the group scale multiplies the group's partial sum (each thread holds
whole groups), not every weight: one FFMA per weight after the decode.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["gemv_chunk", "dot_chunk", "e8m0_scale", "expert_ptrs", "swiglu",
           "FMT_DENSE", "FMT_FP8", "FMT_MXFP4", "FMT_NVFP4"]

# tl.constexpr globals: compiled kernels may read only those (the interpreter would take plain ints)
FMT_DENSE, FMT_FP8, FMT_MXFP4, FMT_NVFP4 = (tl.constexpr(i) for i in range(4))   # = moe_layout.FORMATS values
SK_NONE, SK_E8M0, SK_F32, SK_BF16, SK_NV_DIV, SK_NV_MUL = (tl.constexpr(i) for i in range(6))
FP4_FOLD = tl.constexpr(14)                                # e2m1 via fp16 bits is value * 2^-14


@triton.jit
def e8m0_scale(byte, EXTRA: tl.constexpr):
    """``2^(byte - 127 + EXTRA)`` as fp32 from e8m0 bytes (int32); byte 255 is NaN.

    Built from the exponent bits, so byte 0 (``2^-127``, a subnormal) decodes as 0 when ``EXTRA`` is 0
    (the fp8 path); with the fp4 fold (``EXTRA = 14``) it is exact.
    """
    s = ((byte + EXTRA) << 23).to(tl.float32, bitcast=True)
    return tl.where(byte == 255, float("nan"), s)


@triton.jit
def _fp4_pair(words, J: tl.constexpr):
    """Codes ``J`` and ``J + 4`` of uint32 ``words`` as fp32 ``value * 2^-14`` (two tiles of the words' shape)."""
    if J * 4 <= 9:
        mag = words << (9 - 4 * J)               # code J magnitude -> bits 9..11, code J+4 -> 25..27
    else:
        mag = words >> (4 * J - 9)
    sgn = words << (12 - 4 * J)                  # code J sign -> bit 15, code J+4 sign -> bit 31
    pair = (mag & 0x0E000E00) | (sgn & 0x80008000)
    lo = pair.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _fp4_words_scales(w_ptr, s_ptr, gsc, rows, row_ok, k0, K, stride_w, stride_s,
                      FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, NW: tl.constexpr,
                      EVEN_K: tl.constexpr):
    """uint32 words ``[BN, NW]`` of columns ``k0 .. k0 + 8*NW`` and their group scales ``[BN, NW/WPG]`` (x 2^14)."""
    NG: tl.constexpr = NW * 8 // GROUP
    wi = k0 // 8 + tl.arange(0, NW)
    g = k0 // GROUP + tl.arange(0, NG)
    if EVEN_K:   # a mask that varies along a row would split the 16-byte loads
        words = tl.load(w_ptr + rows[:, None] * stride_w + wi[None, :], mask=row_ok[:, None], other=0)
        s = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :], mask=row_ok[:, None], other=0)
    else:
        words = tl.load(w_ptr + rows[:, None] * stride_w + wi[None, :],
                        mask=row_ok[:, None] & (wi * 8 < K)[None, :], other=0)
        s = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :],
                    mask=row_ok[:, None] & (g * GROUP < K)[None, :], other=0)
    if FMT == FMT_MXFP4:
        sf = e8m0_scale(s.to(tl.int32), FP4_FOLD)
    elif SKIND == SK_NV_DIV:   # e4m3 local scales arrive as bytes
        sf = (s.to(tl.float8e4nv, bitcast=True).to(tl.float32) / gsc) * 16384.0   # fp4 * (local / global)
    else:
        sf = (s.to(tl.float8e4nv, bitcast=True).to(tl.float32) * gsc) * 16384.0   # fp4 * local * scale_2
    return words.to(tl.uint32, bitcast=True), sf


@triton.jit
def _dense_halves(w_ptr, s_ptr, rows, row_ok, k0, K, stride_w, stride_s,
                  FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, BKH: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """fp32 halves ``[BN, BKH]`` of a dense chunk, their column ids, and the fp8 row scale ``[BN]`` (else 1)."""
    ca = k0 + tl.arange(0, BKH)
    cb = ca + BKH
    base = w_ptr + rows[:, None] * stride_w
    if EVEN_K:
        a = tl.load(base + ca[None, :], mask=row_ok[:, None], other=0)
        b = tl.load(base + cb[None, :], mask=row_ok[:, None], other=0)
    else:
        a = tl.load(base + ca[None, :], mask=row_ok[:, None] & (ca < K)[None, :], other=0)
        b = tl.load(base + cb[None, :], mask=row_ok[:, None] & (cb < K)[None, :], other=0)
    if FMT == FMT_FP8:   # e4m3 arrives as bytes: a masked fp8 load cannot take other=0
        a = a.to(tl.float8e4nv, bitcast=True)
        b = b.to(tl.float8e4nv, bitcast=True)
        s = tl.load(s_ptr + (rows // GROUP) * stride_s + k0 // GROUP, mask=row_ok, other=0)
        if SKIND == SK_E8M0:
            sf = e8m0_scale(s.to(tl.int32), 0)
        else:
            sf = s.to(tl.float32)
    else:
        sf = 1.0
    return a.to(tl.float32), b.to(tl.float32), ca, cb, sf


@triton.jit
def gemv_chunk(w_ptr, s_ptr, gsc, rows, row_ok, k0, K, x_row, stride_w, stride_s,
               FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
               CHUNK: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 partial products of ``W[rows, k0:k0+CHUNK] * x[k0:k0+CHUNK]`` for one activation row ``x_row``
    (fp32 is cheapest: 16-bit activations cost a conversion per load).

    Returns ``[BN, CHUNK/2]`` (dense) or ``[BN, CHUNK/GROUP]`` (fp4, scaled group sums); the caller adds it to a
    register accumulator of that shape and reduces along axis 1 once at the end. For fp8, ``CHUNK`` must divide
    128 (one block scale per row per chunk); for fp4 it must be a multiple of 8 * 16 and of the group.
    """
    if FMT >= FMT_MXFP4:
        NW: tl.constexpr = CHUNK // 8
        WPG: tl.constexpr = GROUP // 8
        words, sf = _fp4_words_scales(w_ptr, s_ptr, gsc, rows, row_ok, k0, K, stride_w, stride_s, FMT, SKIND, GROUP,
                                      NW, EVEN_K)
        col = k0 + 8 * tl.arange(0, NW)
        part = tl.zeros((BN, NW), tl.float32)
        for j in tl.static_range(4):
            lo, hi = _fp4_pair(words, j)
            if EVEN_K:
                x_lo = tl.load(x_row + col + j).to(tl.float32)
                x_hi = tl.load(x_row + col + (j + 4)).to(tl.float32)
            else:
                x_lo = tl.load(x_row + col + j, mask=col + j < K, other=0).to(tl.float32)
                x_hi = tl.load(x_row + col + (j + 4), mask=col + (j + 4) < K, other=0).to(tl.float32)
            part += lo * x_lo[None, :]   # two statements: two FFMAs (one sum would add an FMUL + FADD)
            part += hi * x_hi[None, :]
        return tl.sum(tl.reshape(part, (BN, NW // WPG, WPG)), 2) * sf
    else:
        a, b, ca, cb, sf = _dense_halves(w_ptr, s_ptr, rows, row_ok, k0, K, stride_w, stride_s, FMT, SKIND, GROUP,
                                         CHUNK // 2, EVEN_K)
        if EVEN_K:
            xa = tl.load(x_row + ca).to(tl.float32)
            xb = tl.load(x_row + cb).to(tl.float32)
        else:
            xa = tl.load(x_row + ca, mask=ca < K, other=0).to(tl.float32)
            xb = tl.load(x_row + cb, mask=cb < K, other=0).to(tl.float32)
        part = a * xa[None, :]
        part += b * xb[None, :]
        if FMT == FMT_FP8:
            part = part * sf[:, None]
        return part


@triton.jit
def dot_chunk(acc, w_ptr, s_ptr, gsc, rows, row_ok, k0, K, x_rows, x_ok, stride_w, stride_s,
              FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
              CHUNK: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """``acc [BM, BN] += X[:, k0:k0+CHUNK] @ W[rows, k0:k0+CHUNK]^T`` on the tensor cores.

    ``x_rows [BM, 1]`` point at the activation rows (``x_ok [BM]`` valid). The weight tile is dequantised to the
    activation dtype first (the scale multiplies every weight here: a dot cannot take a per-group scale).
    """
    dt = x_rows.dtype.element_ty
    if FMT >= FMT_MXFP4:
        NW: tl.constexpr = CHUNK // 8
        WPG: tl.constexpr = GROUP // 8
        words, sf = _fp4_words_scales(w_ptr, s_ptr, gsc, rows, row_ok, k0, K, stride_w, stride_s, FMT, SKIND, GROUP,
                                      NW, EVEN_K)
        sfw = tl.reshape(tl.broadcast_to(sf[:, :, None], (BN, NW // WPG, WPG)), (BN, NW))
        col = k0 + 8 * tl.arange(0, NW)
        for j in tl.static_range(4):
            lo, hi = _fp4_pair(words, j)
            x_lo = tl.load(x_rows + (col + j)[None, :], mask=x_ok[:, None] & (col + j < K)[None, :], other=0)
            x_hi = tl.load(x_rows + (col + j + 4)[None, :], mask=x_ok[:, None] & (col + j + 4 < K)[None, :], other=0)
            acc = tl.dot(x_lo, tl.trans((lo * sfw).to(dt)), acc, input_precision=PREC)
            acc = tl.dot(x_hi, tl.trans((hi * sfw).to(dt)), acc, input_precision=PREC)
    else:
        a, b, ca, cb, sf = _dense_halves(w_ptr, s_ptr, rows, row_ok, k0, K, stride_w, stride_s, FMT, SKIND, GROUP,
                                         CHUNK // 2, EVEN_K)
        if FMT == FMT_FP8:
            a = a * sf[:, None]
            b = b * sf[:, None]
        xa = tl.load(x_rows + ca[None, :], mask=x_ok[:, None] & (ca < K)[None, :], other=0)
        xb = tl.load(x_rows + cb[None, :], mask=x_ok[:, None] & (cb < K)[None, :], other=0)
        acc = tl.dot(xa, tl.trans(a.to(dt)), acc, input_precision=PREC)
        acc = tl.dot(xb, tl.trans(b.to(dt)), acc, input_precision=PREC)
    return acc


@triton.jit
def expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, slot, FMT: tl.constexpr, ALIGN: tl.constexpr):
    """Weight pointer, scale pointer and nvfp4 global scale of table slot ``slot``."""
    w = W + tl.multiple_of(tl.load(W_OFF + slot), ALIGN)
    s = S + tl.load(S_OFF + slot)
    if FMT == FMT_NVFP4:
        g = tl.load(G + tl.load(G_OFF + slot))
    else:
        g = 1.0
    return w, s, g


@triton.jit
def swiglu(g, u, route_w, limit, HAS_LIMIT: tl.constexpr):
    """``route_w * silu(min(g, limit)) * clamp(u, -limit, limit)`` in fp32 (``docs/dsv4-architecture.md §8``)."""
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    return route_w * (g / (1.0 + tl.exp(-g))) * u
