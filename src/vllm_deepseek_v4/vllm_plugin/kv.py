"""DSv4 attention state in vLLM-allocated paged caches: the paged ``KVStore`` of ``model/attention.py``.

Every attention layer (trunk and MTP) owns up to three cache *layers* that vLLM allocates and block-manages,
each of its own kind (``kv_layout``: row widths, block sizes, the shared page):

- ``...attn.kv_window`` (``SlidingWindowMLASpec``): one fp32 row per token position with the K=V latent and,
  on compressed layers, the compressor's (and indexer compressor's) projected ``kv``/``gate`` rows of that
  token. The window covers the attention window and the rows a compressed entry is pooled from, so vLLM
  frees older blocks.
- ``...attn.kv_compressed`` (``MLAAttentionSpec``, ``tokens_per_state = r``, compressed layers): entry ``w``
  is state ``w`` of the request's blocks of that group (block ``w // n``, offset ``w % n`` for ``n`` states
  per block), located through the group's block table.
- ``...attn.kv_index`` (likewise, CSA layers): the indexer's key of entry ``w``.

This module only stores and locates (block tables, slots); ``Attention.forward`` does every step of the math.
Why rejected draft tokens need no rollback: everything is keyed by token position (``slot_mapping`` is per
token, entry ``w`` covers positions ``w r .. (w + 1) r - 1``). A step first writes the rows of its own tokens,
then (re)computes every entry whose window *ends* inside the step from the rows now in the cache, then
attends. A query at ``p`` only reads rows/entries of positions ``<= p``, which this step or an accepted
earlier step wrote; positions written by rejected drafts are rewritten by the step that re-processes them
before anything reads them.

Rows are fp32 (the portable compressor's precision); latents and entries are stored exactly (fp32 holds any
bf16/fp16 value).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import torch
from torch import nn

from ..config import DSV4Config
from ..model.kv_store import Entries, Pair, Rows, Segment
from .kv_layout import CacheGeometry, CacheKind, RowLayout, cache_geometry, layer_kinds

__all__ = ["PagedKV", "StepInputs"]

_T = TypeVar("_T")


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

        def __init__(self, name: str, kind: CacheKind, geometry: CacheGeometry) -> None:
            super().__init__()
            self.layer_name, self.kind, self.kv_cache = name, kind, torch.tensor([])
            self.states = geometry.states_per_block(kind)
            # Blocks are whole rows (``block_stride_alignment``): vLLM merges window specs into one group
            # unless a field its merge compares differs, and kinds of other widths have other block sizes.
            common = dict(block_size=geometry.block_size(kind), num_kv_heads=1, head_size=kind.width,
                          dtype=torch.float32, max_tp_shards=1, block_stride_alignment=kind.state_bytes)
            self.spec = (SlidingWindowMLASpec(sliding_window=geometry.window, **common) if kind.sliding
                         else MLAAttentionSpec(tokens_per_state=kind.tokens_per_state, **common))
            assert self.spec.page_size_bytes == geometry.page_bytes, (self.spec, geometry)
            ctx = get_current_vllm_config().compilation_config.static_forward_context
            if name in ctx:
                raise ValueError(f"duplicate attention cache layer name {name!r}")
            ctx[name] = self

        def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
            want = [1, self.states, self.kind.width]
            if kv_cache.dim() != 4 or list(kv_cache.shape[1:]) != want:
                raise ValueError(f"{self.layer_name}: expected a [blocks, {', '.join(map(str, want))}] cache "
                                 f"view, got {list(kv_cache.shape)}")
            self.kv_cache = kv_cache

        def get_kv_cache_spec(self, vllm_config: object) -> object:
            return self.spec

        def get_attn_backend(self) -> type:
            return DSV4CacheBackend

        def extra_repr(self) -> str:
            return (f"{self.layer_name}: width={self.kind.width}, {self.kind.tokens_per_state} token(s)/state, "
                    f"{self.states} states/block")

    return CacheLayer


def _locate(cache: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of states ``index`` (token positions of a window cache, entry numbers of an entry cache)
    through one request's block-table row: ``cache.shape[2]`` states per block."""
    n = cache.shape[2]
    return table[index // n].long(), index % n


def _locate_spans(cache: torch.Tensor, table: torch.Tensor, spans: tuple[tuple[int, int, int], ...]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_locate` of several requests' ranges at once, concatenated: ``spans`` = (request's block-table
    row, first, end) -- one index op for a whole step instead of one per request."""
    device, lengths = cache.device, [e - f for _, f, e in spans]
    count = torch.tensor(lengths, dtype=torch.long, device=device)
    span = torch.repeat_interleave(torch.arange(len(spans), device=device), count)   # each state's span
    first = torch.tensor([f for _, f, _ in spans], dtype=torch.long, device=device)
    index = torch.arange(sum(lengths), device=device) - (torch.cumsum(count, 0) - count)[span] + first[span]
    req = torch.tensor([r for r, _, _ in spans], dtype=torch.long, device=device)
    n = cache.shape[2]
    return table[req[span], index // n].long(), index % n


@dataclass(frozen=True)
class _Step:
    """What :meth:`PagedKV.begin` found for the step being computed (valid until the next ``begin``)."""

    mw: object                  # metadata of the window cache's KV-cache group
    mc: object | None           # ... of the entry cache's group (compressed layers)
    mi: object | None           # ... of the indexer-key cache's group (CSA layers)
    dtype: torch.dtype          # the model's: latents and entries are read back in it


class PagedKV(nn.Module):
    """The :class:`~vllm_deepseek_v4.model.kv_store.KVStore` of one attention layer in vLLM's paged caches.

    It stores and locates only (block tables, slots); what depends only on the step's metadata (token
    spans, slots of a position range) is computed by the first layer that asks and shared with the others
    through ``StepInputs.memo``, like the masks ``Attention`` asks it to keep (:meth:`memo`).
    ``block_size`` (vLLM's configured one) is not used: each cache kind has its own (``kv_layout``).
    """

    def __init__(self, cfg: DSV4Config, ratio: int, prefix: str, step: StepInputs, block_size: int) -> None:
        super().__init__()
        self.cfg, self.ratio, self.inputs = cfg, ratio, step
        self.layout = RowLayout.of(cfg, ratio)
        geometry, layer = cache_geometry(cfg), _cache_layer_cls()
        caches = {k.suffix: layer(f"{prefix}.{k.suffix}", k, geometry) for k in layer_kinds(cfg, ratio)}
        self.row_cache = caches["kv_window"]
        self.entry_cache, self.index_cache = caches.get("kv_compressed"), caches.get("kv_index")
        self._step: _Step | None = None

    # ---- the KVStore interface ----
    def begin(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[Segment]] | None:
        """Positions and requests come from vLLM (``start`` is unused); ``None`` only without any metadata."""
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None                  # profiling / dummy run: no cache is bound to this batch
        layers = [c.layer_name if c is not None else None for c in (self.row_cache, self.entry_cache,
                                                                      self.index_cache)]
        missing = [n for n in layers if n is not None and n not in metadata]
        if missing:                      # a real step that skipped this layer would attend to nothing
            raise RuntimeError(f"{missing[0]}: no attention metadata for this cache layer in this step "
                               f"(the step has metadata for {len(metadata)} other layers)")
        mw, mc, mi = (metadata[n] if n is not None else None for n in layers)
        self._step = _Step(mw, mc, mi, x.dtype)
        return self.inputs.cached(("step", id(mw)), lambda: self._positions(mw))

    def write(self, rows: Rows) -> None:
        # one fp32 row per token: latent | compressor kv | gate | indexer kv | gate (``RowLayout``)
        pairs = [p for p in (rows.comp, rows.index) if p is not None]
        flat = torch.cat([rows.latent[0].float()] + [t[0] for p in pairs for t in p], dim=-1)
        blk, off, valid = self.inputs.cached(("slots", id(self._meta.mw)), self._slots)
        self.row_cache.kv_cache[blk, 0, off] = flat[valid]

    def windows(self, segments: list[Segment], firsts: list[int]) -> list[torch.Tensor]:
        spans = tuple((sg.req, f, sg.e) for sg, f in zip(segments, firsts))
        rows = self._gather(self.row_cache, self._meta.mw, spans)[..., : self.layout.head_dim]
        return [w[None] for w in rows.to(self._meta.dtype).split([e - f for _, f, e in spans])]

    def pool_rows(self, seg: Segment, first: int, end: int) -> tuple[Pair, Pair | None]:
        blk, off = self._rows_at(seg, first, end)
        rows = self.row_cache.kv_cache[blk, 0, off][None]                        # [1, n, window width]
        lay = self.layout
        c0, cw, i0, iw = lay.head_dim, lay.comp_width, lay.index_start, lay.index_width
        index = (rows[..., i0:i0 + iw], rows[..., i0 + iw:i0 + 2 * iw]) if iw else None
        return (rows[..., c0:c0 + cw], rows[..., c0 + cw:c0 + 2 * cw]), index

    def write_entries(self, seg: Segment, first: int, new: list[torch.Tensor]) -> None:
        end = first + new[0].shape[1]
        for layer, meta, values in zip(self._entry_layers(), (self._meta.mc, self._meta.mi), new):
            blk, off = self._entries_at(layer, meta, seg, first, end)
            layer.kv_cache[blk, 0, off] = values[0].float()

    def entries(self, segments: list[Segment], counts: list[int]) -> list[Entries]:
        spans = tuple((sg.req, 0, n) for sg, n in zip(segments, counts))
        read = [[t[None] for t in self._gather(layer, meta, spans).to(self._meta.dtype).split(counts)]
                for layer, meta in zip(self._entry_layers(), (self._meta.mc, self._meta.mi))]
        return list(zip(read[0], read[1] if len(read) > 1 else [None] * len(counts)))

    def memo(self, key: tuple, make: Callable[[], _T]) -> _T:
        return self.inputs.cached((id(self._meta.mw), *key), make)

    def release(self, seg: Segment, before: int) -> None:
        """Nothing to do: vLLM frees the blocks that fall out of the sliding window (``kv_layout``)."""

    # ---- where things are (per step, shared by every layer through ``inputs.memo``) ----
    @property
    def _meta(self) -> _Step:
        assert self._step is not None, "begin() first"
        return self._step

    def _entry_layers(self) -> list[nn.Module]:
        assert self.entry_cache is not None, "entries of a sliding-window layer"
        return [self.entry_cache] + ([self.index_cache] if self.index_cache is not None else [])

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

    def _gather(self, layer: nn.Module, meta: object, spans: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        """The states of ``spans`` (request, first, end) of ``layer`` (its group's metadata ``meta``),
        concatenated ``[sum of lengths, width]`` fp32; where they are is computed once per step."""
        cache, table = layer.kv_cache, meta.block_table  # type: ignore[attr-defined]
        blk, off = self.inputs.cached(("spans", id(meta), cache.shape[2], spans),
                                      lambda: _locate_spans(cache, table, spans))
        return cache[blk, 0, off]

    def _entries_at(self, layer: nn.Module, meta: object, seg: Segment, first: int,
                    end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of entries ``first .. end - 1`` in ``layer`` (its group's metadata ``meta``)."""
        cache, table = layer.kv_cache, meta.block_table  # type: ignore[attr-defined]
        return self.inputs.cached(("entries", id(meta), seg.req, first, end), lambda: _locate(
            cache, table[seg.req], torch.arange(first, end, device=cache.device)))
