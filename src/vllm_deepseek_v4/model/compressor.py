"""KV compressor (CSA/HCA) and the lightning indexer of CSA layers (docs/dsv4-architecture.md §6, §7).

Every ``r`` tokens a compressor emits one entry: a per-channel softmax-gated sum of the window's projected
rows. Ratio 4 (CSA) runs in *overlap* mode: entry ``w`` mixes the A halves of window ``w-1`` with the B
halves of window ``w`` (2r slots). Any other ratio (128 in Flash/Pro; 8 etc. in tiny test configs) is plain.

Both modules are incremental: a :class:`CompressorState` keeps the projected rows that are not yet fully
consumed plus every entry emitted so far, so prefill, chunked prefill and token-by-token decode emit the
same entries.

The indexer does **not** apply the reference's Walsh-Hadamard rotation: it is orthonormal and applied to
both queries and keys, so the scores are unchanged in exact arithmetic; the reference needs it only for
its FP4 fake-quantisation, which a BF16 model does not simulate either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DSV4Config
from ..kernels import dispatch
from .linear import QLinear
from .primitives import RMSNorm, apply_rope, rope_inv_freq

__all__ = ["CSA_RATIO", "CompressorState", "Compressor", "Indexer"]

CSA_RATIO = 4   # compress_ratios value of CSA layers: overlap compressor + indexer (docs/dsv4-architecture.md §1.2)


@dataclass
class CompressorState:
    """Projected rows not yet fully consumed (``[B, n, c*hd]`` fp32, ending at the current position) and the
    emitted entries ``[B, n_entries, hd]`` (model dtype)."""

    rows_kv: torch.Tensor | None = None
    rows_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None

    @property
    def n_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[1]


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat((old, new), dim=1)


class Compressor(nn.Module):
    """``ape [r, c*hd]`` fp32, ``wkv``/``wgate [c*hd, D]`` (run in fp32), ``norm [hd]``; c = 2 iff ratio 4."""

    def __init__(self, cfg: DSV4Config, ratio: int, head_dim: int, scheme: str, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.ratio, self.head_dim = cfg, ratio, head_dim
        self.overlap = ratio == CSA_RATIO
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32), requires_grad=False)
        self.wkv = QLinear(cfg.dim, width, scheme, dtype=dtype)
        self.wgate = QLinear(cfg.dim, width, scheme, dtype=dtype)
        self.norm = RMSNorm(head_dim, cfg.norm_eps, dtype=dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, D]`` -> the fp32 rows ``(kv, gate)`` ``[B, S, c*hd]`` of those positions."""
        return dispatch.linear(x.float(), self.wkv), dispatch.linear(x.float(), self.wgate)

    def pool(self, rows_kv: torch.Tensor, rows_gate: torch.Tensor, w0: int, first: int,
             dtype: torch.dtype) -> torch.Tensor:
        """Entries ``first..w0+n-1`` ``[B, new, hd]`` (``dtype``, normed, roped) from the rows of the complete
        windows ``w0..w0+n-1`` (``[B, n*r, c*hd]`` fp32). In overlap mode window ``w`` also needs the A halves
        of window ``w-1``, so ``first > w0`` unless ``w0 == 0`` (window -1 contributes nothing)."""
        r, hd = self.ratio, self.head_dim
        B, n = rows_kv.shape[0], rows_kv.shape[1] // r
        kv = rows_kv.view(B, n, r, -1)                                      # [B, n, r, c*hd]
        score = rows_gate.view(B, n, r, -1) + self.ape
        if self.overlap:                               # slots: A halves of window w-1, then B halves of w
            empty_kv = kv.new_zeros(B, 1, r, hd)
            empty_score = score.new_full((B, 1, r, hd), float("-inf"))
            prev_kv = torch.cat((empty_kv, kv[:, :-1, :, :hd]), dim=1)
            prev_score = torch.cat((empty_score, score[:, :-1, :, :hd]), dim=1)
            kv = torch.cat((prev_kv, kv[..., hd:]), dim=2)                  # [B, n, 2r, hd]
            score = torch.cat((prev_score, score[..., hd:]), dim=2)
        kv, score = kv[:, first - w0:], score[:, first - w0:]
        c = (score.softmax(dim=2) * kv).sum(dim=2)                          # [B, new, hd] fp32
        c = self.norm(c.to(dtype))                                          # model dtype, then norm
        pos = torch.arange(first, w0 + n, device=rows_kv.device) * r       # first token of each window
        return apply_rope(c, pos, rope_inv_freq(self.cfg, r, rows_kv.device))

    def forward(self, x: torch.Tensor, start: int, state: CompressorState) -> torch.Tensor:
        """Feed ``x [B, S, D]`` at positions ``start..start+S-1``; returns all entries so far ``[B, n, hd]``."""
        r, hd = self.ratio, self.head_dim
        B, S, _ = x.shape
        new_kv, new_gate = self.project(x)
        rows_kv, rows_gate = _cat(state.rows_kv, new_kv), _cat(state.rows_gate, new_gate)   # [B, n_rows, c*hd]
        end = start + S
        first = end - rows_kv.shape[1]                 # position of rows[0]; a window start by construction
        done, complete = state.n_entries, end // r
        if complete > done:
            w0 = first // r
            n = complete - w0
            c = self.pool(rows_kv[:, :n * r], rows_gate[:, :n * r], w0, done, x.dtype)
            state.entries = _cat(state.entries, c)
        # Keep the rows of the open window (and, in overlap mode, of the last completed one).
        keep_from = max(complete - 1, 0) * r if self.overlap else complete * r
        state.rows_kv, state.rows_gate = rows_kv[:, keep_from - first:], rows_gate[:, keep_from - first:]
        if state.entries is None:
            state.entries = x.new_zeros(B, 0, hd)
        return state.entries


