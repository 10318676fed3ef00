"""Checks shared by the format modules: fetch one role of a module's parts with the dtype its
:class:`~.scheme.Scheme` record allows and the shape the caller expects."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..checkpoint.format import TORCH_DTYPE_NAMES
from ..errors import QuantMismatchError, TensorDtypeError, TensorShapeError
from .scheme import SCHEMES, cdiv

__all__ = ["cdiv", "role_name", "take", "torch_dtype", "role_dtypes"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F8_E8M0"`` -> ``torch.float8_e8m0fnu``)."""
    dt: torch.dtype = getattr(torch, TORCH_DTYPE_NAMES[name])
    return dt


def role_dtypes(scheme: str, role: str) -> tuple[torch.dtype, ...]:
    """The torch dtypes ``role`` of ``scheme`` may have (its record's ``dtypes``, same order)."""
    return tuple(map(torch_dtype, SCHEMES[scheme].role(role).dtypes))


def role_name(name: str | None, role: str) -> str:
    """``"layers.0.attn.wq_a.scale"`` when the module name is known, else just the role."""
    return f"{name}.{role}" if name else role


def take(parts: Mapping[str, torch.Tensor], role: str, *, scheme: str, name: str | None,
         shape: Sequence[int] | None) -> torch.Tensor:
    """``parts[role]``, checked: present, one of the record's dtypes, and of ``shape`` when given."""
    if role not in parts:
        raise QuantMismatchError(tensor=role_name(name, role), expected=f"role {role!r} of scheme {scheme}",
                                 found=f"roles {sorted(parts)}", hint=f"a {scheme} module needs its {role} tensor")
    t = parts[role]
    dtypes = role_dtypes(scheme, role)
    if t.dtype not in dtypes:
        raise TensorDtypeError(tensor=role_name(name, role), expected=" | ".join(str(d) for d in dtypes),
                               found=t.dtype, hint=f"is this module really {scheme}?")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise TensorShapeError(tensor=role_name(name, role), expected=list(shape), found=list(t.shape),
                               hint=f"{scheme} shapes follow from the logical weight shape")
    return t
