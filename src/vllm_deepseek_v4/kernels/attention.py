"""Single-latent attention with a per-head sink (torch reference), arch doc section 5.2.

DSv4 attention has one 512-wide latent per key that is both K and V, and a learned per-head ``attn_sink``
logit that only enlarges the softmax denominator (it has no value vector). The key set of each query
(window, compressed entries, indexer picks) arrives as a boolean mask.
"""
from __future__ import annotations

import torch

__all__ = ["sink_attention_ref"]


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
