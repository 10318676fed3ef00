"""NVFP4: e2m1 weights, one e4m3 scale per 16 input columns, one float32 global scale
(``docs/checkpoint-formats.md §6.3, §6.7``).

Two producers store the global scale inversely:

- compressed-tensors ``weight_global_scale`` (a divisor): ``W = fp4 * (weight_scale.float() / weight_global_scale)``;
- ModelOpt ``weight_scale_2`` (a multiplier, ``= 1 / weight_global_scale``): ``W = fp4 * weight_scale.float() *
  weight_scale_2``.

The operation order of each formula is kept, so results match those producers' own dequantization bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import torch

from ..errors import QuantMismatchError, TensorShapeError
from ._parts import role_name, take
from .fp4 import E2M1_MAX, e2m1_encode, pack_fp4, unpack_fp4_values
from .scheme import SCHEMES

__all__ = ["E4M3_MAX", "GROUP", "dequantize", "global_scale", "quantize"]

_S = SCHEMES["nvfp4"]
GROUP: Final[int] = _S.block_in  # NVFP4: 16 elements per e4m3 scale (compressed-tensors NVFP4 preset group_size=16)
E4M3_MAX: Final[float] = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# compressed-tensors _get_dtype_eps(float8_e4m3fn): the local scale used where the rounded one is zero
_ZERO_SCALE_EPS: Final[float] = 0.125
_GLOBALS: Final[tuple[str, ...]] = tuple(role for role, _ in _S.globals)


def _scalar(parts: Mapping[str, torch.Tensor], role: str, *, name: str | None) -> torch.Tensor:
    """A one-element float32 role as a 0-d tensor; ``[1]`` is squeezed (vllm-project/vllm#43297)."""
    t = take(parts, role, scheme=_S.name, name=name, shape=None)
    if t.numel() != 1:
        raise TensorShapeError(tensor=role_name(name, role), expected="one element ([] or [1])",
                               found=list(t.shape), hint="NVFP4 keeps one global scale per module")
    return t.reshape(())


def _check_in_features(in_features: int, *, name: str | None) -> None:
    if in_features % GROUP:
        raise TensorShapeError(tensor=name or "nvfp4 weight", expected=f"in_features a multiple of {GROUP}",
                               found=in_features, hint="NVFP4 keeps one scale per 16 input columns")


def dequantize(parts: Mapping[str, torch.Tensor], out_features: int, in_features: int,
               dtype: torch.dtype = torch.float32, *, name: str | None = None) -> torch.Tensor:
    """Roles ``weight`` U8 (or I8, same bits) ``[out, in/2]``, ``weight_scale`` e4m3 ``[out, in/16]`` and exactly one of
    ``weight_global_scale`` / ``weight_scale_2`` to ``[out, in]``; computed in float32, cast once."""
    _check_in_features(in_features, name=name)
    present = [g for g in _GLOBALS if g in parts]
    if len(present) != 1:
        raise QuantMismatchError(tensor=role_name(name, "weight_global_scale"),
                                 expected="exactly one of weight_global_scale, weight_scale_2",
                                 found=present or "neither",
                                 hint="compressed-tensors stores the divisor, ModelOpt its inverse; never both")
    w = take(parts, "weight", scheme=_S.name, name=name, shape=_S.shape("weight", out_features, in_features))
    s = take(parts, "weight_scale", scheme=_S.name, name=name,
             shape=_S.shape("weight_scale", out_features, in_features))
    values = unpack_fp4_values(w)  # [out, in]
    local = s.float().repeat_interleave(GROUP, dim=1)
    g = _scalar(parts, present[0], name=name)
    if _S.global_op(present[0]) == "divide":     # compressed-tensors
        out = values * (local / g)
    else:                                         # ModelOpt
        out = values * local * g
    return out.to(dtype)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``448 * 6 / amax`` as float32 (compressed-tensors ``generate_gparam``); ``amax == 0`` gives 1."""
    a = amax.float()
    g = (E4M3_MAX * E2M1_MAX) / a
    return torch.where(a > 0, g, torch.ones_like(g))


def quantize(w: torch.Tensor, *, flavor: Literal["compressed-tensors", "modelopt"] = "compressed-tensors",
             with_input_scale: bool = False, input_amax: float = E4M3_MAX * E2M1_MAX) -> dict[str, torch.Tensor]:
    """``w [out, in]`` to NVFP4 roles of ``flavor``, following compressed-tensors' recipe.

    ``global = 448*6/amax(W)``; stored local ``e4m3((amax_group / 6) * global)`` (0 becomes 0.125); codes
    ``e2m1(w / (local / global))``. ModelOpt stores ``weight_scale_2 = 1 / global``. ``with_input_scale`` adds
    the static activation scale from ``input_amax`` (uncalibrated; the default gives a global scale of 1).
    """
    if flavor not in ("compressed-tensors", "modelopt"):
        raise QuantMismatchError(tensor="nvfp4 flavor", expected="compressed-tensors | modelopt", found=flavor)
    if w.ndim != 2:
        raise TensorShapeError(tensor="nvfp4 input", expected="a 2-D [out, in] weight", found=list(w.shape))
    out_features, in_features = w.shape
    _check_in_features(in_features, name="nvfp4 input")
    wf = w.float()
    if wf.numel() and not bool(torch.isfinite(wf).all()):
        raise QuantMismatchError(tensor="nvfp4 input", expected="finite values", found="nan or inf",
                                 hint="fix the source weights before quantizing")
    g = global_scale(wf.abs().amax() if wf.numel() else torch.zeros(()))
    groups = wf.reshape(out_features, in_features // GROUP, GROUP)
    local = ((groups.abs().amax(dim=-1) / E2M1_MAX) * g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    local_f = local.float()
    local_f = torch.where(local_f == 0, torch.full_like(local_f, _ZERO_SCALE_EPS), local_f)
    local = local_f.to(torch.float8_e4m3fn)  # 0.125 is exact in e4m3
    effective = (local_f / g).unsqueeze(-1)  # [out, in/16, 1]
    codes = e2m1_encode((groups / effective).clamp(-E2M1_MAX, E2M1_MAX).reshape(out_features, in_features))
    out = {"weight": pack_fp4(codes), "weight_scale": local}
    input_global = torch.tensor((E4M3_MAX * E2M1_MAX) / input_amax, dtype=torch.float32)
    if flavor == "compressed-tensors":
        out["weight_global_scale"] = g.reshape(1)
        if with_input_scale:
            out["input_global_scale"] = input_global.reshape(1)
    else:
        out["weight_scale_2"] = (1.0 / g).reshape(())
        if with_input_scale:
            out["input_scale"] = (1.0 / input_global).reshape(())
    return out