class Indexer(nn.Module):
    """Top-k selection of compressed entries for CSA layers: ``wq_b [IH*ID, q_lora]``, ``weights_proj [IH, D]``
    and a ratio-4 overlap compressor of width ``index_head_dim`` (``attn.indexer.*``)."""

    def __init__(self, cfg: DSV4Config, schemes: dict[str, str], *, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = QLinear(cfg.q_lora_rank, self.n_heads * self.head_dim, schemes["indexer"], dtype=dtype)
        self.weights_proj = QLinear(cfg.dim, self.n_heads, schemes["router"], dtype=dtype)
        self.compressor = Compressor(cfg, CSA_RATIO, self.head_dim, schemes["compressor"], dtype=dtype)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start: int, state: CompressorState) -> torch.Tensor:
        """``x [B, S, D]`` (attention input), ``qr [B, S, q_lora]`` -> selection mask ``[B, S, n_entries]``."""
        keys = self.compressor(x, start, state)                                # [B, n, ID]
        return self.select(x, qr, keys, torch.arange(start, start + x.shape[1], device=x.device))

    def select(self, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Top-k of the completed ``keys [B, n, ID]`` for the queries at ``pos [S]`` -> mask ``[B, S, n]``."""
        B, S, _ = x.shape
        n = keys.shape[1]
        q = dispatch.linear(qr, self.wq_b).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(q, pos, rope_inv_freq(self.cfg, CSA_RATIO, x.device))
        w = dispatch.linear(x, self.weights_proj).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()
        scores = (scores * w[..., None]).sum(dim=2)                            # [B, S, n]
        visible = torch.arange(n, device=x.device)[None, :] < ((pos + 1) // CSA_RATIO)[:, None]   # [S, n]
        scores = scores.masked_fill(~visible, float("-inf"))
        # Top-k with ties broken towards the older entry: ReLU makes exact ties (all heads at 0) common
        # in small models, and a fixed rule keeps prefill, chunked prefill and decode picking the same set.
        k = min(self.topk, n)
        top, order = scores.sort(dim=-1, descending=True, stable=True)
        picked = torch.zeros(B, S, n, dtype=torch.bool, device=x.device)
        return picked.scatter_(-1, order[..., :k], top[..., :k] > float("-inf"))
