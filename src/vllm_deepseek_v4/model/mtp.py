"""The MTP draft block ``mtp.K`` (docs/dsv4-architecture.md §10): a full decoder block of layer ``L + K`` fed with the
main model's pre-``hc_head`` stream state and the embedding of the next token.

It owns ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, ``norm`` and its own ``hc_head_*`` mixer, but **no**
embedding or head: those are the main model's ``embed`` / ``head``, passed in by the caller, so they appear
once in the ``state_dict`` as in the official checkpoint.
"""
from __future__ import annotations

import torch

from ..config import DSV4Config
from ..errors import TensorShapeError
from ..kernels import dispatch
from ..quant.groups import scheme_of
from .block import Block, f32
from .hyper import hc_head
from .kv_store import KVStore
from .linear import QLinear
from .parallel import SINGLE, Parallel
from .primitives import RMSNorm

__all__ = ["MTPBlock"]


class MTPBlock(Block):
    """Block ``L + k`` (its ratio from ``compress_ratios[L + k]``, gate-bias routing) plus the MTP projections."""

    def __init__(self, cfg: DSV4Config, k: int, schemes: dict[str, str], *, dtype: torch.dtype,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__(cfg, cfg.n_layers + k, schemes, dtype=dtype, parallel=parallel)   # e/h_proj replicated
        D, N = cfg.dim, cfg.hc_mult
        self.e_proj = QLinear(D, D, scheme_of(schemes, "e_proj"), dtype=dtype)
        self.h_proj = QLinear(D, D, scheme_of(schemes, "h_proj"), dtype=dtype)
        self.enorm = RMSNorm(D, cfg.norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(D, cfg.norm_eps, dtype=dtype)
        self.norm = RMSNorm(D, cfg.norm_eps, dtype=dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = f32(N, N * D), f32(N), f32(1)

    def forward(self, X: torch.Tensor, e: torch.Tensor, ids: torch.Tensor, start: int,  # type: ignore[override]
                cache: KVStore) -> torch.Tensor:
        """``X [B, S, N, D]`` main streams at positions ``start..``, ``e [B, S, D]`` embeddings of the next
        tokens ``ids [B, S]`` -> the block's output streams ``Z [B, S, N, D]`` (pre-``hc_head``)."""
        want = (*e.shape[:2], self.cfg.hc_mult, self.cfg.dim)
        if tuple(X.shape) != want:
            raise TensorShapeError(tensor=f"mtp.{self.layer_id - self.cfg.n_layers} input streams",
                                   expected=list(want), found=list(X.shape),
                                   hint="feed the main model's [B, S, hc_mult, D] state before hc_head")
        z = dispatch.linear(self.enorm(e), self.e_proj)[:, :, None, :]            # shared by all streams
        Z = z + dispatch.linear(self.hnorm(X), self.h_proj)                         # hnorm per stream
        return super().forward(Z, ids, start, cache)

    def head_input(self, Z: torch.Tensor) -> torch.Tensor:
        """``rms(hc_head_mtp(Z); mtp.norm)`` -> ``[B, S, D]``, ready for the shared ``head``."""
        y = hc_head(Z, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, hc_eps=self.cfg.hc_eps,
                    norm_eps=self.cfg.norm_eps)
        out: torch.Tensor = self.norm(y)
        return out
