"""MXFP4: e2m1 weights with one power-of-two scale per 32 input columns (``docs/checkpoint-formats.md §6.2, §6.5``).

``W[i, j] = E2M1[code(i, j)] * 2^(e[i, j // 32] - 127)``. DeepSeek's native FP4 experts store the codes as
int8 and the scales as ``float8_e8m0fnu``; compressed-tensors ``mxfp4-pack-quantized`` stores uint8 and uint8
biased exponents. Both hold the same bits.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import torch

from ..errors import QuantMismatchError, TensorShapeError
from ._parts import take
from .e8m0 import e8m0_to_float, exponent_to_e8m0, pow2_exponent_ceil
from .fp4 import E2M1_MAX, e2m1_encode, pack_fp4, unpack_fp4_values
from .scheme import SCHEMES

__all__ = ["GROUP", "dequantize", "quantize"]

_S = SCHEMES["mxfp4"]
GROUP: Final[int] = _S.block_in  # OCP MX spec v1.0: k = 32 elements share one scale; DeepSeek scale is [out, in/32]
_FLAVORS: Final[dict[str, tuple[torch.dtype, torch.dtype]]] = {  # flavor -> (weight dtype, scale dtype)
    "deepseek": (torch.int8, torch.float8_e8m0fnu),
    "compressed-tensors": (torch.uint8, torch.uint8),
}


def _check_in_features(in_features: int, *, name: str | None) -> None:
    if in_features % GROUP:
        raise TensorShapeError(tensor=name or "mxfp4 weight", expected=f"in_features a multiple of {GROUP}",
                               found=in_features, hint="MXFP4 keeps one scale per 32 input columns")


def dequantize(parts: Mapping[str, torch.Tensor], out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32, *, name: str | None = None) -> torch.Tensor:
    """Roles ``weight`` I8|U8 ``[out, in/2]`` and ``scale`` E8M0|U8 ``[out, in/32]`` to ``[out, in]``.

    Exact in float32 (an e2m1 value times a power of two), then cast once to ``dtype``.
    """
    _check_in_features(in_features, name=name)
    w = take(parts, "weight", scheme=_S.name, name=name, shape=_S.shape("weight", out_features, in_features))
    s = take(parts, "scale", scheme=_S.name, name=name, shape=_S.shape("scale", out_features, in_features))
    scale = e8m0_to_float(s, name=f"{name}.scale" if name else "scale").repeat_interleave(GROUP, dim=1)
    return (unpack_fp4_values(w) * scale).to(dtype)


def quantize(w: torch.Tensor, *, flavor: Literal["deepseek", "compressed-tensors"] = "deepseek"
             ) -> dict[str, torch.Tensor]:
    """``w [out, in]`` to ``{"weight": [out, in/2], "scale": [out, in/32]}`` in the dtypes of ``flavor``.

    Each group's scale is the smallest power of two with ``amax / scale <= 6``, so nothing saturates; values
    round to the nearest e2m1 with ties to even. All-zero groups get scale 1.
    """
    if flavor not in _FLAVORS:
        raise QuantMismatchError(tensor="mxfp4 flavor", expected=" | ".join(_FLAVORS), found=flavor)
    if w.ndim != 2:
        raise TensorShapeError(tensor="mxfp4 input", expected="a 2-D [out, in] weight", found=list(w.shape))
    out_features, in_features = w.shape
    _check_in_features(in_features, name="mxfp4 input")
    weight_dtype, scale_dtype = _FLAVORS[flavor]
    wf = w.float()
    groups = wf.reshape(out_features, in_features // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)  # [out, in/32]
    nonzero = amax > 0
    # smallest k with amax <= 6 * 2^k; amax / 6 is rounded, so check exactly and bump once
    k = pow2_exponent_ceil(torch.where(nonzero, amax / E2M1_MAX, torch.ones_like(amax)))
    k = torch.where(torch.ldexp(torch.full_like(amax, E2M1_MAX), k) < amax, k + 1, k)
    codes = e2m1_encode(torch.ldexp(groups, -k.unsqueeze(-1)).reshape(out_features, in_features))
    return {"weight": pack_fp4(codes).view(weight_dtype),
            "scale": exponent_to_e8m0(k, dtype=scale_dtype, name="mxfp4 scale")}
