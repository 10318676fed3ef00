"""Where an attention layer keeps its keys: the storage interface :class:`KVStore` and its in-process
implementation :class:`AttnCache` (the vLLM plugin's paged caches are the other one, ``vllm_plugin/kv.py``).

A store only stores and locates; every step of the math -- which positions the window reads, its mask,
which compressed entries end in a step and what they pool, their visibility, the indexer's top-k -- is
``attention.py``'s. What a layer stores per token position is its :class:`Rows`; what it stores per
compressed entry is the entry (and, on CSA layers, the indexer's key). Everything is addressed by token
position, within one :class:`Segment` (one request's consecutive tokens of a step).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from ..errors import DSV4Error

__all__ = ["Pair", "Entries", "Segment", "Rows", "KVStore", "AttnCache"]

_T = TypeVar("_T")
Pair = tuple[torch.Tensor, torch.Tensor]      # a compressor's projected (kv, gate) rows, fp32
Entries = tuple[torch.Tensor, torch.Tensor | None]    # one request's entries [, the indexer's keys], model dtype


@dataclass(frozen=True)
class Segment:
    """One request's tokens in a step: rows ``[a, b)`` of the step's token axis, at positions ``[s, e)``."""

    req: int
    a: int
    b: int
    s: int
    e: int


@dataclass(frozen=True)
class Rows:
    """What a layer stores per token position: the roped K=V latent ``[B, T, d]`` (model dtype) and, on
    compressed layers, the compressor's (and on CSA layers the indexer compressor's) projected rows."""

    latent: torch.Tensor
    comp: Pair | None = None
    index: Pair | None = None


class KVStore(Protocol):
    """The cache of one attention layer, as :meth:`Attention.forward` uses it.

    Per step: :meth:`begin`, :meth:`write` every token's rows, :meth:`windows` of every segment, per segment
    :meth:`pool_rows` / :meth:`write_entries` for the entries that end in it, :meth:`entries` of every
    segment, then per segment :meth:`release`. Reads take all segments at once so a store with many requests
    per step can gather them together. Tensors are ``[B, n, ...]`` (the in-process store: B rows at the same
    positions, one segment; the paged store: B = 1).
    """

    def begin(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[Segment]] | None:
        """Start a step over ``x [B, T', D]`` (``start``: the in-process position of its first token) ->
        ``(positions [T] of the real tokens, T <= T', their segments)``; ``None`` when no cache is bound to
        this batch (vLLM's profiling runs), where the layer's output does not matter."""

    def write(self, rows: Rows) -> None:
        """Store the rows of the step's ``T`` tokens at their positions."""

    def windows(self, segments: list[Segment], firsts: list[int]) -> list[torch.Tensor]:
        """Per segment, the latents of positions ``first .. seg.e - 1`` ``[B, n, d]`` (model dtype)."""

    def pool_rows(self, seg: Segment, first: int, end: int) -> tuple[Pair, Pair | None]:
        """The compressor's and the indexer compressor's rows of positions ``first .. end - 1``."""

    def write_entries(self, seg: Segment, first: int, new: list[torch.Tensor]) -> None:
        """Store entries ``first ..`` (``new``: the compressor's ``[B, n, hd]``, then the indexer's keys)."""

    def entries(self, segments: list[Segment], counts: list[int]) -> list[Entries]:
        """Per segment, its entries ``0 .. n - 1`` (and the indexer's keys on CSA layers), ``n > 0``."""

    def memo(self, key: tuple, make: Callable[[], _T]) -> _T:
        """``make()``, or what it returned for ``key`` in this step if the store shares it between layers."""

    def release(self, seg: Segment, before: int) -> None:
        """Rows of positions ``< before`` will not be read again (entries always are)."""


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat((old, new), dim=1)


def _cat_pair(old: Pair | None, new: Pair | None) -> Pair | None:
    return old if new is None else new if old is None else (_cat(old[0], new[0]), _cat(old[1], new[1]))


@dataclass
class AttnCache:
    """In-process :class:`KVStore`: the rows of positions ``start .. end - 1`` (only as many as attention
    still reads: it releases the rest) and every compressed entry. All batch rows share positions."""

    start: int = 0
    end: int = 0
    latent: torch.Tensor | None = None          # [B, n, d] model dtype
    comp: Pair | None = None                    # fp32 [B, n, c*hd] each
    index: Pair | None = None
    compressed: list[torch.Tensor] = field(default_factory=list)   # entries [, index keys] [B, n_entries, .]

    def begin(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, list[Segment]]:
        # Rows are appended, so a step continues where the last one ended (a rollback is a snapshot).
        if start != self.end:
            raise DSV4Error(f"AttnCache: a step at position {start}, but the cache holds positions up to "
                            f"{self.end}", hint="feed tokens in order; roll back with speculative.snapshot_state")
        S = x.shape[1]
        return torch.arange(start, start + S, device=x.device), [Segment(0, 0, S, start, start + S)]

    def write(self, rows: Rows) -> None:
        self.latent = _cat(self.latent, rows.latent)
        self.comp, self.index = _cat_pair(self.comp, rows.comp), _cat_pair(self.index, rows.index)
        self.end += rows.latent.shape[1]

    def windows(self, segments: list[Segment], firsts: list[int]) -> list[torch.Tensor]:
        assert self.latent is not None and min(firsts) >= self.start, "attention released rows it still reads"
        # contiguous like a freshly concatenated window (a slice of the rows is not, for B > 1)
        return [self.latent[:, f - self.start: sg.e - self.start].contiguous() for sg, f in zip(segments, firsts)]

    def pool_rows(self, seg: Segment, first: int, end: int) -> tuple[Pair, Pair | None]:
        assert self.comp is not None and first >= self.start, "attention released rows it still pools"
        a, b = first - self.start, end - self.start
        return ((self.comp[0][:, a:b], self.comp[1][:, a:b]),
                None if self.index is None else (self.index[0][:, a:b], self.index[1][:, a:b]))

    def write_entries(self, seg: Segment, first: int, new: list[torch.Tensor]) -> None:
        # Windows complete in position order and are never recomputed here, so entries only append.
        assert first == (self.compressed[0].shape[1] if self.compressed else 0)
        self.compressed = [_cat(old, n) for old, n in zip(self.compressed or [None] * len(new), new)]

    def entries(self, segments: list[Segment], counts: list[int]) -> list[Entries]:
        assert self.compressed and all(self.compressed[0].shape[1] == n for n in counts)
        return [(self.compressed[0], self.compressed[1] if len(self.compressed) > 1 else None) for _ in counts]

    def memo(self, key: tuple, make: Callable[[], _T]) -> _T:
        return make()                          # one layer per store: nothing to share

    def release(self, seg: Segment, before: int) -> None:
        drop = before - self.start
        if drop <= 0 or self.latent is None:
            return
        self.latent = self.latent[:, drop:]
        self.comp = None if self.comp is None else (self.comp[0][:, drop:], self.comp[1][:, drop:])
        self.index = None if self.index is None else (self.index[0][:, drop:], self.index[1][:, drop:])
        self.start = before

    def snapshot(self) -> AttnCache:
        """A copy to roll back to (tensors cloned, so it survives any later update of either)."""
        def pair(p: Pair | None) -> Pair | None:
            return None if p is None else (p[0].clone(), p[1].clone())
        return AttnCache(self.start, self.end, None if self.latent is None else self.latent.clone(),
                         pair(self.comp), pair(self.index), [t.clone() for t in self.compressed])
