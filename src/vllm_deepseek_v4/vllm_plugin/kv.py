"""DSv4 attention state in vLLM-allocated paged caches, computed with our portable modules' math.

Every attention layer (trunk and MTP) owns two cache *layers* that vLLM allocates and block-manages:

- ``...attn.kv_window`` (``SlidingWindowMLASpec``): one fp32 row per token position with the K=V latent and,
  on compressed layers, the compressor's (and indexer compressor's) projected ``kv``/``gate`` rows of that
  token. The window covers the attention window and the 2r (CSA) / r (plain) rows a compressed entry needs,
  so vLLM frees older blocks.
- ``...attn.kv_compressed`` (``MLAAttentionSpec``, compressed layers only): compressed entry ``w`` (and the
  CSA indexer's key ``w``) in the row of position ``(w + 1) * r - 1``, the last token of its window.

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
from ..model.attention import Attention
from ..model.compressor import CSA_RATIO

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
    def compressed_width(self) -> int:     # entry | index key
        return self.head_dim + self.index_dim


def cache_geometry(cfg: DSV4Config) -> tuple[int, int]:
    """``(row width W, sliding window in tokens)`` shared by every cache layer of this config.

    One W for all layers (trunk and MTP) keeps page sizes equal; the window covers the attention window
    and the rows a compressed entry is pooled from (2r for the overlapping CSA compressor, r otherwise).
    """
    ratios = set(cfg.compress_ratios)
    width = max(max(RowLayout.of(cfg, r).window_width, RowLayout.of(cfg, r).compressed_width) for r in ratios)
    need = [cfg.window_size] + [2 * r if r == CSA_RATIO else r for r in ratios if r > 0]
    return width, max(need)


class StepInputs:
    """Per-forward inputs every layer of one model reads (set by the model's ``forward`` via :meth:`begin`).

    ``memo`` holds what every layer of the step would otherwise recompute from the same metadata: each
    request's token range, the window rows' (block, offset) and mask, the compressed entries' slots. It is
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
class _Span:
    """One request's scheduled tokens: batch rows ``[a, b)`` at positions ``[s, e)``."""

    req: int
    a: int
    b: int
    s: int
    e: int


@dataclass(frozen=True)
class _WindowGeometry:
    """Where a request's window keys live and which queries see them (the same for every layer)."""

    blk: torch.Tensor
    off: torch.Tensor
    mask: torch.Tensor          # [1, S, n_keys]


@dataclass(frozen=True)
class _CompressedGeometry:
    """Slots of a request's compressed entries for one ratio ``r`` (the same for every layer with that r)."""

    lo: int                                         # first window row pooled (CSA overlaps one window back)
    first: int                                      # first entry (re)computed this step
    # ((block, offset) of the window rows pooled, (block, offset) the new entries go to); None: no entry ends here
    new: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    all_slots: tuple[torch.Tensor, torch.Tensor]    # entries 0..e//r-1
    visible: torch.Tensor                           # [1, S, e//r] completed-window visibility


class PagedKV(nn.Module):
    """The :class:`~vllm_deepseek_v4.model.attention.ExternalKV` of one attention layer."""

    def __init__(self, cfg: DSV4Config, ratio: int, prefix: str, step: StepInputs, block_size: int) -> None:
        super().__init__()
        self.cfg, self.ratio, self.step = cfg, ratio, step
        self.layout = RowLayout.of(cfg, ratio)
        width, window = cache_geometry(cfg)
        layer = _cache_layer_cls()
        self.window = layer(f"{prefix}.kv_window", "window", width, window, block_size)
        self.compressed = layer(f"{prefix}.kv_compressed", "compressed", width, window, block_size) if ratio else None

    # ---- the ExternalKV protocol ----
    def attend(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """``x [1, T, D]`` (normed input of all scheduled tokens, requests back to back) -> ``[1, T, D]``."""
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or self.window.layer_name not in metadata:
            return x.new_zeros(x.shape)          # profiling / dummy run: no cache is bound to this batch
        mw = metadata[self.window.layer_name]
        mc = metadata[self.compressed.layer_name] if self.compressed is not None else None
        T = mw.num_actual_tokens
        assert self.step.positions is not None, "the model's forward sets the step positions"
        pos = self.step.positions[:T].long()
        xs = x[:, :T]
        q, qr, kv = attn.project(xs, pos)
        self._write_rows(attn, xs, kv, mw.slot_mapping[:T])
        outs = [self._request(attn, sp, xs[:, sp.a:sp.b], q[:, sp.a:sp.b], qr[:, sp.a:sp.b], pos[sp.a:sp.b], mw, mc)
                for sp in self.step.cached(("spans", id(mw)), lambda: self._spans(mw, pos))]
        out = torch.cat(outs, dim=1) if outs else x.new_zeros(1, 0, x.shape[-1])
        if x.shape[1] > T:                        # padded batch: the padding rows compute nothing
            out = torch.cat((out, x.new_zeros(1, x.shape[1] - T, out.shape[-1])), dim=1)
        return out

    # ---- per-step geometry (computed by the first layer, reused by the others through ``step.memo``) ----
    def _spans(self, mw: object, pos: torch.Tensor) -> list[_Span]:
        starts = mw.query_start_loc.tolist()  # type: ignore[attr-defined]
        plist = pos.tolist()
        spans = []
        for i in range(mw.num_reqs):  # type: ignore[attr-defined]
            a, b = starts[i], starts[i + 1]
            if b <= a:
                continue
            s = plist[a]
            if plist[b - 1] != s + (b - a) - 1:
                raise ValueError(f"{self.window.layer_name}: request {i} has non-contiguous positions "
                                 f"{plist[a:b][:8]}...; each request's scheduled tokens must be consecutive")
            spans.append(_Span(i, a, b, s, s + b - a))
        return spans

    def _window_geometry(self, sp: _Span, qpos: torch.Tensor, table: torch.Tensor) -> _WindowGeometry:
        w = self.cfg.window_size
        kpos = torch.arange(max(0, sp.s - w + 1), sp.e, device=qpos.device)
        blk, off = _locate(self.window.kv_cache, table, kpos)
        diff = qpos[:, None] - kpos[None, :]
        return _WindowGeometry(blk, off, ((diff >= 0) & (diff < w))[None])

    def _compressed_geometry(self, attn: Attention, sp: _Span, qpos: torch.Tensor, wtable: torch.Tensor,
                             ctable: torch.Tensor) -> _CompressedGeometry:
        r = self.ratio
        assert self.compressed is not None
        wcache, ccache = self.window.kv_cache, self.compressed.kv_cache
        dev = wcache.device
        wa, wb = sp.s // r, sp.e // r
        lo = max(wa - 1, 0) if r == CSA_RATIO else wa
        new = None
        if wb > wa:
            new = (_locate(wcache, wtable, torch.arange(lo * r, wb * r, device=dev)),
                   _locate(ccache, ctable, (torch.arange(wa, wb, device=dev) + 1) * r - 1))
        n = sp.e // r
        all_slots = _locate(ccache, ctable, (torch.arange(n, device=dev) + 1) * r - 1)
        return _CompressedGeometry(lo, wa, new, all_slots, attn.entry_visibility(qpos, n)[None])

    # ---- pieces ----
    def _write_rows(self, attn: Attention, x: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor) -> None:
        parts = [kv[0].float()]
        if self.ratio > 0:
            parts += list(attn.compressor.project(x))
        if self.ratio == CSA_RATIO:
            parts += list(attn.indexer.compressor.project(x))
        rows = torch.cat([p[0] if p.dim() == 3 else p for p in parts], dim=-1)
        cache = self.window.kv_cache
        valid = slots >= 0
        slots = slots[valid].long()
        bs = cache.shape[2]
        cache[slots // bs, 0, slots % bs, : rows.shape[-1]] = rows[valid]

    def _request(self, attn: Attention, sp: _Span, x: torch.Tensor, q: torch.Tensor, qr: torch.Tensor,
                 qpos: torch.Tensor, mw: object, mc: object) -> torch.Tensor:
        r, lay = self.ratio, self.layout
        wtable = mw.block_table[sp.req]  # type: ignore[attr-defined]
        g = self.step.cached(("window", id(mw), sp.req), lambda: self._window_geometry(sp, qpos, wtable))
        keys = self.window.kv_cache[g.blk, 0, g.off, : lay.head_dim].to(x.dtype)[None]   # [1, nk, d]
        mask = g.mask
        if r > 0:
            ctable = mc.block_table[sp.req]  # type: ignore[attr-defined]
            cg = self.step.cached(("compressed", id(mw), id(mc), sp.req, r),
                                  lambda: self._compressed_geometry(attn, sp, qpos, wtable, ctable))
            entries, index_keys = self._entries(attn, cg, x.dtype)
            picked = cg.visible
            if r == CSA_RATIO:
                picked = picked & attn.indexer.select(x, qr, index_keys, qpos)
            keys = torch.cat((keys, entries), dim=1)
            mask = torch.cat((mask, picked), dim=-1)
        return attn.attend(q, keys, mask, qpos)

    def _entries(self, attn: Attention, cg: _CompressedGeometry, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Re)compute the entries whose window ends in this step, store them, return all entries so far."""
        r, lay = self.ratio, self.layout
        assert self.compressed is not None
        wcache, ccache = self.window.kv_cache, self.compressed.kv_cache
        if cg.new is not None:
            (blk, off), (cblk, coff) = cg.new
            rows = wcache[blk, 0, off][None]                                          # [1, n*r, W]
            c0, cw = lay.head_dim, lay.comp_width
            new = [attn.compressor.pool(rows[..., c0:c0 + cw], rows[..., c0 + cw:c0 + 2 * cw], cg.lo, cg.first,
                                        dtype)]
            if r == CSA_RATIO:
                i0, iw = c0 + 2 * cw, lay.index_width
                new.append(attn.indexer.compressor.pool(rows[..., i0:i0 + iw], rows[..., i0 + iw:i0 + 2 * iw],
                                                        cg.lo, cg.first, dtype))
            ccache[cblk, 0, coff, : lay.compressed_width] = torch.cat([n[0].float() for n in new], dim=-1)
        cblk, coff = cg.all_slots
        stored = ccache[cblk, 0, coff]                                                # [n, W]
        entries = stored[:, : lay.head_dim].to(dtype)[None]
        index_keys = stored[:, lay.head_dim: lay.compressed_width].to(dtype)[None] if r == CSA_RATIO else None
        return entries, index_keys
