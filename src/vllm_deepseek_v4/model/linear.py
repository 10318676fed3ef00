"""``QLinear``: one linear class that holds its weight in the on-disk format of its scheme.

Tensors are registered under the scheme's canonical role names (``quant/scheme.py``), so the model's
``state_dict`` keys are the checkpoint keys (``layers.3.attn.wq_a.weight`` + ``layers.3.attn.wq_a.scale``)
and a loader can assign tensors one by one without any format conversion. Compute goes through
``kernels.dispatch.linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import dispatch
from ..quant import SCHEMES
from ..quant._parts import torch_dtype
from ..quant.scheme import FLOAT, SHAPE

__all__ = ["QLinear", "role_layout"]

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def role_layout(scheme: str, out_features: int, in_features: int, dtype: torch.dtype) -> Layout:
    """Role -> (shape, dtype) of a freshly allocated weight in ``scheme``: the roles its record allocates.

    ``dtype`` is used for plain weights and for float scales whose dtype follows the module (w4a16, whose
    scales get the record's default group; a loader re-registers other groups' ``weight_scale``). nvfp4
    allocates the compressed-tensors global (``weight_global_scale``); ModelOpt's ``weight_scale_2`` is
    registered by the loader through :meth:`QLinear.set_role`.
    """
    if scheme not in SCHEMES:
        raise ConfigError("scheme", expected=" | ".join(SCHEMES), found=repr(scheme))
    s = SCHEMES[scheme]
    if s.whole_blocks and in_features % s.block_in:
        raise ConfigError(f"scheme {scheme}", expected=f"in_features divisible by {s.block_in}", found=in_features)
    return {r.name: (s.shape(r.name, out_features, in_features), dtype if r.alloc == FLOAT else torch_dtype(r.alloc))
            for r in s.roles if r.alloc is not None}


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
            if SCHEMES[scheme].role(role).kind == SHAPE and not t.is_meta:     # w4a16 records [out, in]
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
        record = SCHEMES[self.scheme]
        if role not in record.allowed:
            raise ConfigError(f"role of scheme {self.scheme}", expected=sorted(record.allowed), found=repr(role))
        if record.global_op(role) is not None:      # one global scale (docs/checkpoint-formats.md §6.3, §6.7)
            for other, _ in record.globals:
                if other != role and other in self._roles:
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
