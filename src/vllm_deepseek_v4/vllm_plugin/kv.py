"""DSv4 attention state in vLLM-allocated paged caches: the paged ``KVStore`` of ``model/attention.py``.

Every attention layer (trunk and MTP) owns two cache *layers* that vLLM allocates and block-manages:

- ``...attn.kv_window`` (``SlidingWindowMLASpec``): one fp32 row per token position with the K=V latent and,
  on compressed layers, the compressor's (and indexer compressor's) projected ``kv``/``gate`` rows of that
  token. The window covers the attention window and the 2r (CSA) / r (plain) rows a compressed entry needs,
  so vLLM frees older blocks.
- ``...attn.kv_compressed`` (``MLAAttentionSpec``, compressed layers only): compressed entry ``w`` (and the
  CSA indexer's key ``w``) in the row of position ``(w + 1) * r - 1``, the last token of its window.

This module only stores and locates (block tables, slots); ``Attention.forward`` does every step of the math.
Why rejected draft tokens need no rollback: everything is keyed by token position (``slot_mapping`` is per
token). A step first writes the rows of its own tokens, then (re)computes every entry whose window *ends*
inside the step from the rows now in the cache, then attends. A query at ``p`` only reads rows/entries of
positions ``<= p``, which this step or an accepted earlier step wrote; positions written by rejected drafts
are rewritten by the step that re-processes them before anything reads them.

Rows are fp32 (the portable compressor's precision); latents and entries are stored exactly (fp32 holds any
bf16/fp16 value). All layers use one row width ``W`` so every page has the same size and vLLM needs no
page unification: simple and robust, at the price of unused columns (see docs/vllm-plugin.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import torch
from torch import nn

from ..config import DSV4Config
from ..model.attention import history
from ..model.compressor import CSA_RATIO
from ..model.kv_store import Pair, Rows, Segment

__all__ = ["RowLayout", "PagedKV", "StepInputs", "cache_geometry"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class RowLayout:
    """Column ranges of one layer's window row and compressed row."""

    head_dim: int
    comp_width: int            # c * head_dim of the compressor rows (0 on sliding layers)
    index_width: int           # 2 * index_head_dim of the indexer compressor rows (0 unless CSA)
    index_dim: int             # index_head_dim (0 unless CSA)

    @classmethod
    def of(cls, cfg: DSV4Config, ratio: int) -> RowLayout:
        d = cfg.head_dim
        comp = 0 if ratio == 0 else (2 if ratio == CSA_RATIO else 1) * d
        csa = ratio == CSA_RATIO
        return cls(d, comp, 2 * cfg.index_head_dim if csa else 0, cfg.index_head_dim if csa else 0)

    @property
    def window_width(self) -> int:         # kv | comp kv | comp gate | index kv | index gate
        return self.head_dim + 2 * self.comp_width + 2 * self.index_width

    @property
    def index_start(self) -> int:
        return self.head_dim + 2 * self.comp_width

    @property
    def compressed_width(self) -> int:     # entry | index key
        return self.head_dim + self.index_dim


def cache_geometry(cfg: DSV4Config) -> tuple[int, int]:
    """``(row width W, sliding window in tokens)`` shared by every cache layer of this config.

    One W for all layers (trunk and MTP) keeps page sizes equal; the window is a step's token plus the
    positions before it that attention reads (``attention.history``: the attention window, the rows a
    compressed entry is pooled from).
    """
    ratios = set(cfg.compress_ratios)
    width = max(max(RowLayout.of(cfg, r).window_width, RowLayout.of(cfg, r).compressed_width) for r in ratios)
    return width, 1 + max(history(cfg, r) for r in ratios)


class StepInputs:
    """Per-forward inputs every layer of one model reads (set by the model's ``forward`` via :meth:`begin`).

    ``memo`` holds what every layer of the step would otherwise recompute from the same metadata: each
    request's token range, the (block, offset) of the rows and entries read, the masks. It is
    keyed by the metadata object (vLLM gives all layers of one KV-cache group the same one) and emptied at
    the start of every forward, so nothing outlives the step it was computed for.
    """

    positions: torch.Tensor | None = None

    def __init__(self) -> None:
        self.memo: dict[tuple, object] = {}

    def begin(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self.memo.clear()

    def cached(self, key: tuple, make: Callable[[], _T]) -> _T:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]  # type: ignore[return-value]


