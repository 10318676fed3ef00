"""What the plugin's paged caches hold and how big their blocks are: pure arithmetic, no vLLM import.

Every attention layer (trunk and MTP) has up to three cache *layers* (``kv.PagedKV`` registers them):

- ``…attn.kv_window`` (every layer, sliding window): one row per token position = the K=V latent | the
  compressor's projected ``kv`` | ``gate`` rows | the indexer compressor's ``kv`` | ``gate`` rows
  (:class:`RowLayout`: each kind of layer has its own width). The window is the attention window plus the
  rows an entry that ends in a later step is pooled from (``attention.history``), so vLLM frees older blocks.
- ``…attn.kv_compressed`` (compressed layers): one ``head_dim`` row per compressed entry
  (``tokens_per_state = r``): entry ``w`` is state ``w`` of the request's blocks.
- ``…attn.kv_index`` (CSA layers): the indexer's key of entry ``w``, ``index_head_dim`` wide, likewise.

vLLM's block pool has one page size (bytes per block per layer) for every layer. Instead of one row width for
everything (the old layout: 39x the content at the Flash config), each kind keeps its natural width and gets
its own *block size* (tokens per block) so that every page has the same number of bytes (:func:`cache_geometry`).
Blocks are multiples of ``MIN_BLOCK`` tokens; vLLM keeps one block table per group and frees window blocks.
The price: a prefix-cache hit lands on a multiple of the largest block (vLLM aligns hits to the least common
multiple of the groups' block sizes), and vLLM's grouping pads kinds with fewer layers (``benchmarks/kv_bytes.py``
measures both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DSV4Config
from ..model.attention import history
from ..model.compressor import CSA_RATIO

__all__ = ["ELEMENT_BYTES", "MIN_BLOCK", "RowLayout", "CacheKind", "CacheGeometry", "layer_kinds", "config_kinds",
           "cache_geometry", "block_sizes", "prefix_hit_tokens"]

ELEMENT_BYTES = 4     # the caches are fp32: the portable compressor's precision, and exact for bf16/fp16 latents
MIN_BLOCK = 16        # tokens in the smallest block (the widest window row's); every block is a multiple of it


@dataclass(frozen=True)
class RowLayout:
    """Column ranges of one layer's window row (``latent | comp kv | comp gate | index kv | index gate``)."""

    head_dim: int
    comp_width: int            # c * head_dim of the compressor rows (0 on sliding layers)
    index_width: int           # 2 * index_head_dim of the indexer compressor rows (0 unless CSA)
    index_dim: int             # index_head_dim: the width of an indexer key (0 unless CSA)

    @classmethod
    def of(cls, cfg: DSV4Config, ratio: int) -> RowLayout:
        d, csa = cfg.head_dim, ratio == CSA_RATIO
        comp = 0 if ratio == 0 else (2 if csa else 1) * d
        return cls(d, comp, 2 * cfg.index_head_dim if csa else 0, cfg.index_head_dim if csa else 0)

    @property
    def window_width(self) -> int:
        return self.head_dim + 2 * self.comp_width + 2 * self.index_width

    @property
    def index_start(self) -> int:
        return self.head_dim + 2 * self.comp_width


@dataclass(frozen=True)
class CacheKind:
    """One cache layer's format: ``width`` fp32 values per stored state, one state per ``tokens_per_state``
    token positions (1: a row per position, sliding window; ``r``: a compressed entry, kept for good)."""

    suffix: str                # the cache layer's name under the attention prefix
    width: int
    tokens_per_state: int

    @property
    def state_bytes(self) -> int:
        return self.width * ELEMENT_BYTES

    @property
    def sliding(self) -> bool:
        return self.suffix == "kv_window"


def layer_kinds(cfg: DSV4Config, ratio: int) -> list[CacheKind]:
    """The cache layers of an attention layer with compress ratio ``ratio``: window [, entries [, index keys]]."""
    lay = RowLayout.of(cfg, ratio)
    kinds = [CacheKind("kv_window", lay.window_width, 1)]
    if ratio:
        kinds.append(CacheKind("kv_compressed", cfg.head_dim, ratio))
    if ratio == CSA_RATIO:
        kinds.append(CacheKind("kv_index", cfg.index_head_dim, ratio))
    return kinds


def config_kinds(cfg: DSV4Config) -> set[CacheKind]:
    """Every kind of cache layer this config's attention layers (trunk and MTP) have."""
    return {k for r in set(cfg.compress_ratios) for k in layer_kinds(cfg, r)}


@dataclass(frozen=True)
class CacheGeometry:
    """The page every cache layer of a config shares and the sliding window of the window caches."""

    page_bytes: int
    window: int                # tokens: a step's token plus every position before it that attention reads

    def states_per_block(self, kind: CacheKind) -> int:
        return self.page_bytes // kind.state_bytes

    def block_size(self, kind: CacheKind) -> int:
        """Tokens per block of ``kind``: its page holds ``page_bytes`` exactly."""
        return self.states_per_block(kind) * kind.tokens_per_state


def cache_geometry(cfg: DSV4Config) -> CacheGeometry:
    """The smallest page (bytes) that every kind of this config (trunk and MTP layers) fills exactly with a
    block of a multiple of ``MIN_BLOCK`` tokens, and the window every window cache keeps.

    For a kind with ``s`` bytes per state and ``t`` tokens per state a page of ``P`` bytes is a block of
    ``P / s * t`` tokens; it is a multiple of ``MIN_BLOCK`` iff ``P`` is a multiple of
    ``s * MIN_BLOCK / gcd(MIN_BLOCK, t)``, so ``P`` is the least common multiple of those.
    """
    page = math.lcm(*(k.state_bytes * (MIN_BLOCK // math.gcd(MIN_BLOCK, k.tokens_per_state))
                      for k in config_kinds(cfg)))
    return CacheGeometry(page, 1 + max(history(cfg, r) for r in set(cfg.compress_ratios)))


def block_sizes(cfg: DSV4Config) -> list[int]:
    """The block sizes (tokens) of this config's cache kinds, ascending."""
    geometry = cache_geometry(cfg)
    return sorted({geometry.block_size(k) for k in config_kinds(cfg)})


def prefix_hit_tokens(cfg: DSV4Config) -> int:
    """The granularity of a prefix-cache hit: vLLM reuses a cached prefix only in whole blocks of every group,
    so in multiples of the least common multiple of the block sizes (``benchmarks/kv_bytes.py`` reads the same
    from vLLM's own grouping)."""
    return math.lcm(*block_sizes(cfg))
