"""E2M1 (FP4) element codes and their packing, shared by mxfp4 and nvfp4.

A code is 4 bits: bit 3 is the sign, bits 0-2 index ``E2M1_GRID`` (OCP MX spec v1.0, section 5.3.3).
Two codes share a byte, the **low nibble holding the even (first) column** (``docs/checkpoint-formats.md §6.2/§6.3``;
compressed-tensors ``pack_fp4_to_uint8``; transformers ``Fp8Dequantize._unpack_fp4``).
"""
from __future__ import annotations

from typing import Final

import torch

from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError

__all__ = ["E2M1_GRID", "E2M1_MAX", "e2m1_decode", "e2m1_encode", "pack_fp4", "unpack_fp4", "unpack_fp4_values"]

E2M1_GRID: Final[tuple[float, ...]] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX spec table 5
E2M1_MAX: Final[float] = 6.0
# Midpoints between neighbours of E2M1_GRID; a tie goes to the even code (IEEE round-half-to-even, the same
# rule as compressed-tensors' FP4_E2M1_DATA.cast_to_fp4), so 0.25->0, 0.75->1, 1.25->1, 2.5->2, 5->4.
_MIDPOINTS: Final[tuple[float, ...]] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_PACKED_DTYPES = (torch.uint8, torch.int8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Codes (integers 0..15, any int dtype) to float32 values; code 8 is ``-0.0``."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest e2m1 code (ties to even, saturating at +-6); uint8 codes 0..15.

    The sign bit follows ``signbit`` (so ``-0.1`` becomes code 8, ``-0.0``), as compressed-tensors does.
    """
    xf = x.float()
    if xf.numel() and not bool(torch.isfinite(xf).all()):
        raise QuantMismatchError(tensor="fp4 input", expected="finite values", found="nan or inf",
                                 hint="fix the source weights before quantizing")
    a = xf.abs()
    idx = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i, m in enumerate(_MIDPOINTS):
        # midpoint i sits between codes i and i+1; the tie goes to whichever of the two is even
        idx += (a > m) if i % 2 == 0 else (a >= m)
    return idx | (torch.signbit(xf).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., n]`` (n even) into bytes ``[..., n/2]``: column ``2j`` low nibble, ``2j+1`` high."""
    if codes.shape[-1] % 2:
        raise TensorShapeError(tensor="fp4 codes", expected="an even number of columns", found=tuple(codes.shape))
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., n/2]`` (uint8, or int8 as DeepSeek stores them: same bits) to codes ``[..., n]`` uint8."""
    if packed.dtype not in _PACKED_DTYPES:
        raise TensorDtypeError(tensor="fp4 weight", expected="uint8 or int8", found=packed.dtype,
                               hint="two e2m1 codes per byte are stored as U8 or I8")
    b = packed.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def unpack_fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., n/2]`` to float32 e2m1 values ``[..., n]`` (unscaled)."""
    return e2m1_decode(unpack_fp4(packed))
