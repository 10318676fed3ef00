"""The parallel context of one rank: its place in the TP group, whether experts are split (EP), and the
collectives over that group.

The portable modules build their *local* shapes from the config and this context (the split of each
parameter is the one ``loader/sharding.py``'s ``SHARD_RULES`` read from disk) and call ``reduce`` /
``gather`` where a rank's partial results meet (``docs/dsv4-architecture.md`` §5, §7, §8):

- attention: whole heads and whole ``wo_a`` output groups per rank; ``wo_b`` partial sums are all-reduced.
  The single K=V latent, the compressors and ``wq_a`` are replicated;
- indexer: whole index heads per rank; the per-head weighted scores are all-reduced *before* the top-k;
- MoE: router replicated; routed experts split over their intermediate dim (TP) or whole experts per rank
  (EP: ``ep_size == tp_size``, one group), shared expert column/row; routed + shared partials all-reduced once;
- embedding and head vocab-parallel: masked rows + all-reduce, logits gathered over the vocab.

``SINGLE`` (one process, identity collectives) is every module's default, so in-process use is unchanged.
In the vLLM plugin the collectives are vLLM's TP group's (``vllm_plugin/model.py``).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import DSV4Config
from ..errors import ConfigError
from ..loader.sharding import even_range, experts_of_rank, heads_of_rank

__all__ = ["Parallel", "SINGLE", "global_expert_names"]

Collective = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Parallel:
    """``all_reduce`` sums over the TP ranks; ``all_gather`` concatenates along the last dim in rank order.
    Expert parallel runs over the same group: ``ep_size`` is 1 or ``tp_size``, with ``ep_rank == tp_rank``."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    all_reduce: Collective = _identity
    all_gather: Collective = _identity

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError("tp_rank", expected=f"in [0, {self.tp_size})", found=self.tp_rank)
        if self.ep_size not in (1, self.tp_size) or (self.ep_size > 1 and self.ep_rank != self.tp_rank):
            raise ConfigError("ep_size", expected=f"1, or tp_size={self.tp_size} with ep_rank == tp_rank "
                              "(experts split over the TP group)", found=f"ep {self.ep_rank}/{self.ep_size}")

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a rank's partial result over the group (nothing to do on one rank)."""
        return t if self.tp_size == 1 else self.all_reduce(t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' last-dim slices (vocab-parallel logits) into the whole."""
        return t if self.tp_size == 1 else self.all_gather(t)

    def split(self, total: int, what: str) -> range:
        """This rank's contiguous equal share of ``total`` units of ``what`` (ConfigError if uneven)."""
        return even_range(total, self.tp_rank, self.tp_size, what, "tp_size")

    # ---- the local shapes (same splits as SHARD_RULES) ----
    def heads(self, cfg: DSV4Config) -> range:
        return heads_of_rank(cfg.n_heads, self.tp_rank, self.tp_size)

    def groups(self, cfg: DSV4Config) -> range:
        return self.split(cfg.o_groups, "o_groups")

    def index_heads(self, cfg: DSV4Config) -> range:
        return self.split(cfg.index_n_heads, "index_n_heads")

    def vocab(self, cfg: DSV4Config) -> range:
        return self.split(cfg.vocab_size, "vocab_size")

    def experts(self, cfg: DSV4Config) -> range:
        """The routed experts this rank holds: all without EP, its contiguous range with it."""
        return experts_of_rank(cfg.n_routed_experts, self.ep_rank, self.ep_size)

    def expert_inter(self, cfg: DSV4Config) -> int:
        """A routed expert's intermediate size here: whole under EP, the rank's share under TP."""
        return cfg.moe_inter_dim if self.ep_size > 1 else len(self.split(cfg.moe_inter_dim, "moe_intermediate_size"))

    def shared_inter(self, cfg: DSV4Config) -> int:
        return len(self.split(cfg.n_shared_experts * cfg.moe_inter_dim, "n_shared_experts * moe_intermediate_size"))

    def check(self, cfg: DSV4Config) -> None:
        """Every split this rank makes, up front: a clear ConfigError at startup instead of a shape error later."""
        for split in (self.heads, self.groups, self.index_heads, self.vocab, self.experts, self.expert_inter):
            split(cfg)
        if cfg.n_shared_experts:
            self.shared_inter(cfg)


SINGLE = Parallel()

_EXPERT = re.compile(r"(^|\.)ffn\.experts\.(\d+)(?=\.|$)")


def global_expert_names(modules: dict[str, torch.nn.Module], first: int) -> dict[str, torch.nn.Module]:
    """``named_modules`` with local routed-expert indices renamed to the checkpoint's (``first + j``), so a
    loader assigns ``layers.N.ffn.experts.<global>.*`` keys on an EP rank; unchanged when ``first == 0``."""
    if first == 0:
        return modules
    return {_EXPERT.sub(lambda m: f"{m.group(1)}ffn.experts.{first + int(m.group(2))}", name, count=1): mod
            for name, mod in modules.items()}
