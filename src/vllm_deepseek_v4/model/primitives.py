"""Primitives: RMSNorm, embedding, interleaved RoPE with DSv4's two frequency tables (docs/dsv4-architecture.md §2)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DSV4Config
from .parallel import SINGLE, Parallel

__all__ = ["RMSNorm", "rms_unweighted", "Embedding", "rope_inv_freq", "apply_rope"]


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in fp32, cast back to ``x.dtype``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` computed in fp32, result in the input dtype (``*.norm.weight``)."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class Embedding(nn.Module):
    """Token embedding ``weight [vocab, D]`` (``embed.weight``); separate from ``head`` (no tying).

    Vocab-parallel under TP: a rank holds the rows of its vocab range, looks up the ids inside it, zeroes the
    others and the ranks' rows are summed (each id is found on exactly one rank, so the sum is exact)."""

    def __init__(self, vocab: int, dim: int, *, dtype: torch.dtype = torch.bfloat16,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.par = parallel
        rows = parallel.split(vocab, "vocab_size")
        self.first = rows.start
        self.weight = nn.Parameter(torch.empty(len(rows), dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.masked_fill(~inside, 0), self.weight).masked_fill(~inside[..., None], 0)
        return self.par.reduce(rows)


@lru_cache(maxsize=None)
def _inv_freq(rd: int, theta: float, factor: float, original: int, beta_fast: float,
              beta_slow: float) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)      # f_k, k = 0..rd/2-1
    if original <= 0 or factor == 1.0:
        return freqs

    def corr(n_rot: float) -> float:            # YaRN correction dim for n_rot rotations over ``original``
        return rd * math.log(original / (2 * math.pi * n_rot)) / (2 * math.log(theta))

    lo = max(math.floor(corr(beta_fast)), 0)
    hi = float(min(math.ceil(corr(beta_slow)), rd - 1))
    if hi == lo:
        hi += 0.001
    ramp = ((torch.arange(rd // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    return freqs * (1 - ramp) + freqs / factor * ramp


def rope_inv_freq(cfg: DSV4Config, ratio: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pair frequencies ``[rope_head_dim / 2]`` of a layer with compress ratio ``ratio``.

    ratio 0 (sliding layers, MTP): ``rope_theta``, no scaling. ratio > 0 (CSA/HCA, all their RoPE uses):
    ``compress_rope_theta`` with YaRN frequency interpolation and *no* mscale (docs/dsv4-architecture.md §2).
    """
    if ratio == 0:
        f = _inv_freq(cfg.rope_head_dim, cfg.rope_theta, 1.0, 0, 0.0, 0.0)
    else:
        f = _inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len,
                      cfg.beta_fast, cfg.beta_slow)
    return f.to(device)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2 * len(inv_freq)`` entries of ``x [..., S, (heads,) dim]`` by position ``pos [S]``.

    Interleaved pairs ``(2k, 2k+1)`` form ``z_k`` and become ``z_k * exp(±i * pos * f_k)``; ``inverse``
    uses the conjugate (undoes RoPE on the attention output). ``x`` is ``[B, S, dim]`` or ``[B, S, H, dim]``.
    """
    rd = 2 * inv_freq.shape[0]
    ang = pos.to(torch.float32)[:, None] * inv_freq.to(pos.device)[None, :]           # [S, rd/2]
    if x.dim() == 4:
        ang = ang[:, None, :]
    cos, sin = ang.cos(), ang.sin()
    if inverse:
        sin = -sin
    rot = x[..., -rd:].float().reshape(*x.shape[:-1], -1, 2)
    re, im = rot[..., 0], rot[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-rd], out.to(x.dtype)), dim=-1)
