"""The model's op layer: Triton on CUDA, torch elsewhere, one switch to force either.

Every compute-heavy step of the model goes through one function here (``linear``, ``grouped_linear``,
``sink_attention``, ``moe``, ``swiglu_expert``). Each picks a backend per call:

- ``torch``: always the ``<op>_ref`` reference in ``kernels/<op>.py``;
- ``triton``: always the Triton kernel; :class:`KernelUnsupportedError` where none exists (yet) or the
  inputs are not on CUDA -- forcing never falls back silently;
- ``auto`` (default): Triton when the inputs are on CUDA and a kernel is registered, else the reference.

Select with the environment variable ``DSV4_KERNELS=torch|triton|auto`` (read at import) or
:func:`set_backend`. No Triton kernels are registered yet; they land in ``_TRITON`` with their own modules.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
import torch

from ..errors import KernelUnsupportedError
from .attention import sink_attention_ref
from .linear import QuantWeight, grouped_linear_ref, linear_ref
from .moe import ExpertWeights, moe_ref, swiglu_expert_ref

__all__ = ["BACKENDS", "get_backend", "set_backend", "linear", "grouped_linear", "sink_attention", "moe",
           "swiglu_expert"]

BACKENDS = ("auto", "torch", "triton")
_ENV = "DSV4_KERNELS"

# op name -> Triton wrapper with the reference's signature; filled by kernel modules as they land.
_TRITON: dict[str, Callable[..., torch.Tensor]] = {}


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise KernelUnsupportedError(tensor=_ENV, expected=" | ".join(BACKENDS), found=repr(name),
                                     hint="pick a kernel backend")
    return name


_backend = _checked(os.environ.get(_ENV, "auto").strip().lower() or "auto")


def set_backend(name: str) -> str:
    """Select the backend for all later calls; returns the previous one (so tests can restore it)."""
    global _backend
    previous, _backend = _backend, _checked(name)
    return previous


def get_backend() -> str:
    return _backend


def _pick(op: str, ref: Callable[..., torch.Tensor], x: torch.Tensor) -> Callable[..., torch.Tensor]:
    if _backend == "torch":
        return ref
    kernel = _TRITON.get(op)
    if _backend == "auto":
        return kernel if (kernel is not None and x.is_cuda) else ref
    if kernel is None:
        raise KernelUnsupportedError(tensor=op, expected="a Triton kernel", found="none registered yet",
                                     hint=f"set {_ENV}=torch or auto to use the torch reference")
    if not x.is_cuda:
        raise KernelUnsupportedError(tensor=op, expected="CUDA inputs for the Triton backend",
                                     found=str(x.device), hint=f"set {_ENV}=torch or auto on this device")
    return kernel


def linear(x: torch.Tensor, module: QuantWeight) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` in ``x.dtype`` for a module holding on-disk weight roles."""
    return _pick("linear", linear_ref, x)(x, module)


def grouped_linear(x: torch.Tensor, module: QuantWeight, groups: int) -> torch.Tensor:
    """``x [..., G, in] -> [..., G, out/G]`` (attention ``wo_a``)."""
    return _pick("grouped_linear", grouped_linear_ref, x)(x, module, groups)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``q [B, S, H, d]``, ``kv [B, N, d]``, ``mask [B|1, S, N]``, ``sink [H]`` -> ``[B, S, H, d]``."""
    return _pick("sink_attention", sink_attention_ref, q)(q, kv, mask, sink, scale)


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[ExpertWeights],
        limit: float) -> torch.Tensor:
    """Routed experts for ``x [T, D]`` with picks ``indices / weights [T, k]`` -> fp32 ``[T, D]``."""
    return _pick("moe", moe_ref, x)(x, weights, indices, experts, limit)


def swiglu_expert(x: torch.Tensor, expert: ExpertWeights, weight: torch.Tensor | None,
                  limit: float) -> torch.Tensor:
    """One clamped SwiGLU expert (the shared expert) for ``x [T, D]``."""
    return _pick("swiglu_expert", swiglu_expert_ref, x)(x, expert, weight, limit)
