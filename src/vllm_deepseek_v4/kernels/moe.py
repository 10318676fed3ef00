"""Routed experts: clamped SwiGLU per expert, weighted sum over the picks (torch reference),
``docs/dsv4-architecture.md §8``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .linear import QuantWeight, linear_ref

__all__ = ["ExpertWeights", "swiglu_expert_ref", "moe_ref"]


class ExpertWeights(Protocol):
    """One expert: ``w1`` (gate) and ``w3`` (up) ``[I, D]``, ``w2`` (down) ``[D, I]``."""

    @property
    def w1(self) -> QuantWeight: ...
    @property
    def w2(self) -> QuantWeight: ...
    @property
    def w3(self) -> QuantWeight: ...


def swiglu_expert_ref(x: torch.Tensor, expert: ExpertWeights, weight: torch.Tensor | None,
                      limit: float) -> torch.Tensor:
    """``w2(weight * silu(min(w1 x, limit)) * clamp(w3 x, ±limit))`` for ``x [T, D]``; ``weight [T]`` or None.

    The gate is clamped from above only, the up projection on both sides (``swiglu_limit``); ``limit <= 0``
    disables the clamp. The routing weight is applied before ``w2`` as in the reference, in fp32.
    """
    g = linear_ref(x, expert.w1).float()
    u = linear_ref(x, expert.w3).float()
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    h = F.silu(g) * u
    if weight is not None:
        h = weight.float()[:, None] * h
    return linear_ref(h.to(x.dtype), expert.w2)


def moe_ref(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[ExpertWeights],
            limit: float) -> torch.Tensor:
    """``x [T, D]``, ``weights / indices [T, k]`` -> fp32 ``[T, D]`` = ``sum_k expert_{indices[t,k]}(x_t) * w``."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(indices).tolist():
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        y = swiglu_expert_ref(x[tok], experts[e], weights[tok, slot], limit)
        out.index_add_(0, tok, y.float())
    return out
