"""Decide a module's quant scheme from the tensors on disk (checkpoint-formats.md section 6.9).

Never from file names, config flags or one global switch: the suffixes present, their dtypes and shapes
decide, per module. The result maps each canonical role to the on-disk suffix that fills it.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Mapping

from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError

__all__ = ["ModuleQuant", "TensorMeta", "classify_module", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
_BLOCK = 128          # DeepSeek / compressed-tensors FP8 block (weight_block_size [128, 128])


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What the header says about one tensor (and which file holds it, for messages)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str = ""


@dataclass(frozen=True)
class ModuleQuant:
    """Detected scheme of one module; ``roles`` maps canonical role -> on-disk suffix."""

    scheme: str
    variant: str
    roles: Mapping[str, str]


def _need(cond: bool, t: TensorMeta, expected: str, found: object, cls: type = TensorShapeError) -> None:
    if not cond:
        raise cls(file=t.file or None, tensor=t.name, expected=expected, found=found)


def classify_module(module: str, tensors: Mapping[str, TensorMeta], out_f: int, in_f: int) -> ModuleQuant:
    """Scheme of ``module`` (logical ``[out_f, in_f]``) from its on-disk tensors keyed by suffix."""
    t = dict(tensors)
    anchor = t.get("weight") or t.get("weight_packed") or next(iter(t.values()), None)
    if anchor is None:
        raise QuantMismatchError(tensor=module, hint="no tensors")
    if "weight" not in t and "weight_packed" not in t:
        raise QuantMismatchError(file=anchor.file or None, tensor=anchor.name, expected=f"{module}.weight or "
                                 f"{module}.weight_packed next to it", found="a quant companion without its weight")
    if "weight_packed" in t:
        q = _packed(module, t, out_f, in_f)
    else:
        q = _plain(module, t, out_f, in_f)
    extra = sorted(set(t) - set(q.roles.values()))
    if extra:
        x = t[extra[0]]
        raise QuantMismatchError(file=x.file or None, tensor=x.name, expected=f"only the companions of {q.scheme}"
                                 f" ({', '.join(sorted(q.roles.values()))})", found=f"extra {', '.join(extra)}")
    return q


def _plain(module: str, t: dict[str, TensorMeta], out_f: int, in_f: int) -> ModuleQuant:
    w = t["weight"]
    scale_sfx = [s for s in ("scale", "weight_scale_inv", "weight_scale") if s in t]
    if w.dtype in FLOAT_DTYPES:
        _need(w.shape == (out_f, in_f), w, f"shape {[out_f, in_f]}", list(w.shape))
        return ModuleQuant("bf16", "", {"weight": "weight"})
    if w.dtype == "F8_E4M3":
        if not scale_sfx:
            raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"an FP8 scale companion "
                                     f"({module}.scale, .weight_scale_inv or .weight_scale)", found="none",
                                     hint="an FP8 weight without its scale cannot be decoded")
        s = t[scale_sfx[0]]
        _need(w.shape == (out_f, in_f), w, f"shape {[out_f, in_f]}", list(w.shape))
        want = (ceil(out_f / _BLOCK), ceil(in_f / _BLOCK))
        _need(s.dtype in {"F8_E8M0", "F32", "BF16", "F16"}, s, "F8_E8M0, F32 or BF16 block scales", s.dtype,
              TensorDtypeError)
        _need(s.shape == want, s, f"128x128 block scales of shape {list(want)} (per-channel/per-tensor FP8 is "
              "not supported)", list(s.shape))
        variant = "deepseek" if scale_sfx[0] == "scale" else (
            "hf-fp8" if scale_sfx[0] == "weight_scale_inv" else "compressed-tensors")
        return ModuleQuant("fp8_block", variant, {"weight": "weight", "scale": scale_sfx[0]})
    if w.dtype in ("I8", "U8"):
        _need(w.shape == (out_f, in_f // 2) and in_f % 2 == 0, w, f"packed FP4 shape {[out_f, in_f // 2]}",
              list(w.shape))
        if "weight_scale_2" in t or ("weight_scale" in t and t["weight_scale"].dtype == "F8_E4M3"):
            return _nvfp4(module, t, out_f, in_f, "weight", "modelopt")
        sfx = "scale" if "scale" in t else ("weight_scale" if "weight_scale" in t else None)
        if sfx is None:
            raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"an FP4 scale companion "
                                     f"({module}.scale)", found="none", hint="packed FP4 weights need their scales")
        return _mxfp4(t, out_f, in_f, "weight", sfx, "deepseek")
    raise TensorDtypeError(file=w.file or None, tensor=w.name, expected="a float, F8_E4M3, I8 or U8 weight",
                           found=w.dtype)


def _packed(module: str, t: dict[str, TensorMeta], out_f: int, in_f: int) -> ModuleQuant:
    w = t["weight_packed"]
    if "weight_scale" not in t:
        raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"{module}.weight_scale", found="none",
                                 hint="compressed-tensors packed weights need their scales")
    if w.dtype == "I32":
        cols = ceil(in_f * 4 / 32)
        _need(w.shape == (out_f, cols), w, f"int4 pack-quantized shape {[out_f, cols]}", list(w.shape))
        s = t["weight_scale"]
        _need(len(s.shape) == 2 and s.shape[0] == out_f and s.shape[1] > 0 and in_f % s.shape[1] == 0, s,
              f"group scales [{out_f}, {in_f}/group]", list(s.shape))
        roles = {r: r for r in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if r in t}
        return ModuleQuant("w4a16", "compressed-tensors", roles)
    _need(w.dtype == "U8", w, "U8 (FP4) or I32 (int4) packed weights", w.dtype, TensorDtypeError)
    _need(w.shape == (out_f, in_f // 2), w, f"packed FP4 shape {[out_f, in_f // 2]}", list(w.shape))
    if t["weight_scale"].dtype == "F8_E4M3":
        return _nvfp4(module, t, out_f, in_f, "weight_packed", "compressed-tensors")
    return _mxfp4(t, out_f, in_f, "weight_packed", "weight_scale", "compressed-tensors")


def _mxfp4(t: dict[str, TensorMeta], out_f: int, in_f: int, w_sfx: str, s_sfx: str, variant: str) -> ModuleQuant:
    s = t[s_sfx]
    _need(s.dtype in ("F8_E8M0", "U8"), s, "F8_E8M0 (or U8 biased exponent) per-32 scales", s.dtype, TensorDtypeError)
    _need(s.shape == (out_f, in_f // 32) and in_f % 32 == 0, s, f"per-32 scales {[out_f, in_f // 32]}", list(s.shape))
    return ModuleQuant("mxfp4", variant, {"weight": w_sfx, "scale": s_sfx})


def _nvfp4(module: str, t: dict[str, TensorMeta], out_f: int, in_f: int, w_sfx: str, variant: str) -> ModuleQuant:
    s = t.get("weight_scale")
    anchor = t[w_sfx]
    if s is None:
        raise QuantMismatchError(file=anchor.file or None, tensor=anchor.name, expected=f"{module}.weight_scale",
                                 found="none", hint="NVFP4 weights need per-16 E4M3 scales")
    _need(s.dtype == "F8_E4M3", s, "F8_E4M3 per-16 scales", s.dtype, TensorDtypeError)
    _need(s.shape == (out_f, in_f // 16) and in_f % 16 == 0, s, f"per-16 scales {[out_f, in_f // 16]}", list(s.shape))
    glob = [g for g in ("weight_global_scale", "weight_scale_2") if g in t]
    if len(glob) != 1:
        raise QuantMismatchError(file=anchor.file or None, tensor=anchor.name,
                                 expected="exactly one of weight_global_scale / weight_scale_2", found=glob or "none")
    g = t[glob[0]]
    _need(g.dtype == "F32" and len(g.shape) <= 1 and (not g.shape or g.shape[0] == 1), g, "an F32 scalar", 
          f"{g.dtype} {list(g.shape)}")
    roles = {"weight": w_sfx, "weight_scale": "weight_scale", glob[0]: glob[0]}
    for r in ("input_global_scale", "input_scale"):
        if r in t:
            roles[r] = r
    return ModuleQuant("nvfp4", variant, roles)
