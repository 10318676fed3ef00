"""The portable DSv4 model (main stack + MTP draft blocks) in the upstream checkpoint's name space.

Reading order: schemes -> state -> model. Parameters are named exactly like the official checkpoint
(``embed.weight``, ``layers.N.attn.wq_a.weight`` ..., ``mtp.K.e_proj.weight``), and quantised linears hold
their on-disk roles, so a loader fills a model built on the meta device with ``load_state_dict(assign=True)``
(or tensor by tensor) and nothing else.

Usage::

    model = build_model(cfg, schemes={"main": {"experts": "mxfp4"}}, device="meta")   # then load
    state = model.new_state()
    logits, hidden = model(prompt_ids, state)            # prefill: [B, S, V] fp32, [B, S, N, D]
    logits, hidden = model(next_ids[:, None], state)     # decode one token (any chunk size works)
    mtp_state = model.new_mtp_state()
    draft_logits, z = model.forward_mtp(hidden, next_ids[:, None], mtp_state)   # predicts token p+2
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import DSV4Config
from ..errors import ConfigError
from ..kernels import dispatch
from ..quant import SCHEMES
from .block import GROUPS, Block, f32
from .hyper import hc_head
from .kv_store import AttnCache, KVStore
from .linear import QLinear
from .mtp import MTPBlock
from .parallel import SINGLE, Parallel, global_expert_names
from .primitives import Embedding, RMSNorm

__all__ = ["Schemes", "resolve_schemes", "ModelState", "DSV4Model", "build_model"]

Schemes = Mapping[str, Mapping[str, str]]     # {"main" | "mtp.K": {group: scheme}}


def resolve_schemes(cfg: DSV4Config, schemes: Schemes | None) -> dict[str, dict[str, str]]:
    """Complete the per-stack scheme table; groups not given are ``bf16``. Unknown keys raise ConfigError."""
    stacks = ["main"] + [f"mtp.{k}" for k in range(cfg.n_mtp_layers)]
    schemes = dict(schemes or {})
    for stack in sorted(set(schemes) - set(stacks)):
        raise ConfigError("schemes", expected=f"keys among {stacks}", found=repr(stack))
    out: dict[str, dict[str, str]] = {}
    for stack in stacks:
        given = dict(schemes.get(stack) or {})
        for group, scheme in sorted(given.items()):
            if group not in GROUPS:
                raise ConfigError(f"schemes[{stack!r}]", expected=f"groups among {list(GROUPS)}", found=repr(group))
            if scheme not in SCHEMES:
                raise ConfigError(f"schemes[{stack!r}][{group!r}]", expected=" | ".join(SCHEMES), found=repr(scheme))
        out[stack] = {g: given.get(g, "bf16") for g in GROUPS}
    return out


@dataclass
class ModelState:
    """Decode state of one stack (the main layers, or one MTP block): per-layer caches and the number of
    tokens already consumed (the position of the next token)."""

    layers: list[KVStore] = field(default_factory=list)
    pos: int = 0


class DSV4Model(nn.Module):
    """Main stack (``embed``, ``layers``, ``hc_head_*``, ``norm``, ``head``) and ``mtp`` draft blocks."""

    def __init__(self, cfg: DSV4Config, *, schemes: Schemes | None = None, dtype: torch.dtype = torch.bfloat16,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        parallel.check(cfg)
        self.cfg, self.dtype, self.par = cfg, dtype, parallel
        self.schemes = resolve_schemes(cfg, schemes)
        D, N = cfg.dim, cfg.hc_mult
        self.embed = Embedding(cfg.vocab_size, D, dtype=dtype, parallel=parallel)
        self.layers = nn.ModuleList(Block(cfg, i, self.schemes["main"], dtype=dtype, parallel=parallel)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(D, cfg.norm_eps, dtype=dtype)
        self.head = QLinear(D, len(parallel.vocab(cfg)), "bf16", dtype=dtype)      # vocab-parallel rows
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = f32(N, N * D), f32(N), f32(1)
        self.mtp = nn.ModuleList(MTPBlock(cfg, k, self.schemes[f"mtp.{k}"], dtype=dtype, parallel=parallel)
                                 for k in range(cfg.n_mtp_layers))

    def canonical_modules(self) -> dict[str, nn.Module]:
        """``named_modules`` under the checkpoint's names (an EP rank's experts by their global index)."""
        return global_expert_names(dict(self.named_modules()), self.par.experts(self.cfg).start)

    # ---- state ----
    def new_state(self) -> ModelState:
        return ModelState([AttnCache() for _ in self.layers])

    def new_mtp_state(self) -> ModelState:
        """State of one MTP block (its own sliding-window KV; it lags the main stack by one token)."""
        return ModelState([AttnCache()])

    # ---- main stack ----
    def forward(self, ids: torch.Tensor, state: ModelState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``ids [B, S]`` at positions ``state.pos..`` -> ``(logits [B, S, V] fp32, hidden [B, S, N, D])``.

        ``hidden`` is the stream state after the last layer and *before* ``hc_head`` (the MTP input). Without
        ``state`` this is a stateless full-sequence forward from position 0; with one it is prefill / decode
        and advances ``state.pos`` by ``S``.
        """
        state = state if state is not None else self.new_state()
        X = self.streams(ids, state)
        return self.logits(self.head_input(X)), X

    def streams(self, ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """The main stack without its head: ``ids [B, S]`` -> streams ``[B, S, N, D]`` before ``hc_head``.

        ``state.layers`` holds one :class:`~.kv_store.KVStore` per layer: an in-process :class:`AttnCache`,
        or the vLLM plugin's paged caches."""
        start = state.pos
        h = self.embed(ids)                                                        # [B, S, D]
        X = h[:, :, None, :].expand(-1, -1, self.cfg.hc_mult, -1).contiguous()     # N identical streams
        for layer, cache in zip(self.layers, state.layers):
            X = layer(X, ids, start, cache)
        state.pos = start + ids.shape[1]
        return X

    def head_input(self, X: torch.Tensor) -> torch.Tensor:
        """``rms(hc_head(X); norm)`` -> ``[B, S, D]``, ready for :meth:`logits`."""
        y = hc_head(X, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, hc_eps=self.cfg.hc_eps,
                    norm_eps=self.cfg.norm_eps)
        out: torch.Tensor = self.norm(y)
        return out

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """Shared ``head``: ``[..., D]`` -> fp32 ``[..., V]`` (the ranks' vocab slices gathered under TP)."""
        return self.par.gather(dispatch.linear(y.float(), self.head))

    # ---- MTP ----
    def forward_mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, state: ModelState | None = None, *,
                    k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft with ``mtp.k``: ``hidden [B, S, N, D]`` main streams at positions ``p = state.pos..`` and the
        tokens at ``p + 1`` (``next_ids [B, S]``) -> ``(logits for p + 2 [B, S, V] fp32, Z [B, S, N, D])``.

        For deeper drafts feed ``Z`` back as ``hidden`` with the token just drafted (vLLM's reuse scheme).
        """
        state = state if state is not None else self.new_mtp_state()
        block = self.mtp[k]
        assert isinstance(block, MTPBlock)
        Z = block(hidden, self.embed(next_ids), next_ids, state.pos, state.layers[0])
        state.pos += next_ids.shape[1]
        return self.logits(block.head_input(Z)), Z


def build_model(cfg: DSV4Config, *, schemes: Schemes | None = None, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "meta", parallel: Parallel = SINGLE) -> DSV4Model:
    """Construct without touching memory on ``meta`` (default); fill with ``load_state_dict(assign=True)``."""
    with torch.device(device):
        return DSV4Model(cfg, schemes=schemes, dtype=dtype, parallel=parallel)
