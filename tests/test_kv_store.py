"""The two KV stores behind ``Attention.forward`` (``model/kv_store.py``, ``vllm_plugin/kv.py``).

- In-process ``AttnCache``: keeps only the rows attention still reads (``attention.history``) and every
  entry; refuses a step that does not continue where the last one ended.
- Paged ``PagedKV`` driven directly with hand-made vLLM metadata (no engine): several requests back to back,
  prefill, decode and chunks of different lengths in one step, scattered blocks and padding, give what the
  in-process cache gives per request; no metadata at all (vLLM's profiling run) gives zeros; metadata that
  lacks a layer raises naming it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import pytest
import torch

from tiny import make_config, make_model
from vllm_deepseek_v4.errors import DSV4Error
from vllm_deepseek_v4.model import AttnCache, ModelState
from vllm_deepseek_v4.model.attention import history

BLOCKS = 12           # blocks of every cache layer in the paged tests


@pytest.fixture(scope="module")
def model() -> Any:
    return make_model(seed=0)


# ---- in-process ----
def test_in_process_cache_keeps_what_attention_reads_and_every_entry(model) -> None:
    cfg, state = model.cfg, model.new_state()
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:, :20], state)
        for p in range(20, 37):
            model(ids[:, p:p + 1], state)
    for i, cache in enumerate(state.layers):
        r = cfg.ratio(i)
        assert (cache.start, cache.end) == (37 - history(cfg, r), 37)
        assert cache.latent.shape[:2] == (2, history(cfg, r))
        assert [t.shape[1] for t in cache.compressed] == ([37 // r] * (2 if r == 4 else 1) if r else [])


def test_in_process_cache_refuses_a_step_out_of_order(model) -> None:
    state = model.new_state()
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), state)
        state.pos = 3
        with pytest.raises(DSV4Error, match=r"AttnCache: a step at position 3, but the cache holds positions up "
                                            r"to 5\. feed tokens in order"):
            model(torch.zeros(1, 1, dtype=torch.long), state)


# ---- paged, with vLLM's forward context and hand-made metadata ----
@pytest.fixture(scope="module")
def paged(model) -> Any:
    """A ``PagedKV`` per layer with bound caches: 12 blocks per cache layer, each kind its own block size
    (blocks of 4 tokens and up, so a request's window rows span several scattered blocks)."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_deepseek_v4.vllm_plugin import kv_layout
    from vllm_deepseek_v4.vllm_plugin.kv import PagedKV, StepInputs

    cfg, vc, inputs = model.cfg, VllmConfig(), StepInputs()
    with set_current_vllm_config(vc), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_layout, "MIN_BLOCK", 4)
        kvs = [PagedKV(cfg, cfg.ratio(i), f"layers.{i}.attn", inputs, 256) for i in range(cfg.n_layers)]
    for layer in _layers(kvs):
        layer.bind_kv_cache(torch.full((BLOCKS, 1, layer.states, layer.kind.width), float("nan")))  # unwritten
    return vc, inputs, kvs


def _layers(kvs: list[Any]) -> list[Any]:
    return [c for kv in kvs for c in (kv.row_cache, kv.entry_cache, kv.index_cache) if c is not None]


@contextmanager
def _step(vc: Any, metadata: dict | None) -> Any:
    from vllm.forward_context import set_forward_context

    with set_forward_context(metadata, vc), torch.no_grad():
        yield


