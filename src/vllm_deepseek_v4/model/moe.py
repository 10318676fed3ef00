"""Mixture of experts (``layers.N.ffn``): router, routed clamped-SwiGLU experts, shared expert.

``docs/dsv4-architecture.md`` §8. Scores are ``sqrt(softplus(Wg x))`` in fp32; hash layers (``layer < num_hash_layers``)
pick experts with the frozen table ``gate.tid2eid[token_id]``, the others take the top-k of
``score + gate.bias`` (the bias steers selection only). The picked scores are normalised
(``norm_topk_prob``) and scaled by ``routed_scaling_factor``. No group-limited routing.

Under TP the router is replicated, the routed experts hold their rank's intermediate slice (or, under EP, the
rank holds whole experts of its range and computes only the picks that land there) and the shared expert is
column/row split: every rank's output is a partial sum, all-reduced once (routed + shared, fp32).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DSV4Config
from ..errors import ConfigError
from ..kernels import dispatch
from ..quant.groups import scheme_of
from .linear import QLinear
from .parallel import SINGLE, Parallel

__all__ = ["Gate", "Expert", "MoE"]

def _sqrtsoftplus(z: torch.Tensor) -> torch.Tensor:
    return F.softplus(z).sqrt()


def _softmax(z: torch.Tensor) -> torch.Tensor:
    return z.softmax(dim=-1)


# scoring_func -> router score of the fp32 logits (DSv4 ships sqrtsoftplus; the others are V3-family values)
_SCORE_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sqrtsoftplus": _sqrtsoftplus, "sigmoid": torch.sigmoid, "softmax": _softmax}


class Gate(QLinear):
    """Router ``weight [E, D]`` plus ``bias [E]`` fp32 (top-k layers) or ``tid2eid [vocab, k]`` int64 (hash)."""

    tid2eid: torch.Tensor

    def __init__(self, cfg: DSV4Config, layer_id: int, scheme: str, *, dtype: torch.dtype) -> None:
        super().__init__(cfg.dim, cfg.n_routed_experts, scheme, dtype=dtype)
        self.hash = cfg.is_hash_layer(layer_id)
        if self.hash:
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.empty(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False)


class Expert(nn.Module):
    """``w1`` (gate) and ``w3`` (up) ``[inter, D]``, ``w2`` (down) ``[D, inter]``."""

    def __init__(self, dim: int, inter: int, scheme: str, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = QLinear(dim, inter, scheme, dtype=dtype)
        self.w2 = QLinear(inter, dim, scheme, dtype=dtype)
        self.w3 = QLinear(dim, inter, scheme, dtype=dtype)


class MoE(nn.Module):
    def __init__(self, cfg: DSV4Config, layer_id: int, schemes: dict[str, str], *, dtype: torch.dtype,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        if cfg.score_func not in _SCORE_FUNCS:
            raise ConfigError("scoring_func", expected=" | ".join(_SCORE_FUNCS), found=repr(cfg.score_func))
        self.cfg, self.par = cfg, parallel
        self.gate = Gate(cfg, layer_id, scheme_of(schemes, "ffn.gate"), dtype=dtype)
        self.expert_ids = parallel.experts(cfg)           # experts[j] is routed expert expert_ids[j]
        inter = parallel.expert_inter(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, inter, scheme_of(schemes, "ffn.experts"), dtype=dtype)
                                     for _ in self.expert_ids)
        if cfg.n_shared_experts > 0:
            self.shared_experts = Expert(cfg.dim, parallel.shared_inter(cfg), scheme_of(schemes, "ffn.shared_experts"),
                                         dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, D]``, ``ids [T]`` -> ``(weights [T, k] fp32, expert indices [T, k])``."""
        cfg = self.cfg
        scores = _SCORE_FUNCS[cfg.score_func](dispatch.linear(x.float(), self.gate))      # [T, E] fp32
        if self.gate.hash:
            idx = self.gate.tid2eid[ids]
        else:
            idx = (scores + self.gate.bias.float()).topk(cfg.n_activated_experts, dim=-1).indices
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * cfg.route_scale, idx

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]``, token ids ``[B, S]`` (for hash routing) -> ``[B, S, D]``."""
        flat = x.flatten(0, 1)
        w, idx = self.route(flat, ids.flatten())
        experts = cast(Sequence[Expert], self.experts)
        if len(self.expert_ids) == self.cfg.n_routed_experts:
            y = dispatch.moe(flat, w, idx, experts, self.cfg.swiglu_limit)
        else:
            y = self._local_picks(flat, w, idx, experts)
        if self.cfg.n_shared_experts > 0:
            y = y + dispatch.swiglu_expert(flat, self.shared_experts, None, self.cfg.swiglu_limit).float()
        return self.par.reduce(y).to(x.dtype).view_as(x)

    def _local_picks(self, flat: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                     experts: Sequence[Expert]) -> torch.Tensor:
        """EP: the (token, pick) pairs routed to this rank's experts, one pick per row -> fp32 ``[T, D]``."""
        first = self.expert_ids.start
        tok, slot = torch.nonzero((idx >= first) & (idx < self.expert_ids.stop), as_tuple=True)
        y = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        if tok.numel():
            picked = dispatch.moe(flat[tok], w[tok, slot][:, None], (idx[tok, slot] - first)[:, None], experts,
                                  self.cfg.swiglu_limit)
            y.index_add_(0, tok, picked)
        return y
