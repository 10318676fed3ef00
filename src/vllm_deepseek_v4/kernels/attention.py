"""Single-latent attention with a per-head sink (torch reference), ``docs/dsv4-architecture.md §5.2``.

DSv4 attention has one 512-wide latent per key that is both K and V, and a learned per-head ``attn_sink``
logit that only enlarges the softmax denominator (it has no value vector). The key set of each query
(window, compressed entries, indexer picks) arrives as a boolean mask (the model's form) or as a list of
key rows with ``-1`` for unused slots (the form a paged runtime hands over).
"""
from __future__ import annotations

import torch

__all__ = ["sink_attention_ref", "sink_attention_indexed_ref"]


def sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``q [B, S, H, d]``, ``kv [B, N, d]``, ``mask [B|1, S, N]`` (True = attend), ``sink [H]`` -> ``[B, S, H, d]``.

    fp32 throughout; each query must see at least one key (itself, in the window).
    """
    logits = torch.einsum("bshd,bnd->bshn", q.float(), kv.float()) * scale
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    sink = sink.float()[None, None, :]                                        # [1, 1, H]
    top = torch.maximum(logits.amax(dim=-1), sink)                          # [B, S, H]
    p = torch.exp(logits - top[..., None])
    denom = p.sum(dim=-1) + torch.exp(sink - top)
    out = torch.einsum("bshn,bnd->bshd", p / denom[..., None], kv.float())
    return out.to(q.dtype)


def sink_attention_indexed_ref(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """``q [B, S, H, d]``, ``kv [B, N, d]``, ``idx [B|1, S, K]`` key rows per query (``-1`` = unused slot),
    ``sink [H]`` -> ``[B, S, H, d]``; fp32 throughout. A row listed twice counts twice (callers list each once)."""
    B, S = q.shape[:2]
    valid = idx >= 0
    rows = idx.clamp(min=0).expand(B, S, idx.shape[-1])
    keys = torch.gather(kv.float()[:, None].expand(B, S, *kv.shape[1:]), 2,
                        rows[..., None].expand(B, S, rows.shape[-1], kv.shape[-1]))      # [B, S, K, d]
    logits = torch.einsum("bshd,bskd->bshk", q.float(), keys) * scale
    logits = logits.masked_fill(~valid.expand(B, S, -1)[:, :, None, :], float("-inf"))
    sink = sink.float()[None, None, :]
    top = torch.maximum(logits.amax(dim=-1), sink)
    p = torch.exp(logits - top[..., None])
    denom = p.sum(dim=-1) + torch.exp(sink - top)
    out = torch.einsum("bshk,bskd->bshd", p / denom[..., None], keys)
    return out.to(q.dtype)
