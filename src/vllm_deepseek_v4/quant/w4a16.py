"""W4A16: compressed-tensors ``pack-quantized`` int4 weights with group scales (``docs/checkpoint-formats.md §6.6``).

Values are stored offset-coded (``q + 8``, 0..15), eight per int32, the first in bits 0-3; rows are padded
to a multiple of 8 columns (compressed-tensors ``pack_to_int32``). Symmetric: ``W = (nibble - 8) * scale``.
Asymmetric: ``weight_zero_point`` holds int4 zero points packed the same way but along ``out``
(``[ceil(out/8), groups]``), and ``W = (q - zp) * scale``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import torch

from ..errors import QuantMismatchError, TensorShapeError
from ._parts import cdiv, role_dtypes, role_name, take
from .scheme import SCHEMES

__all__ = ["DEFAULT_GROUP_SIZE", "PACK", "dequantize", "pack_int4", "quantize", "unpack_int4"]

_S = SCHEMES["w4a16"]
PACK: Final[int] = _S.pack  # 32 bits / 4 bits per value
OFFSET: Final[int] = 8  # int4 q in [-8, 7] is stored as q + 8
DEFAULT_GROUP_SIZE: Final[int] = _S.block_in  # canada-quant W4A16-FP8-MTP experts (docs/checkpoint-formats.md §6.6)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values ``[rows, n]`` (-8..7, any int dtype) to int32 ``[rows, ceil(n/8)]``; value ``8c+i``
    goes to bits ``4i..4i+3`` of word ``c`` as ``q + 8``; padding columns hold 0."""
    rows, n = q.shape
    u = (q.to(torch.int64) + OFFSET)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise QuantMismatchError(tensor="int4 values", expected="integers in [-8, 7]",
                                 found=f"[{int(u.min()) - OFFSET}, {int(u.max()) - OFFSET}]")
    u = torch.nn.functional.pad(u, (0, cdiv(n, PACK) * PACK - n)).reshape(rows, -1, PACK)
    shifts = torch.arange(PACK, dtype=torch.int64, device=q.device) * 4
    word = (u << shifts).sum(dim=-1)  # 0 .. 2^32-1
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # two's complement reinterpretation


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[rows, ceil(n/8)]`` to signed int4 values ``[rows, n]`` as int8 (the padding is dropped)."""
    shifts = torch.arange(PACK, dtype=torch.int32, device=packed.device) * 4
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then masked: sign bits never leak
    return (nibbles.flatten(-2)[:, :n] - OFFSET).to(torch.int8)


def dequantize(parts: Mapping[str, torch.Tensor], out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32, *, name: str | None = None) -> torch.Tensor:
    """Roles ``weight_packed`` I32 ``[out, ceil(in/8)]``, ``weight_scale`` ``[out, in/group]``, optional
    ``weight_shape`` I64 ``[2]`` and ``weight_zero_point`` to ``[out, in]``; exact in float32, cast once.

    The group size is ``in / weight_scale.shape[1]`` (one group is per-channel).
    """
    packed = take(parts, "weight_packed", scheme=_S.name, name=name,
                  shape=_S.shape("weight_packed", out_features, in_features))
    scale = take(parts, "weight_scale", scheme=_S.name, name=name, shape=None)
    groups = scale.shape[1] if scale.ndim == 2 else 0
    if scale.ndim != 2 or scale.shape[0] != out_features or groups == 0 or in_features % groups:
        raise TensorShapeError(tensor=role_name(name, "weight_scale"), expected=f"[{out_features}, in/group]",
                               found=list(scale.shape), hint=f"in_features {in_features} must split into whole groups")
    if "weight_shape" in parts:
        shape = take(parts, "weight_shape", scheme=_S.name, name=name,
                     shape=_S.shape("weight_shape", out_features, in_features))
        if shape.tolist() != [out_features, in_features]:
            raise TensorShapeError(tensor=role_name(name, "weight_shape"), expected=[out_features, in_features],
                                   found=shape.tolist(), hint="the stored logical shape disagrees with the config")
    q = unpack_int4(packed, in_features).float()
    group_size = in_features // groups
    if "weight_zero_point" in parts:
        zp_packed = take(parts, "weight_zero_point", scheme=_S.name, name=name,
                         shape=_S.shape("weight_zero_point", out_features, in_features, group=group_size))
        zp = unpack_int4(zp_packed.T, out_features).T.float()  # packed along out: [out, groups]
        q = q - zp.repeat_interleave(group_size, dim=1)
    return (q * scale.float().repeat_interleave(group_size, dim=1)).to(dtype)


def quantize(w: torch.Tensor, *, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``w [out, in]`` to ``weight_packed``, ``weight_scale`` (``scale_dtype``), ``weight_shape`` and, when
    not ``symmetric``, ``weight_zero_point``; compressed-tensors' recipe.

    Symmetric: ``scale = amax / 7.5`` (the int4 range -8..7 spans 15 steps), ``q = clamp(round(w / scale), -8, 7)``.
    Asymmetric: ``scale = (max - min) / 15`` with ``min <= 0 <= max``, ``zp = clamp(round(-8 - min / scale))``.
    Rounding is half to even (``torch.round``); zero scales become 1.
    """
    if w.ndim != 2:
        raise TensorShapeError(tensor="w4a16 input", expected="a 2-D [out, in] weight", found=list(w.shape))
    out_features, in_features = w.shape
    if group_size <= 0 or in_features % group_size:
        raise TensorShapeError(tensor="w4a16 input", expected=f"in_features a multiple of group_size {group_size}",
                               found=in_features, hint="pick a group size that divides in_features")
    scale_dtypes = role_dtypes(_S.name, "weight_scale")
    if scale_dtype not in scale_dtypes:
        names = " | ".join(str(d).removeprefix("torch.") for d in scale_dtypes)
        raise QuantMismatchError(tensor="w4a16 scale_dtype", expected=names, found=scale_dtype)
    wf = w.float()
    if wf.numel() and not bool(torch.isfinite(wf).all()):
        raise QuantMismatchError(tensor="w4a16 input", expected="finite values", found="nan or inf",
                                 hint="fix the source weights before quantizing")
    groups = wf.reshape(out_features, in_features // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / 7.5
    else:
        scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    s = scale.float().unsqueeze(-1)
    out: dict[str, torch.Tensor] = {}
    if symmetric:
        q = torch.round(groups / s).clamp(-OFFSET, OFFSET - 1)
    else:
        zp = torch.round(-OFFSET - lo / scale.float()).clamp(-OFFSET, OFFSET - 1)  # [out, groups]
        q = torch.round(groups / s + zp.unsqueeze(-1)).clamp(-OFFSET, OFFSET - 1)  # stored with zp folded in
        out["weight_zero_point"] = pack_int4(zp.to(torch.int8).T).T.contiguous()
    out["weight_packed"] = pack_int4(q.reshape(out_features, in_features).to(torch.int8))
    out["weight_scale"] = scale
    out["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64)
    return {k: out[k] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if k in out}
