"""Checks shared by the format modules: fetch one role of a module's parts with its dtype and shape."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError

__all__ = ["cdiv", "role_name", "take"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def role_name(name: str | None, role: str) -> str:
    """``"layers.0.attn.wq_a.scale"`` when the module name is known, else just the role."""
    return f"{name}.{role}" if name else role


def take(parts: Mapping[str, torch.Tensor], role: str, *, scheme: str, name: str | None,
         dtypes: Sequence[torch.dtype], shape: Sequence[int] | None) -> torch.Tensor:
    """``parts[role]``, checked: present, one of ``dtypes``, and of ``shape`` when given."""
    if role not in parts:
        raise QuantMismatchError(tensor=role_name(name, role), expected=f"role {role!r} of scheme {scheme}",
                                 found=f"roles {sorted(parts)}", hint=f"a {scheme} module needs its {role} tensor")
    t = parts[role]
    if t.dtype not in dtypes:
        raise TensorDtypeError(tensor=role_name(name, role), expected=" | ".join(str(d) for d in dtypes),
                               found=t.dtype, hint=f"is this module really {scheme}?")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise TensorShapeError(tensor=role_name(name, role), expected=list(shape), found=list(t.shape),
                               hint=f"{scheme} shapes follow from the logical weight shape")
    return t
