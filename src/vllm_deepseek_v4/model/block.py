"""One decoder block: attention and MoE, each inside a hyper-connection mixing site (docs/dsv4-architecture.md §4)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSV4Config
from ..quant.groups import GROUPS
from .attention import Attention
from .hyper import hc_post, hc_pre
from .kv_store import KVStore
from .moe import MoE
from .parallel import SINGLE, Parallel
from .primitives import RMSNorm

__all__ = ["GROUPS", "Block", "f32"]     # GROUPS: a block's scheme groups, from quant/groups.py


def f32(*shape: int) -> nn.Parameter:
    """An uninitialised fp32 parameter (hyper-connection mixers are fp32 in every checkpoint)."""
    return nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    """``attn``, ``ffn``, ``attn_norm``, ``ffn_norm`` and the fp32 mixers ``hc_{attn,ffn}_{fn,base,scale}``
    (``[(2+N)*N, N*D]``, ``[(2+N)*N]``, ``[3]``)."""

    def __init__(self, cfg: DSV4Config, layer_id: int, schemes: dict[str, str], *, dtype: torch.dtype,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.attn = Attention(cfg, layer_id, schemes, dtype=dtype, parallel=parallel)
        self.ffn = MoE(cfg, layer_id, schemes, dtype=dtype, parallel=parallel)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dtype)
        N = cfg.hc_mult
        mix = (2 + N) * N                       # pre N, post N, comb N*N
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = f32(mix, N * cfg.dim), f32(mix), f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = f32(mix, N * cfg.dim), f32(mix), f32(3)

    def forward(self, X: torch.Tensor, ids: torch.Tensor, start: int, cache: KVStore) -> torch.Tensor:
        """Streams ``X [B, S, N, D]`` at positions ``start..`` -> ``[B, S, N, D]``; updates ``cache``."""
        c = self.cfg
        y, post, comb = hc_pre(X, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale,
                               iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, norm_eps=c.norm_eps)
        X = hc_post(self.attn(self.attn_norm(y), start, cache), X, post, comb)
        y, post, comb = hc_pre(X, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale,
                               iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps, norm_eps=c.norm_eps)
        return hc_post(self.ffn(self.ffn_norm(y), ids), X, post, comb)
