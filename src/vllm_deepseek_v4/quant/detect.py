"""Decide a module's quant scheme from the tensors on disk (``docs/checkpoint-formats.md §6.9``).

Never from file names, config flags or one global switch: the suffixes present, their dtypes and shapes
decide, per module. The result maps each canonical role to the on-disk suffix that fills it. Dtypes, block
sizes and role shapes come from the formats' :class:`~.scheme.Scheme` records; this module only decides
which record the tensors match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError
from .scheme import GLOBAL, SCHEMES

__all__ = ["ModuleQuant", "TensorMeta", "classify_module", "FLOAT_DTYPES"]

_BF16, _FP8, _MX, _NV, _W4 = (SCHEMES[n] for n in ("bf16", "fp8_block", "mxfp4", "nvfp4", "w4a16"))
FLOAT_DTYPES = frozenset(_BF16.role("weight").dtypes)
_FP4_BYTES = frozenset(_MX.role("weight").dtypes) | frozenset(_NV.role("weight").dtypes)
_CT_FP4 = "U8"        # compressed-tensors' fp4 ``weight_packed`` (I32 there is int4: w4a16)
# which producer spells the FP8 scale how (§6.1, §6.9)
_FP8_VARIANT = {"scale": "deepseek", "weight_scale_inv": "hf-fp8", "weight_scale": "compressed-tensors"}


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
    scale_sfx = [s for s in _FP8.role("scale").suffixes if s in t]
    if w.dtype in FLOAT_DTYPES:
        _need(w.shape == (out_f, in_f), w, f"shape {[out_f, in_f]}", list(w.shape))
        return ModuleQuant("bf16", "", {"weight": "weight"})
    if w.dtype in _FP8.role("weight").dtypes:
        if not scale_sfx:
            raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"an FP8 scale companion "
                                     f"({module}.scale, .weight_scale_inv or .weight_scale)", found="none",
                                     hint="an FP8 weight without its scale cannot be decoded")
        s = t[scale_sfx[0]]
        _need(w.shape == _FP8.shape("weight", out_f, in_f), w, f"shape {[out_f, in_f]}", list(w.shape))
        want = _FP8.shape("scale", out_f, in_f)
        _need(s.dtype in _FP8.role("scale").dtypes, s, f"{_or(_FP8.role('scale').dtypes)} block scales", s.dtype,
              TensorDtypeError)
        _need(s.shape == want, s, f"{_FP8.block_out}x{_FP8.block_in} block scales of shape {list(want)} "
              "(per-channel/per-tensor FP8 is not supported)", list(s.shape))
        return ModuleQuant("fp8_block", _FP8_VARIANT[scale_sfx[0]], {"weight": "weight", "scale": scale_sfx[0]})
    if w.dtype in _FP4_BYTES:
        want = _MX.shape("weight", out_f, in_f)
        _need(w.shape == want and in_f % _MX.pack == 0, w, f"packed FP4 shape {list(want)}", list(w.shape))
        # ModelOpt NVFP4 keeps the ``weight`` name: its global scale or an e4m3 local scale tells it apart (§6.9)
        nv_local = "weight_scale" in t and t["weight_scale"].dtype in _NV.role("weight_scale").dtypes
        if "weight_scale_2" in t or nv_local:
            return _nvfp4(module, t, out_f, in_f, "weight", "modelopt")
        sfx = next((x for x in _MX.role("scale").suffixes if x in t), None)
        if sfx is None:
            raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"an FP4 scale companion "
                                     f"({module}.scale)", found="none", hint="packed FP4 weights need their scales")
        return _mxfp4(t, out_f, in_f, "weight", sfx, "deepseek")
    raise TensorDtypeError(file=w.file or None, tensor=w.name,
                           expected=f"a float, {_or(_FP8.role('weight').dtypes + tuple(sorted(_FP4_BYTES)))} weight",
                           found=w.dtype)


def _packed(module: str, t: dict[str, TensorMeta], out_f: int, in_f: int) -> ModuleQuant:
    w = t["weight_packed"]
    if "weight_scale" not in t:
        raise QuantMismatchError(file=w.file or None, tensor=w.name, expected=f"{module}.weight_scale", found="none",
                                 hint="compressed-tensors packed weights need their scales")
    if w.dtype in _W4.role("weight_packed").dtypes:
        want = _W4.shape("weight_packed", out_f, in_f)
        _need(w.shape == want, w, f"int4 pack-quantized shape {list(want)}", list(w.shape))
        s = t["weight_scale"]
        _need(len(s.shape) == 2 and s.shape[0] == out_f and s.shape[1] > 0 and in_f % s.shape[1] == 0, s,
              f"group scales [{out_f}, {in_f}/group]", list(s.shape))
        roles = {r.name: r.name for r in _W4.roles if r.name in t}
        return ModuleQuant("w4a16", "compressed-tensors", roles)
    _need(w.dtype == _CT_FP4, w, f"{_CT_FP4} (FP4) or {_or(_W4.role('weight_packed').dtypes)} (int4) packed weights",
          w.dtype, TensorDtypeError)
    want = _MX.shape("weight", out_f, in_f)
    _need(w.shape == want, w, f"packed FP4 shape {list(want)}", list(w.shape))
    if t["weight_scale"].dtype in _NV.role("weight_scale").dtypes:
        return _nvfp4(module, t, out_f, in_f, "weight_packed", "compressed-tensors")
    return _mxfp4(t, out_f, in_f, "weight_packed", "weight_scale", "compressed-tensors")


def _mxfp4(t: dict[str, TensorMeta], out_f: int, in_f: int, w_sfx: str, s_sfx: str, variant: str) -> ModuleQuant:
    s, g = t[s_sfx], _MX.block_in
    _need(s.dtype in _MX.role("scale").dtypes, s, f"{_or(_MX.role('scale').dtypes)} (biased exponent) per-{g} scales",
          s.dtype, TensorDtypeError)
    want = _MX.shape("scale", out_f, in_f)
    _need(s.shape == want and in_f % g == 0, s, f"per-{g} scales {list(want)}", list(s.shape))
    return ModuleQuant("mxfp4", variant, {"weight": w_sfx, "scale": s_sfx})


def _nvfp4(module: str, t: dict[str, TensorMeta], out_f: int, in_f: int, w_sfx: str, variant: str) -> ModuleQuant:
    s = t.get("weight_scale")
    anchor = t[w_sfx]
    if s is None:
        raise QuantMismatchError(file=anchor.file or None, tensor=anchor.name, expected=f"{module}.weight_scale",
                                 found="none", hint="NVFP4 weights need per-16 E4M3 scales")
    k = _NV.block_in
    _need(s.dtype in _NV.role("weight_scale").dtypes, s, f"{_or(_NV.role('weight_scale').dtypes)} per-{k} scales",
          s.dtype, TensorDtypeError)
    want = _NV.shape("weight_scale", out_f, in_f)
    _need(s.shape == want and in_f % k == 0, s, f"per-{k} scales {list(want)}", list(s.shape))
    glob = [g for g, _ in _NV.globals if g in t]
    if len(glob) != 1:
        raise QuantMismatchError(file=anchor.file or None, tensor=anchor.name,
                                 expected=f"exactly one of {' / '.join(g for g, _ in _NV.globals)}",
                                 found=glob or "none")
    g = t[glob[0]]
    _need(g.dtype in _NV.role(glob[0]).dtypes and len(g.shape) <= 1 and (not g.shape or g.shape[0] == 1), g,
          f"an {_or(_NV.role(glob[0]).dtypes)} scalar", f"{g.dtype} {list(g.shape)}")
    roles = {"weight": w_sfx, "weight_scale": "weight_scale", glob[0]: glob[0]}
    for r in _NV.roles:
        if r.kind == GLOBAL and r.name not in dict(_NV.globals) and r.name in t:     # optional input scales
            roles[r.name] = r.name
    return ModuleQuant("nvfp4", variant, roles)


def _or(names: tuple[str, ...] | list[str]) -> str:
    """``"A, B or C"`` for messages."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