def _run(model, paged, chunks: list[tuple[int, list[int], int]], tables: list[list[int]], pad: int = 0):
    """One step: ``chunks`` = (request, token ids, first position) back to back -> logits ``[T, V]``."""
    from vllm_deepseek_v4.vllm_plugin.backend import DSV4CacheMetadata

    vc, inputs, kvs = paged
    ids = [t for _, toks, _ in chunks for t in toks]
    pos = [p0 + j for _, toks, p0 in chunks for j in range(len(toks))]
    reqs = [req for req, toks, _ in chunks for _ in toks]
    starts = [0]
    for _, toks, _ in chunks:
        starts.append(starts[-1] + len(toks))
    table = torch.tensor([tables[req] for req, _, _ in chunks], dtype=torch.int32)
    groups: dict[Any, Any] = {}       # one metadata object per KV-cache group (= spec), as vLLM builds them
    metadata = {}
    for layer in _layers(kvs):
        if layer.spec not in groups:
            bs = layer.spec.block_size                          # the group's own slots (window: bs = states)
            slots = [tables[r][p // bs] * bs + p % bs for r, p in zip(reqs, pos)] + [-1] * pad
            groups[layer.spec] = DSV4CacheMetadata(len(chunks), len(ids), torch.tensor(starts),
                                                   torch.tensor(slots), table)
        metadata[layer.layer_name] = groups[layer.spec]
    with _step(vc, metadata):
        inputs.begin(torch.tensor(pos + [0] * pad))
        X = model.streams(torch.tensor([ids + [0] * pad]), ModelState(list(kvs)))
        return model.logits(model.head_input(X))[0, : len(ids)]


def test_paged_store_computes_what_the_in_process_cache_computes(model, paged) -> None:
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (40, 33, 36)]
    tables = [[3, 7, 1, 10], [0, 9, 4, 6], [11, 2, 5, 8]]      # scattered blocks per request
    # (request, first, end): two prefills (+ padding); a decode, a chunk and a prefill; then mixed steps
    schedule = [[(0, 0, 17), (1, 0, 13)], [(0, 17, 18), (1, 13, 20), (2, 0, 30)], [(1, 20, 21), (0, 18, 27)]]
    schedule += [[(r, p, p + 1) for r, p in ((0, 27 + i), (1, 21 + i), (2, 30 + i)) if p < len(seqs[r])]
                 for i in range(13)]
    with torch.no_grad():
        want = [model(torch.tensor([s]))[0][0] for s in seqs]
    for step, work in enumerate(schedule):
        chunks = [(r, seqs[r][a:b], a) for r, a, b in work]
        got = _run(model, paged, chunks, tables, pad=3 if step == 0 else 0)
        row = 0
        for r, toks, a in chunks:
            torch.testing.assert_close(got[row:row + len(toks)], want[r][a:a + len(toks)], rtol=0, atol=1e-4)
            row += len(toks)


def test_paged_store_gives_zeros_without_metadata_and_raises_for_a_missing_layer(model, paged) -> None:
    vc, inputs, kvs = paged
    attn, x = model.layers[1].attn, torch.randn(1, 4, model.cfg.dim)
    with _step(vc, None):                                       # vLLM's profiling / dummy runs
        inputs.begin(torch.arange(4))
        assert torch.equal(attn(x, 0, kvs[1]), torch.zeros_like(x))
    others = {kv.row_cache.layer_name: object() for kv in kvs if kv is not kvs[1]}
    with _step(vc, others), pytest.raises(RuntimeError, match=r"^layers\.1\.attn\.kv_window: no attention "
                                                                r"metadata for this cache layer in this step"):
        inputs.begin(torch.arange(4))
        attn(x, 0, kvs[1])


# ---- the layout (``vllm_plugin/kv_layout.py``) ----
def test_every_kind_fills_one_page_with_its_natural_width() -> None:
    """Window rows hold the latent and the pooling rows; entries and indexer keys one state per ``r``
    tokens; every kind's block holds the same bytes, in a multiple of ``MIN_BLOCK`` tokens."""
    from vllm_deepseek_v4.vllm_plugin.kv_layout import MIN_BLOCK, cache_geometry, layer_kinds

    c = make_config(compress_ratios=[0, 4, 128, 0, 0])
    g = cache_geometry(c)
    d, i = c.head_dim, c.index_head_dim
    assert [(k.suffix, k.width, k.tokens_per_state) for k in layer_kinds(c, 4)] == [
        ("kv_window", d + 2 * 2 * d + 2 * 2 * i, 1), ("kv_compressed", d, 4), ("kv_index", i, 4)]
    assert [(k.suffix, k.width, k.tokens_per_state) for k in layer_kinds(c, 128)] == [
        ("kv_window", 3 * d, 1), ("kv_compressed", d, 128)]
    assert [(k.suffix, k.width) for k in layer_kinds(c, 0)] == [("kv_window", d)]
    kinds = [k for r in (0, 4, 128) for k in layer_kinds(c, r)]
    for k in kinds:
        assert g.states_per_block(k) * k.state_bytes == g.page_bytes
        assert g.block_size(k) % MIN_BLOCK == 0
    def fits(page: int) -> bool:
        return all(page % k.state_bytes == 0 and (page // k.state_bytes * k.tokens_per_state) % MIN_BLOCK == 0
                   for k in kinds)
    assert fits(g.page_bytes) and not any(fits(p) for p in range(4, g.page_bytes, 4))   # the smallest such page
    assert g.window == 128                     # the plain compressor pools 128 rows; CSA needs 8, attention 8


def test_prefix_caching_says_at_startup_where_hits_can_land(caplog) -> None:
    """A prefix-cache hit must cover whole blocks of every kind: the plugin logs that granularity (the lcm of the
    block sizes) once when prefix caching is on, and nothing when it is off."""
    import logging
    import math
    from types import SimpleNamespace

    from vllm_deepseek_v4.vllm_plugin.kv_layout import block_sizes, cache_geometry, layer_kinds, prefix_hit_tokens
    from vllm_deepseek_v4.vllm_plugin.model import warn_prefix_granularity

    c = make_config(compress_ratios=[0, 4, 128, 0, 0])
    g = cache_geometry(c)
    assert block_sizes(c) == sorted({g.block_size(k) for r in (0, 4, 128) for k in layer_kinds(c, r)})
    assert prefix_hit_tokens(c) == math.lcm(*block_sizes(c)) >= max(block_sizes(c))
    for on in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_prefix_granularity(SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=on)), c)
        lines = [r.getMessage() for r in caplog.records if "prefix caching" in r.getMessage()]
        assert lines == ([f"DSv4 plugin: prefix caching is on; with this model's KV layout (block sizes "
                          f"{block_sizes(c)} tokens) a cached prefix is reused only in multiples of "
                          f"{prefix_hit_tokens(c):d} tokens, shorter shared prefixes are recomputed "
                          "(docs/vllm-plugin.md, Caches)"] if on else [])
