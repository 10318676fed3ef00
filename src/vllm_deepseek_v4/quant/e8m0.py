"""E8M0 (UE8M0) power-of-two scales: decode from the raw byte, encode exactly.

An e8m0 byte ``e`` means ``2^(e-127)``; ``255`` is NaN (OCP Microscaling spec v1.0, section 5.4.1;
``docs/checkpoint-formats.md §6.1``). Decoding always goes through the byte (``view(torch.uint8)``), never a numeric
cast: a numeric copy of an e8m0 tensor into another float parameter has zeroed small scales in vLLM
(``docs/checkpoint-formats.md §6.1``), and the byte path is exact on every device.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import QuantMismatchError, TensorDtypeError

__all__ = ["E8M0_BIAS", "E8M0_NAN", "e8m0_to_float", "exponent_to_e8m0", "float_to_e8m0", "pow2_exponent_ceil"]

E8M0_BIAS = 127  # OCP MX spec: scale = 2^(byte - 127)
E8M0_NAN = 255   # OCP MX spec: the one NaN encoding; there is no zero and no infinity
_E8M0_DTYPES = (torch.float8_e8m0fnu, torch.uint8)


def e8m0_to_float(t: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """Decode e8m0 scales (``float8_e8m0fnu``, or ``uint8`` biased exponents) to float32 ``2^(e-127)``.

    Byte 0 decodes to ``2^-127`` (a float32 subnormal), byte 255 to NaN.
    """
    if t.dtype not in _E8M0_DTYPES:
        raise TensorDtypeError(tensor=name or "e8m0 scale", expected="float8_e8m0fnu or uint8", found=t.dtype,
                               hint="float scales are multipliers already; call .float() on them instead")
    e = t.view(torch.uint8).to(torch.int32)
    out = torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e - E8M0_BIAS)
    return torch.where(e == E8M0_NAN, torch.full_like(out, float("nan")), out)


def exponent_to_e8m0(k: torch.Tensor, *, dtype: torch.dtype = torch.float8_e8m0fnu,
                     name: str | None = None) -> torch.Tensor:
    """Encode integer exponents ``k`` (scale ``2^k``, ``-127 <= k <= 127``) as e8m0 bytes of ``dtype``."""
    if dtype not in _E8M0_DTYPES:
        raise TensorDtypeError(tensor=name or "e8m0 scale", expected="float8_e8m0fnu or uint8", found=dtype)
    k = k.to(torch.int32)
    if k.numel() and (int(k.min()) < -E8M0_BIAS or int(k.max()) > E8M0_NAN - 1 - E8M0_BIAS):
        raise QuantMismatchError(tensor=name or "e8m0 scale", expected="exponents in [-127, 127]",
                                 found=f"[{int(k.min())}, {int(k.max())}]",
                                 hint="the weights are too small or too large for a power-of-two scale")
    byte = (k + E8M0_BIAS).to(torch.uint8)
    return byte if dtype == torch.uint8 else byte.view(torch.float8_e8m0fnu)


def pow2_exponent_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest integer ``k`` with ``x <= 2^k``, exactly (via ``frexp``, no ``log2`` rounding); int32.

    ``x`` must be positive and finite.
    """
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^E, 0.5 <= m < 1
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


def float_to_e8m0(t: torch.Tensor, *, rounding: Literal["up", "exact"] = "up",
                  dtype: torch.dtype = torch.float8_e8m0fnu, name: str | None = None) -> torch.Tensor:
    """Encode positive float scales as e8m0: the power of two at or above each value (``"up"``, so a
    quantizer dividing by it never overflows), or only exact powers of two (``"exact"``, else an error)."""
    x = t.float()
    if x.numel() and not bool(torch.isfinite(x).all() and (x > 0).all()):
        raise QuantMismatchError(tensor=name or "e8m0 scale", expected="positive finite scales",
                                 found="zero, negative or non-finite",
                                 hint="e8m0 has no zero; give all-zero blocks a scale of 1.0")
    k = pow2_exponent_ceil(x)
    if rounding == "exact":
        exact = torch.ldexp(torch.ones_like(x), k) == x
        if not bool(exact.all()):
            bad = x[~exact][0].item()
            raise QuantMismatchError(tensor=name or "e8m0 scale", expected="powers of two", found=bad,
                                     hint='use rounding="up" to round scales up to the next power of two')
    elif rounding != "up":
        raise ValueError(f'rounding must be "up" or "exact", got {rounding!r}')
    return exponent_to_e8m0(k, dtype=dtype, name=name)
