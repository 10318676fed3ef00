"""DSv4 attention: low-rank queries, one shared K=V latent, sliding window + compressed entries, sink.

Arch doc section 5. Per layer ratio ``r = compress_ratios[layer]``:

- ``r == 0``: sliding window only, plain RoPE (``rope_theta``);
- ``r == 4`` (CSA): window + the indexer's top-k among the completed compressed entries;
- other ``r > 0`` (HCA, 128): window + every completed compressed entry;
- ``r > 0`` layers use the YaRN-interpolated ``compress_rope_theta`` table for all their RoPE.

The window holds ``window_size`` keys including the query itself. K and V are the same latent, so RoPE is
undone on the output before the grouped low-rank output projection (``wo_a`` per group, then ``wo_b``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..config import DSV4Config
from ..kernels import dispatch
from .compressor import CSA_RATIO, Compressor, CompressorState, Indexer
from .linear import QLinear
from .primitives import RMSNorm, apply_rope, rms_unweighted, rope_inv_freq

__all__ = ["AttnCache", "ExternalKV", "Attention"]


@runtime_checkable
class ExternalKV(Protocol):
    """A per-layer cache owned outside the model (e.g. vLLM's paged KV blocks). It receives the attention
    module and its normed input and returns the output, composing ``project`` / ``attend`` and the
    compressor / indexer pieces itself, so the math stays this module's."""

    def attend(self, attn: Attention, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttnCache:
    """Decode state of one attention layer: the last ``window_size - 1`` latents ``[B, n, d]`` and the
    compressor / indexer states (left empty on layers that have none)."""

    window: torch.Tensor | None = None
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)


class Attention(nn.Module):
    """``layers.N.attn``: ``attn_sink``, ``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``, ``wo_b``
    (+ ``compressor`` if ratio > 0, + ``indexer`` if ratio == 4)."""

    def __init__(self, cfg: DSV4Config, layer_id: int, schemes: dict[str, str], *, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.ratio = cfg, cfg.ratio(layer_id)
        H, d, G = cfg.n_heads, cfg.head_dim, cfg.o_groups
        s = schemes["attn"]
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32), requires_grad=False)
        self.wq_a = QLinear(cfg.dim, cfg.q_lora_rank, s, dtype=dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype=dtype)
        self.wq_b = QLinear(cfg.q_lora_rank, H * d, s, dtype=dtype)               # head-major rows
        self.wkv = QLinear(cfg.dim, d, s, dtype=dtype)
        self.kv_norm = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.wo_a = QLinear(H * d // G, G * cfg.o_lora_rank, s, dtype=dtype)       # grouped: [G*o_lora, H*d/G]
        self.wo_b = QLinear(G * cfg.o_lora_rank, cfg.dim, s, dtype=dtype)
        if self.ratio > 0:
            self.compressor = Compressor(cfg, self.ratio, d, schemes["compressor"], dtype=dtype)
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(cfg, schemes, dtype=dtype)

    def forward(self, x: torch.Tensor, start: int, cache: AttnCache | ExternalKV) -> torch.Tensor:
        """``x [B, S, D]`` (normed sub-layer input) at positions ``start..start+S-1`` -> ``[B, S, D]``.

        ``cache`` is this module's in-memory :class:`AttnCache`, or an :class:`ExternalKV` that owns the keys
        elsewhere (the vLLM plugin's paged caches); the latter gets the whole call and uses the pieces below.
        """
        if not isinstance(cache, AttnCache):
            return cache.attend(self, x)
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        q, qr, kv = self.project(x, pos)
        keys, mask = self._window(kv, start, cache)
        if self.ratio > 0:
            entries = self.compressor(x, start, cache.compressor)                 # [B, n, d]
            picked = self.entry_visibility(pos, entries.shape[1])[None]            # HCA: all completed
            if self.ratio == CSA_RATIO:                                            # CSA: indexer's top-k
                picked = picked & self.indexer(x, qr, start, cache.indexer)
            keys = torch.cat((keys, entries), dim=1)
            mask = torch.cat((mask.expand(picked.shape[0], -1, -1), picked), dim=-1)
        return self.attend(q, keys, mask, pos)

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, S, D]`` at positions ``pos [S]`` -> roped queries ``[B, S, H, d]``, the low-rank query
        ``qr [B, S, q_lora]`` (the indexer's input) and the roped K=V latents ``[B, S, d]``."""
        cfg = self.cfg
        B, S, _ = x.shape
        inv_freq = rope_inv_freq(cfg, self.ratio, x.device)
        qr = self.q_norm(dispatch.linear(x, self.wq_a))                            # [B, S, q_lora]
        q = rms_unweighted(dispatch.linear(qr, self.wq_b).view(B, S, cfg.n_heads, cfg.head_dim), cfg.norm_eps)
        q = apply_rope(q, pos, inv_freq)
        kv = apply_rope(self.kv_norm(dispatch.linear(x, self.wkv)), pos, inv_freq)  # [B, S, d]
        return q, qr, kv

    def entry_visibility(self, pos: torch.Tensor, n: int) -> torch.Tensor:
        """``[S, n]``: compressed entry ``i`` is visible to the query at ``p`` once its window is complete."""
        return torch.arange(n, device=pos.device)[None, :] < ((pos + 1) // self.ratio)[:, None]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Sink attention of ``q [B, S, H, d]`` over ``keys [B, N, d]`` (``mask [B|1, S, N]``), RoPE undone on
        the output, then the grouped low-rank output projection -> ``[B, S, D]``."""
        cfg = self.cfg
        B, S = q.shape[:2]
        H, d, G = cfg.n_heads, cfg.head_dim, cfg.o_groups
        o = dispatch.sink_attention(q, keys, mask, self.attn_sink, d ** -0.5)     # [B, S, H, d]
        o = apply_rope(o, pos, rope_inv_freq(cfg, self.ratio, q.device), inverse=True)
        z = dispatch.grouped_linear(o.reshape(B, S, G, H * d // G), self.wo_a, G)  # [B, S, G, o_lora]
        return dispatch.linear(z.flatten(-2), self.wo_b)

    def _window(self, kv: torch.Tensor, start: int, cache: AttnCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Window keys (cached + new) and their mask ``[1, S, n_keys]``; updates the cache."""
        w, end = self.cfg.window_size, start + kv.shape[1]
        keys = kv if cache.window is None else torch.cat((cache.window, kv), dim=1)
        pos = torch.arange(start, end, device=kv.device)
        diff = pos[:, None] - torch.arange(end - keys.shape[1], end, device=kv.device)[None, :]
        cache.window = keys[:, keys.shape[1] - min(keys.shape[1], w - 1):]
        return keys, ((diff >= 0) & (diff < w))[None]
