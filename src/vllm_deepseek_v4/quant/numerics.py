"""Decode and encode every quant scheme by name: the one entry point the loader, the tests and the zoo use.

``dequantize(scheme, parts, out, in)`` checks the role set against the scheme's record (``quant/scheme.py``)
before the format module checks dtypes and shapes; ``quantize(scheme, w, **opts)``
returns the canonical roles in their on-disk dtypes. The formulas live in one module per format.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, Final

import torch

from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError
from . import fp8_block, mxfp4, nvfp4, w4a16
from ._parts import role_name
from .e8m0 import e8m0_to_float, float_to_e8m0
from .fp4 import e2m1_decode, e2m1_encode, pack_fp4, unpack_fp4, unpack_fp4_values
from .scheme import SCHEMES

__all__ = [
    "dequantize", "quantize", "check_roles",
    "e8m0_to_float", "float_to_e8m0", "e2m1_decode", "e2m1_encode", "pack_fp4", "unpack_fp4", "unpack_fp4_values",
]


# scheme -> module with dequantize(parts, out, in, dtype, *, name) and quantize(w, **opts); bf16 is inline
_FORMATS: Final[dict[str, ModuleType]] = {"fp8_block": fp8_block, "mxfp4": mxfp4, "nvfp4": nvfp4, "w4a16": w4a16}


def _check_scheme(scheme: str, *, name: str | None) -> None:
    if scheme not in SCHEMES:
        raise QuantMismatchError(tensor=name or "quant scheme", expected=" | ".join(SCHEMES), found=repr(scheme),
                                 hint="the scheme comes from quant detection; this one has no decoder")


def check_roles(scheme: str, parts: Mapping[str, torch.Tensor], *, name: str | None = None) -> None:
    """Every required role of ``scheme`` present and nothing outside required + optional."""
    _check_scheme(scheme, name=name)
    have, record = set(parts), SCHEMES[scheme]
    missing = sorted(record.required - have)
    unexpected = sorted(have - record.allowed)
    if missing:
        raise QuantMismatchError(tensor=role_name(name, missing[0]), expected=f"{scheme} roles "
                                 f"{sorted(record.required)}", found=f"roles {sorted(have)}",
                                 hint=f"missing {missing}: a {scheme} weight cannot be decoded without them")
    if unexpected:
        allowed = sorted(record.allowed)
        raise QuantMismatchError(tensor=role_name(name, unexpected[0]), expected=f"{scheme} roles {allowed}",
                                 found=f"roles {sorted(have)}",
                                 hint=f"unexpected {unexpected}: the module was probably detected as the wrong scheme")


def dequantize(scheme: str, parts: Mapping[str, torch.Tensor], out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32, *, name: str | None = None) -> torch.Tensor:
    """The logical weight ``[out, in]`` in ``dtype`` from a module's canonical roles (``name`` goes into errors)."""
    check_roles(scheme, parts, name=name)
    if scheme == "bf16":
        w = parts["weight"]
        if not w.is_floating_point() or w.dtype.itemsize < 2:
            raise TensorDtypeError(tensor=role_name(name, "weight"), expected="bfloat16 | float16 | float32",
                                   found=w.dtype, hint="a quantized weight needs its scheme's scales to decode")
        if tuple(w.shape) != (out_features, in_features):
            raise TensorShapeError(tensor=role_name(name, "weight"), expected=[out_features, in_features],
                                   found=list(w.shape), hint="an unquantized weight is [out, in]")
        return w.to(dtype)
    out: torch.Tensor = _FORMATS[scheme].dequantize(parts, out_features, in_features, dtype, name=name)
    return out


def quantize(scheme: str, w: torch.Tensor, **opts: Any) -> dict[str, torch.Tensor]:
    """Canonical roles of ``scheme`` for the float weight ``w [out, in]``; ``opts`` go to the format's quantize
    (``bf16`` takes ``dtype``, default bfloat16)."""
    _check_scheme(scheme, name=None)
    if scheme == "bf16":
        dtype = opts.pop("dtype", torch.bfloat16)
        if opts:
            raise QuantMismatchError(tensor="bf16 options", expected="only dtype", found=sorted(opts))
        return {"weight": w.to(dtype, copy=True)}
    parts: dict[str, torch.Tensor] = _FORMATS[scheme].quantize(w, **opts)
    return parts
