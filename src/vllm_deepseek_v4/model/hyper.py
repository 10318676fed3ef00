"""Manifold-constrained hyper-connections (mHC): N residual streams mixed around each sub-layer.

``docs/dsv4-architecture.md`` §4 (``hc_pre``, Sinkhorn, ``hc_post``) and §9 (``hc_head``). The state of one token
is ``X [N, D]`` (N = ``hc_mult`` = 4); here always batched as ``X [B, S, N, D]``. All mixing runs in fp32.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["sinkhorn", "hc_pre", "hc_post", "hc_head"]


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Near doubly-stochastic ``[..., N, N]``: row softmax + eps, then alternate; always ends on columns."""
    c = logits.softmax(dim=-1) + eps
    if c.device.type == "cpu" and c.dtype == torch.float32 and not c.requires_grad and _numpy() is not None:
        # Why numpy: the matrices are 4 x 4 per token, so each of the ~120 ops costs its dispatch, not its
        # arithmetic, and numpy's per-op overhead is ~2-3x lower than torch's on CPU: ~2 ms off every decode step
        # of a small model (two Sinkhorns per block). Same ops, same order, fp32 (numpy keeps float32 for a
        # Python-float eps). The torch path stays for autograd, other devices and installs without numpy.
        return torch.from_numpy(_alternate(c.numpy(), iters, eps))
    return _alternate(c, iters, eps)


def _alternate(c: Any, iters: int, eps: float) -> Any:
    """Column, then ``iters - 1`` row + column normalisations of a torch tensor or a numpy array (both take
    ``axis`` / ``keepdims``)."""
    c = c / (c.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=-1, keepdims=True) + eps)
        c = c / (c.sum(axis=-2, keepdims=True) + eps)
    return c


@lru_cache(maxsize=1)
def _numpy() -> Any:
    """numpy if installed (it is wherever vLLM is; the core does not require it) -- imported on first use."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _mix_logits(X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``fn @ v / rms(v)`` for the flattened streams ``v = concat(X_0..X_{N-1})`` -> ``[B, S, fn_rows]``."""
    v = X.flatten(-2).float()
    return (v @ fn.float().T) * torch.rsqrt(v.square().mean(-1, keepdim=True) + norm_eps)


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, iters: int,
           hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse ``X [B, S, N, D]`` into the sub-layer input; returns ``(y [B,S,D], post [B,S,N], comb [B,S,N,N])``.

    ``fn [(2+N)*N, N*D]``, ``base [(2+N)*N]``, ``scale [3]`` are ``hc_{attn,ffn}_{fn,base,scale}``; rows
    ``0..N-1`` give ``pre``, ``N..2N-1`` give ``post``, the rest the row-major ``N x N`` comb logits.
    """
    N = X.shape[-2]
    m = _mix_logits(X, fn, norm_eps)
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(scale[0] * m[..., :N] + base[:N]) + hc_eps
    post = 2 * torch.sigmoid(scale[1] * m[..., N:2 * N] + base[N:2 * N])
    comb = sinkhorn((scale[2] * m[..., 2 * N:] + base[2 * N:]).reshape(*m.shape[:-1], N, N), iters, hc_eps)
    y = (pre[..., None] * X.float()).sum(dim=-2)
    return y.to(X.dtype), post, comb


def hc_post(o: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``X'_j = post_j * o + sum_i comb[i, j] * X_i`` (i.e. ``comb^T X``) -> ``[B, S, N, D]`` in ``o.dtype``."""
    mixed = torch.einsum("bsij,bsid->bsjd", comb, X.float())
    return (post[..., None] * o.float()[..., None, :] + mixed).to(o.dtype)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final collapse with ``hc_head_fn [N, N*D]``, ``hc_head_base [N]``, ``hc_head_scale [1]``: pre only."""
    m = _mix_logits(X, fn, norm_eps)
    pre = torch.sigmoid(scale.float() * m + base.float()) + hc_eps
    return (pre[..., None] * X.float()).sum(dim=-2).to(X.dtype)
