"""``QLinear``: one linear class that holds its weight in the on-disk format of its scheme.

Tensors are registered under the scheme's canonical role names (``quant/__init__.py``), so the model's
``state_dict`` keys are the checkpoint keys (``layers.3.attn.wq_a.weight`` + ``layers.3.attn.wq_a.scale``)
and a loader can assign tensors one by one without any format conversion. Compute goes through
``kernels.dispatch.linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import dispatch
from ..quant import OPTIONAL_ROLES, REQUIRED_ROLES, SCHEMES
from ..quant.w4a16 import DEFAULT_GROUP_SIZE

__all__ = ["QLinear", "role_layout", "FP8_BLOCK", "MXFP4_GROUP", "NVFP4_GROUP", "W4A16_GROUP"]

FP8_BLOCK = 128          # quantization_config.weight_block_size = [128, 128] (docs/checkpoint-formats.md §6.1)
MXFP4_GROUP = 32         # one e8m0 scale per 32 input columns (docs/checkpoint-formats.md §6.2)
NVFP4_GROUP = 16         # one e4m3 scale per 16 input columns (docs/checkpoint-formats.md §6.3)
W4A16_GROUP = DEFAULT_GROUP_SIZE   # quant.w4a16's default (32); loaders re-register other groups' ``weight_scale``

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
# nvfp4: one global scale; compressed-tensors divides, ModelOpt multiplies (docs/checkpoint-formats.md §6.3, §6.7).
_EXCLUSIVE = {"weight_scale_2": "weight_global_scale", "weight_global_scale": "weight_scale_2"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _need_multiple(scheme: str, in_features: int, k: int) -> None:
    if in_features % k:
        raise ConfigError(f"scheme {scheme}", expected=f"in_features divisible by {k}", found=in_features)


def role_layout(scheme: str, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
    """Role -> (shape, dtype) of a freshly allocated weight in ``scheme`` (the canonical table).

    ``dtype`` is used for plain weights and for float scales whose dtype follows the module (w4a16).
    nvfp4 allocates the compressed-tensors global (``weight_global_scale``); ModelOpt's ``weight_scale_2``
    is registered by the loader through :meth:`QLinear.set_role`.
    """
    o, i = out_features, in_features
    if scheme == "bf16":
        return {"weight": ((o, i), dtype)}
    if scheme == "fp8_block":
        return {"weight": ((o, i), torch.float8_e4m3fn),
                "scale": ((_cdiv(o, FP8_BLOCK), _cdiv(i, FP8_BLOCK)), torch.float8_e8m0fnu)}
    if scheme == "mxfp4":
        _need_multiple(scheme, i, MXFP4_GROUP)
        return {"weight": ((o, i // 2), torch.int8), "scale": ((o, i // MXFP4_GROUP), torch.float8_e8m0fnu)}
    if scheme == "nvfp4":
        _need_multiple(scheme, i, NVFP4_GROUP)
        return {"weight": ((o, i // 2), torch.uint8), "weight_scale": ((o, i // NVFP4_GROUP), torch.float8_e4m3fn),
                "weight_global_scale": ((1,), torch.float32)}
    if scheme == "w4a16":
        return {"weight_packed": ((o, _cdiv(i, 8)), torch.int32),
                "weight_scale": ((o, _cdiv(i, W4A16_GROUP)), dtype), "weight_shape": ((2,), torch.int64)}
    raise ConfigError("scheme", expected=" | ".join(SCHEMES), found=repr(scheme))


class QLinear(nn.Module):
    """``y = x W^T`` with ``W [out, in]`` stored as the roles of ``scheme``.

    bf16: ``weight`` is an ``nn.Parameter`` in ``dtype``. Quantised schemes: every role is a persistent
    buffer with its on-disk dtype (``.to(dtype)`` on the model would corrupt them; don't).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str = "bf16", *,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self._roles: list[str] = []
        for role, (shape, dt) in role_layout(scheme, out_features, in_features, dtype).items():
            t = torch.empty(shape, dtype=dt)
            if role == "weight_shape" and not t.is_meta:
                t.copy_(torch.tensor([out_features, in_features]))
            self._register(role, t)

    def _register(self, role: str, tensor: torch.Tensor) -> None:
        if self.scheme == "bf16":
            self.register_parameter(role, nn.Parameter(tensor, requires_grad=False))
        else:
            self.register_buffer(role, tensor)
        if role not in self._roles:
            self._roles.append(role)

    def set_role(self, role: str, tensor: torch.Tensor) -> None:
        """(Re)register one role tensor as loaded (e.g. ``weight_scale_2`` or an f32 ``scale``).

        Setting one nvfp4 global scale drops the other one.
        """
        allowed = REQUIRED_ROLES[self.scheme] | OPTIONAL_ROLES[self.scheme]
        if role not in allowed:
            raise ConfigError(f"role of scheme {self.scheme}", expected=sorted(allowed), found=repr(role))
        other = _EXCLUSIVE.get(role)
        if other in self._roles:
            self._roles.remove(other)
            delattr(self, other)
        self._register(role, tensor)

    def parts(self) -> dict[str, torch.Tensor]:
        """Role name -> tensor, as ``quant.numerics.dequantize`` takes them."""
        return {r: getattr(self, r) for r in self._roles}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}"