@lru_cache(maxsize=None)
def _cache_layer_cls() -> type[nn.Module]:
    """The cache-layer class, created on first use so importing this module does not import vLLM."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

    from .backend import DSV4CacheBackend

    class CacheLayer(nn.Module, AttentionLayerBase):
        """One vLLM-managed cache, registered in the static forward context under ``name`` so the runner
        allocates it from our spec, binds the view and builds our metadata for it."""

        def __init__(self, name: str, kind: str, width: int, window: int, block_size: int) -> None:
            super().__init__()
            self.layer_name, self.kind, self.width, self.kv_cache = name, kind, width, torch.tensor([])
            common = dict(block_size=block_size, num_kv_heads=1, head_size=width, dtype=torch.float32,
                          max_tp_shards=1)
            self.spec = (SlidingWindowMLASpec(sliding_window=window, **common) if kind == "window"
                         else MLAAttentionSpec(**common))
            ctx = get_current_vllm_config().compilation_config.static_forward_context
            if name in ctx:
                raise ValueError(f"duplicate attention cache layer name {name!r}")
            ctx[name] = self

        def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
            if kv_cache.dim() != 4 or kv_cache.shape[1] != 1 or kv_cache.shape[3] != self.width:
                raise ValueError(f"{self.layer_name}: expected a [blocks, 1, block_size, {self.width}] cache "
                                 f"view, got {list(kv_cache.shape)}")
            self.kv_cache = kv_cache

        def get_kv_cache_spec(self, vllm_config: object) -> object:
            return self.spec

        def get_attn_backend(self) -> type:
            return DSV4CacheBackend

        def extra_repr(self) -> str:
            return f"{self.layer_name}: {self.kind}, width={self.width}"

    return CacheLayer


def _locate(cache: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of token positions ``pos`` through one request's block-table row."""
    bs = cache.shape[2]
    return table[pos // bs].long(), pos % bs


@dataclass(frozen=True)
class _Step:
    """What :meth:`PagedKV.begin` found for the step being computed (valid until the next ``begin``)."""

    mw: object                  # metadata of the window cache's KV-cache group
    mc: object | None           # ... of the compressed cache's group (compressed layers)
    dtype: torch.dtype          # the model's: latents and entries are read back in it


class PagedKV(nn.Module):
    """The :class:`~vllm_deepseek_v4.model.kv_store.KVStore` of one attention layer in vLLM's paged caches.

    It stores and locates only (block tables, slots); what depends only on the step's metadata (token
    spans, slots of a position range) is computed by the first layer that asks and shared with the others
    through ``StepInputs.memo``, like the masks ``Attention`` asks it to keep (:meth:`memo`).
    """

    def __init__(self, cfg: DSV4Config, ratio: int, prefix: str, step: StepInputs, block_size: int) -> None:
        super().__init__()
        self.cfg, self.ratio, self.inputs = cfg, ratio, step
        self.layout = RowLayout.of(cfg, ratio)
        width, window = cache_geometry(cfg)
        layer = _cache_layer_cls()
        self.row_cache = layer(f"{prefix}.kv_window", "window", width, window, block_size)
        self.entry_cache = layer(f"{prefix}.kv_compressed", "compressed", width, window, block_size) if ratio else None
        self._step: _Step | None = None

    # ---- the KVStore interface ----
    def begin(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[Segment]] | None:
        """Positions and requests come from vLLM (``start`` is unused); ``None`` only without any metadata."""
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None                  # profiling / dummy run: no cache is bound to this batch
        layers = [c.layer_name for c in (self.row_cache, self.entry_cache) if c is not None]
        missing = [n for n in layers if n not in metadata]
        if missing:                      # a real step that skipped this layer would attend to nothing
            raise RuntimeError(f"{missing[0]}: no attention metadata for this cache layer in this step "
                               f"(the step has metadata for {len(metadata)} other layers)")
        mw = metadata[layers[0]]
        self._step = _Step(mw, metadata[layers[1]] if len(layers) > 1 else None, x.dtype)
        return self.inputs.cached(("step", id(mw)), lambda: self._positions(mw))

    def write(self, rows: Rows) -> None:
        # one fp32 row per token: latent | compressor kv | gate | indexer kv | gate (``RowLayout``)
        pairs = [p for p in (rows.comp, rows.index) if p is not None]
        flat = torch.cat([rows.latent[0].float()] + [t[0] for p in pairs for t in p], dim=-1)
        blk, off, valid = self.inputs.cached(("slots", id(self._meta.mw)), self._slots)
        self.row_cache.kv_cache[blk, 0, off, : flat.shape[-1]] = flat[valid]

    def window(self, seg: Segment, first: int) -> torch.Tensor:
        blk, off = self._rows_at(seg, first, seg.e)
        return self.row_cache.kv_cache[blk, 0, off, : self.layout.head_dim].to(self._meta.dtype)[None]

    def pool_rows(self, seg: Segment, first: int, end: int) -> tuple[Pair, Pair | None]:
        blk, off = self._rows_at(seg, first, end)
        rows = self.row_cache.kv_cache[blk, 0, off][None]                        # [1, n, W]
        lay = self.layout
        c0, cw, i0, iw = lay.head_dim, lay.comp_width, lay.index_start, lay.index_width
        index = (rows[..., i0:i0 + iw], rows[..., i0 + iw:i0 + 2 * iw]) if iw else None
        return (rows[..., c0:c0 + cw], rows[..., c0 + cw:c0 + 2 * cw]), index

    def write_entries(self, seg: Segment, first: int, new: list[torch.Tensor]) -> None:
        blk, off = self._entries_at(seg, first, first + new[0].shape[1])
        row = torch.cat([n[0].float() for n in new], dim=-1)                      # entry | index key
        self._ccache()[blk, 0, off, : self.layout.compressed_width] = row

    def entries(self, seg: Segment, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        blk, off = self._entries_at(seg, 0, n)
        stored, lay, dtype = self._ccache()[blk, 0, off], self.layout, self._meta.dtype     # [n, W]
        index_keys = stored[:, lay.head_dim: lay.compressed_width].to(dtype)[None] if lay.index_dim else None
        return stored[:, : lay.head_dim].to(dtype)[None], index_keys

    def memo(self, key: tuple, make: Callable[[], _T]) -> _T:
        return self.inputs.cached((id(self._meta.mw), *key), make)

    def release(self, seg: Segment, before: int) -> None:
        """Nothing to do: vLLM frees the blocks that fall out of the sliding window (``cache_geometry``)."""

    # ---- where things are (per step, shared by every layer through ``inputs.memo``) ----
    @property
    def _meta(self) -> _Step:
        assert self._step is not None, "begin() first"
        return self._step

    def _ccache(self) -> torch.Tensor:
        assert self.entry_cache is not None
        return self.entry_cache.kv_cache

    def _positions(self, mw: object) -> tuple[torch.Tensor, list[Segment]]:
        T = mw.num_actual_tokens  # type: ignore[attr-defined]
        assert self.inputs.positions is not None, "the model's forward sets the step positions"
        pos = self.inputs.positions[:T].long()
        starts, plist = mw.query_start_loc.tolist(), pos.tolist()  # type: ignore[attr-defined]
        segments = []
        for i in range(mw.num_reqs):  # type: ignore[attr-defined]
            a, b = starts[i], starts[i + 1]
            if b <= a:
                continue
            s = plist[a]
            if plist[b - 1] != s + (b - a) - 1:
                raise ValueError(f"{self.row_cache.layer_name}: request {i} has non-contiguous positions "
                                 f"{plist[a:b][:8]}...; each request's scheduled tokens must be consecutive")
            segments.append(Segment(i, a, b, s, s + b - a))
        return pos, segments

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block, offset) of the step's tokens with a slot, and which tokens have one (-1: padding)."""
        mw = self._meta.mw
        slots = mw.slot_mapping[: mw.num_actual_tokens]  # type: ignore[attr-defined]
        valid = slots >= 0
        slots = slots[valid].long()
        bs = self.row_cache.kv_cache.shape[2]
        return slots // bs, slots % bs, valid

    def _rows_at(self, seg: Segment, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of the rows of positions ``first .. end - 1``."""
        mw, cache = self._meta.mw, self.row_cache.kv_cache
        table = mw.block_table  # type: ignore[attr-defined]
        return self.inputs.cached(("rows", id(mw), seg.req, first, end), lambda: _locate(
            cache, table[seg.req], torch.arange(first, end, device=cache.device)))

    def _entries_at(self, seg: Segment, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of entries ``first .. end - 1``: entry ``w`` is in the row of position
        ``(w + 1) r - 1``, the last token of its window."""
        mc, cache, r = self._meta.mc, self._ccache(), self.ratio
        table = mc.block_table  # type: ignore[attr-defined]
        return self.inputs.cached(("entries", id(mc), r, seg.req, first, end), lambda: _locate(
            cache, table[seg.req], (torch.arange(first, end, device=cache.device) + 1) * r - 1))
