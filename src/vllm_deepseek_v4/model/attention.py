"""DSv4 attention: low-rank queries, one shared K=V latent, sliding window + compressed entries, sink.

``docs/dsv4-architecture.md`` §5. Per layer ratio ``r = compress_ratios[layer]``:

- ``r == 0``: sliding window only, plain RoPE (``rope_theta``);
- ``r == 4`` (CSA): window + the indexer's top-k among the completed compressed entries;
- other ``r > 0`` (HCA, 128): window + every completed compressed entry;
- ``r > 0`` layers use the YaRN-interpolated ``compress_rope_theta`` table for all their RoPE.

The window holds ``window_size`` keys including the query itself. K and V are the same latent, so RoPE is
undone on the output before the grouped low-rank output projection (``wo_a`` per group, then ``wo_b``).

This module is the only place the steps are written (project -> write -> pool -> select -> attend ->
output), for the in-process cache and vLLM's paged caches alike: both are a :class:`~.kv_store.KVStore`,
which only stores and locates rows and entries by token position. Only pool, select and attend read one
request's keys, so only they run per request segment; project and output are per token and run once per
step over all of its tokens (a vLLM step may hold hundreds of requests).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSV4Config
from ..kernels import dispatch
from ..quant.groups import scheme_of
from .compressor import CSA_RATIO, Compressor, Indexer, windows_pooled
from .kv_store import Entries, KVStore, Rows, Segment
from .linear import QLinear
from .parallel import SINGLE, Parallel
from .primitives import RMSNorm, apply_rope, rms_unweighted, rope_inv_freq

__all__ = ["Attention", "history"]


def history(cfg: DSV4Config, ratio: int) -> int:
    """How many positions before its first token a step reads: the window's ``window_size - 1`` keys, and
    the rows of every window an entry completed in the step pools (``windows_pooled(r) * r - 1`` back)."""
    return max(cfg.window_size - 1, windows_pooled(ratio) * ratio - 1 if ratio else 0)


class Attention(nn.Module):
    """``layers.N.attn``: ``attn_sink``, ``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``, ``wo_b``
    (+ ``compressor`` if ratio > 0, + ``indexer`` if ratio == 4)."""

    def __init__(self, cfg: DSV4Config, layer_id: int, schemes: dict[str, str], *, dtype: torch.dtype,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.cfg, self.ratio, self.par = cfg, cfg.ratio(layer_id), parallel
        d = cfg.head_dim
        # this rank's whole heads and whole output groups (TP); each group reads H*d/G of the head outputs
        self.n_heads, self.n_groups = len(parallel.heads(cfg)), len(parallel.groups(cfg))
        H, G = self.n_heads, self.n_groups
        s = scheme_of(schemes, "attn")
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32), requires_grad=False)
        self.wq_a = QLinear(cfg.dim, cfg.q_lora_rank, s, dtype=dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype=dtype)
        self.wq_b = QLinear(cfg.q_lora_rank, H * d, s, dtype=dtype)               # head-major rows
        self.wkv = QLinear(cfg.dim, d, s, dtype=dtype)
        self.kv_norm = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.wo_a = QLinear(H * d // G, G * cfg.o_lora_rank, s, dtype=dtype)       # grouped: [G*o_lora, H*d/G]
        self.wo_b = QLinear(G * cfg.o_lora_rank, cfg.dim, s, dtype=dtype)          # row-parallel: partial sums
        if self.ratio > 0:
            self.compressor = Compressor(cfg, self.ratio, d, scheme_of(schemes, "attn.compressor"), dtype=dtype)
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(cfg, schemes, dtype=dtype, parallel=parallel)

    def forward(self, x: torch.Tensor, start: int, cache: KVStore) -> torch.Tensor:
        """``x [B, S, D]`` (normed sub-layer input) at positions ``start..start+S-1`` -> ``[B, S, D]``.

        ``cache`` stores this layer's rows and entries: the in-process ``AttnCache`` (``start`` is where the
        tokens go) or the vLLM plugin's paged caches (``B = 1``; positions and requests come from vLLM's
        metadata, and tokens past the scheduled ones are padding, whose output is zero).
        """
        step = cache.begin(x, start)
        if step is None:                    # no cache bound to this batch (vLLM profiling): output unused
            return x.new_zeros(x.shape)
        pos, segments = step
        T = pos.shape[0]
        xs = x[:, :T]
        q, qr, kv = self.project(xs, pos)
        comp = self.compressor.project(xs) if self.ratio > 0 else None
        index = self.indexer.compressor.project(xs) if self.ratio == CSA_RATIO else None
        cache.write(Rows(kv, comp, index))
        if not segments:
            return x.new_zeros(x.shape)
        # Every request's window rows, then (once the entries that end in this step are pooled and stored)
        # every request's entries are read in one call each: the paged store gathers them with one index op.
        # The masks depend only on the step's positions: the paged store shares them between layers.
        firsts = [max(0, sg.s - self.cfg.window_size + 1) for sg in segments]
        windows = cache.windows(segments, firsts)                                  # positions first..e-1
        masks = cache.memo(("window", self.cfg.window_size), lambda: [
            self.window_mask(pos[sg.a:sg.b], f, sg.e) for sg, f in zip(segments, firsts)])
        entries: list[Entries | None] = [None] * len(segments)
        visible: list[torch.Tensor | None] = [None] * len(segments)
        if self.ratio > 0:
            entries = list(self._entries(cache, segments, xs))
            visible = list(cache.memo(("visible", self.ratio), lambda: [
                self.entry_visibility(pos[sg.a:sg.b], sg.e // self.ratio)[None] for sg in segments]))
        # Only the indexer's scores and the sink attention read a request's own keys; the index queries, RoPE
        # undoing and the output projections are per token, so they run once over the whole step (one GEMM
        # each, not one per request).
        index_q = self.indexer.queries(xs, qr, pos) if self.ratio == CSA_RATIO else None
        heads = []
        for sg, keys, mask, ent, vis in zip(segments, windows, masks, entries, visible):
            span = slice(sg.a, sg.b)
            iq = None if index_q is None else (index_q[0][:, span], index_q[1][:, span])
            heads.append(self._segment(q[:, span], keys, mask, ent, vis, iq))
            cache.release(sg, sg.e - history(self.cfg, self.ratio))
        out = self.output(heads[0] if len(heads) == 1 else torch.cat(heads, dim=1), pos)
        if x.shape[1] > T:                  # vLLM's padding tokens
            out = torch.cat((out, x.new_zeros(x.shape[0], x.shape[1] - T, out.shape[-1])), dim=1)
        return out

    def _segment(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, entries: Entries | None,
                 visible: torch.Tensor | None, index_q: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """One request's queries ``q [B, S, H, d]`` over its window ``keys`` (``mask``) and, on compressed
        layers, its ``entries`` (those ``visible``; on CSA layers the indexer's top-k of them for its
        ``index_q``) -> the heads' attention outputs ``[B, S, H, d]`` (still roped)."""
        if entries is not None and visible is not None:
            pooled, index_keys = entries
            picked = visible if index_q is None else self.indexer.pick(*index_q, index_keys, visible)
            keys = torch.cat((keys, pooled), dim=1)
            mask = torch.cat((mask.expand(picked.shape[0], -1, -1), picked), dim=-1)
        return dispatch.sink_attention(q, keys, mask, self.attn_sink, self.cfg.head_dim ** -0.5)

    def _entries(self, cache: KVStore, segments: list[Segment], x: torch.Tensor) -> list[Entries]:
        """Pool and store the entries whose window ends in each segment; then each segment's entries so far
        ``[B, n, hd]`` (and the indexer's keys on CSA layers)."""
        r = self.ratio
        for sg in segments:
            done, n = sg.s // r, sg.e // r                      # entries done..n-1 complete in this segment
            if n > done:
                lo = max(done - windows_pooled(r) + 1, 0)      # first window their rows come from
                comp, index = cache.pool_rows(sg, lo * r, n * r)
                new = [self.compressor.pool(*comp, lo, done, x.dtype)]
                if index is not None:
                    new.append(self.indexer.compressor.pool(*index, lo, done, x.dtype))
                cache.write_entries(sg, done, new)
        counts = [sg.e // r for sg in segments]
        # a request with no complete window yet gets empty entries, for uniform concatenation
        empty = (x.new_zeros(x.shape[0], 0, self.compressor.head_dim),
                 x.new_zeros(x.shape[0], 0, self.indexer.head_dim) if r == CSA_RATIO else None)
        have = [sg for sg, n in zip(segments, counts) if n]
        read = iter(cache.entries(have, [n for n in counts if n]) if have else ())
        return [next(read) if n else empty for n in counts]

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, S, D]`` at positions ``pos [S]`` -> roped queries ``[B, S, H, d]``, the low-rank query
        ``qr [B, S, q_lora]`` (the indexer's input) and the roped K=V latents ``[B, S, d]``."""
        cfg = self.cfg
        B, S, _ = x.shape
        inv_freq = rope_inv_freq(cfg, self.ratio, x.device)
        qr = self.q_norm(dispatch.linear(x, self.wq_a))                            # [B, S, q_lora]
        q = rms_unweighted(dispatch.linear(qr, self.wq_b).view(B, S, self.n_heads, cfg.head_dim), cfg.norm_eps)
        q = apply_rope(q, pos, inv_freq)
        kv = apply_rope(self.kv_norm(dispatch.linear(x, self.wkv)), pos, inv_freq)  # [B, S, d]
        return q, qr, kv

    def window_mask(self, pos: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """``[1, S, end - first]``: the query at ``p`` sees the keys at ``p - window_size + 1 .. p``."""
        diff = pos[:, None] - torch.arange(first, end, device=pos.device)[None, :]
        return ((diff >= 0) & (diff < self.cfg.window_size))[None]

    def entry_visibility(self, pos: torch.Tensor, n: int) -> torch.Tensor:
        """``[S, n]``: compressed entry ``i`` is visible to the query at ``p`` once its window is complete
        (also the indexer's candidates)."""
        return torch.arange(n, device=pos.device)[None, :] < ((pos + 1) // self.ratio)[:, None]

    def output(self, o: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The heads' attention outputs ``o [B, S, H, d]`` at ``pos [S]`` -> ``[B, S, D]``: RoPE undone (K and V
        are the same roped latent), then the grouped low-rank output projection and the TP reduction."""
        cfg = self.cfg
        B, S = o.shape[:2]
        H, d, G = self.n_heads, cfg.head_dim, self.n_groups
        o = apply_rope(o, pos, rope_inv_freq(cfg, self.ratio, o.device), inverse=True)
        z = dispatch.grouped_linear(o.reshape(B, S, G, H * d // G), self.wo_a, G)  # [B, S, G, o_lora]
        return self.par.reduce(dispatch.linear(z.flatten(-2), self.wo_b))
