"""FP8 block quantization: e4m3 weights with one scale per 128x128 block (``docs/checkpoint-formats.md §6.1, §6.4``).

``W[i, j] = float(w[i, j]) * scale[i // 128, j // 128]``; the scale is a multiplier, stored as e8m0 (DeepSeek
V4 Flash/Pro), float32 (V4-Flash-Base, DeepSeek-V3 ``weight_scale_inv``) or bfloat16 (compressed-tensors
FP8_BLOCK). Edge blocks are cropped, so ``out``/``in`` need not be multiples of 128.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import torch

from ..errors import QuantMismatchError, TensorShapeError
from ._parts import cdiv, take
from .e8m0 import e8m0_to_float, exponent_to_e8m0, pow2_exponent_ceil
from .scheme import SCHEMES

__all__ = ["BLOCK", "FP8_MAX", "dequantize", "quantize", "scale_to_float"]

_S = SCHEMES["fp8_block"]
assert _S.block_out == _S.block_in      # square blocks: one edge serves both axes below
BLOCK: Final[int] = _S.block_in  # config.json quantization_config.weight_block_size = [128, 128]
FP8_MAX: Final[float] = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# quantize's scale dtypes (the decoder also reads F16 scales, see the Scheme record)
_SCALE_DTYPE_BY_NAME: Final[dict[str, torch.dtype]] = {
    "e8m0": torch.float8_e8m0fnu, "f32": torch.float32, "bf16": torch.bfloat16,
}


def scale_to_float(scale: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """A block scale as float32 multipliers: e8m0 through its exponent byte, float dtypes by value."""
    if scale.dtype == torch.float8_e8m0fnu:
        return e8m0_to_float(scale, name=name)
    return scale.float()


def _expand(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Per-block ``[ceil(out/128), ceil(in/128)]`` to per-element ``[out, in]``, cropping the edge blocks."""
    full = scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    return full[:out_features, :in_features]


def dequantize(parts: Mapping[str, torch.Tensor], out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32, *, name: str | None = None) -> torch.Tensor:
    """Roles ``weight`` e4m3 ``[out, in]`` and ``scale`` ``[ceil(out/128), ceil(in/128)]`` to ``[out, in]``.

    Computed in float32 and cast once to ``dtype``.
    """
    w = take(parts, "weight", scheme=_S.name, name=name, shape=_S.shape("weight", out_features, in_features))
    s = take(parts, "scale", scheme=_S.name, name=name, shape=_S.shape("scale", out_features, in_features))
    scale = scale_to_float(s, name=f"{name}.scale" if name else "scale")
    return (w.float() * _expand(scale, out_features, in_features)).to(dtype)


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """``max |w|`` per 128x128 block (zero padding at the edges); ``[ceil(out/128), ceil(in/128)]`` f32."""
    out_features, in_features = w.shape
    rb, cb = cdiv(out_features, BLOCK), cdiv(in_features, BLOCK)
    padded = torch.nn.functional.pad(w.float().abs(), (0, cb * BLOCK - in_features, 0, rb * BLOCK - out_features))
    return padded.reshape(rb, BLOCK, cb, BLOCK).amax(dim=(1, 3))


def quantize(w: torch.Tensor, *, scale_dtype: Literal["e8m0", "f32", "bf16"] = "e8m0") -> dict[str, torch.Tensor]:
    """``w [out, in]`` to ``{"weight": e4m3 [out, in], "scale": [ceil(out/128), ceil(in/128)]}``.

    The block scale is ``amax / 448``; for e8m0 it is rounded up to a power of two (then quantizing is exact
    division and nothing saturates), for bf16 rounded up to the next bf16. All-zero blocks get scale 1.
    """
    if w.ndim != 2:
        raise TensorShapeError(tensor="fp8_block input", expected="a 2-D [out, in] weight", found=list(w.shape))
    if scale_dtype not in _SCALE_DTYPE_BY_NAME:
        raise QuantMismatchError(tensor="fp8_block scale_dtype", expected=" | ".join(_SCALE_DTYPE_BY_NAME),
                                 found=scale_dtype)
    wf = w.float()
    if wf.numel() and not bool(torch.isfinite(wf).all()):
        raise QuantMismatchError(tensor="fp8_block input", expected="finite values", found="nan or inf",
                                 hint="fix the source weights before quantizing")
    amax = _block_amax(wf)
    nonzero = amax > 0
    if scale_dtype == "e8m0":
        # smallest k with amax <= 448 * 2^k, exactly: 448 = 7 * 2^6 and x/7 is rounded, so check and bump once
        k = pow2_exponent_ceil(torch.where(nonzero, amax / FP8_MAX, torch.ones_like(amax)))
        k = torch.where(torch.ldexp(torch.full_like(amax, FP8_MAX), k) < amax, k + 1, k)
        scale_store = exponent_to_e8m0(k, name="fp8_block scale")
    else:
        target = _SCALE_DTYPE_BY_NAME[scale_dtype]
        exact = torch.where(nonzero, amax / FP8_MAX, torch.ones_like(amax))
        scale_store = exact.to(target)
        up = torch.nextafter(scale_store, torch.full_like(scale_store, float("inf")))
        scale_store = torch.where(scale_store.float() < exact, up, scale_store)
    scale = _expand(scale_to_float(scale_store), *wf.shape)
    # |w / scale| <= 448 by construction; the clamp only guards the f32 rounding of amax / 448
    q = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "scale": scale_store}
