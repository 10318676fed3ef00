"""KV compressor (CSA/HCA) and the lightning indexer of CSA layers (docs/dsv4-architecture.md §6, §7).

Every ``r`` tokens a compressor emits one entry: a per-channel softmax-gated sum of the window's projected
rows. Ratio 4 (CSA) runs in *overlap* mode: entry ``w`` mixes the A halves of window ``w-1`` with the B
halves of window ``w`` (2r slots). Any other ratio (128 in Flash/Pro; 8 etc. in tiny test configs) is plain.

Both modules are stateless: ``project`` gives each token's rows, ``pool`` turns the rows of complete windows
into entries. The attention layer decides which entries a step computes and keeps rows and entries in its
KV store (``attention.py``, ``kv_store.py``), so prefill, chunked prefill and decode emit the same entries.

The indexer does **not** apply the reference's Walsh-Hadamard rotation: it is orthonormal and applied to
both queries and keys, so the scores are unchanged in exact arithmetic; the reference needs it only for
its FP4 fake-quantisation, which a BF16 model does not simulate either.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSV4Config
from ..kernels import dispatch
from ..quant.groups import scheme_of
from .linear import QLinear
from .parallel import SINGLE, Parallel
from .primitives import RMSNorm, apply_rope, rope_inv_freq

__all__ = ["CSA_RATIO", "windows_pooled", "Compressor", "Indexer"]

CSA_RATIO = 4   # compress_ratios value of CSA layers: overlap compressor + indexer (docs/dsv4-architecture.md §1.2)


def windows_pooled(ratio: int) -> int:
    """How many windows' rows one entry of a ratio-``ratio`` compressor pools: its own, and in overlap mode
    (CSA) also the previous window's (for their A halves)."""
    return 2 if ratio == CSA_RATIO else 1


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


class Indexer(nn.Module):
    """Top-k selection of compressed entries for CSA layers: ``wq_b [IH*ID, q_lora]``, ``weights_proj [IH, D]``
    and a ratio-4 overlap compressor of width ``index_head_dim`` (``attn.indexer.*``)."""

    def __init__(self, cfg: DSV4Config, schemes: dict[str, str], *, dtype: torch.dtype,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.cfg, self.par = cfg, parallel
        # this rank's index heads (TP); the score scale keeps the full head count
        self.n_heads, self.head_dim, self.topk = len(parallel.index_heads(cfg)), cfg.index_head_dim, cfg.index_topk
        self.wq_b = QLinear(cfg.q_lora_rank, self.n_heads * self.head_dim, scheme_of(schemes, "attn.indexer.wq_b"),
                            dtype=dtype)
        self.weights_proj = QLinear(cfg.dim, self.n_heads, scheme_of(schemes, "attn.indexer.weights_proj"), dtype=dtype)
        self.compressor = Compressor(cfg, CSA_RATIO, self.head_dim, scheme_of(schemes, "attn.indexer.compressor"),
                                     dtype=dtype)

    def queries(self, x: torch.Tensor, qr: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, so attention runs it once per step: the roped index queries ``[B, S, IH, ID]`` and their
        heads' fp32 score weights ``[B, S, IH]``."""
        B, S, _ = x.shape
        q = dispatch.linear(qr, self.wq_b).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(q, pos, rope_inv_freq(self.cfg, CSA_RATIO, x.device))
        w = dispatch.linear(x, self.weights_proj).float() * (self.head_dim ** -0.5 * self.cfg.index_n_heads ** -0.5)
        return q, w

    def pick(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Top-k of one request's ``keys [B, n, ID]`` for its :meth:`queries` ``q``, ``w``, among the entries each
        query may see (``visible [1|B, S, n]``, ``Attention.entry_visibility``) -> mask ``[B, S, n]``."""
        B, S = q.shape[:2]
        n = keys.shape[1]
        scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()
        # [B, S, n]: the sum over all index heads, so every TP rank selects the same entries
        scores = self.par.reduce((scores * w[..., None]).sum(dim=2))
        scores = scores.masked_fill(~visible, float("-inf"))
        # Top-k with ties broken towards the older entry: ReLU makes exact ties (all heads at 0) common
        # in small models, and a fixed rule keeps prefill, chunked prefill and decode picking the same set.
        k = min(self.topk, n)
        top, order = scores.sort(dim=-1, descending=True, stable=True)
        picked = torch.zeros(B, S, n, dtype=torch.bool, device=q.device)
        return picked.scatter_(-1, order[..., :k], top[..., :k] > float("-inf"))
