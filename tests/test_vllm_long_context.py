"""A long context through vLLM with the compact cache layout (``vllm_plugin/kv_layout.py``).

A tiny random model with an 8-token attention window and compressors of ratio 4 (CSA: 1,000+ entries and
indexer keys, top-4 of them per query), 16 and 128, served with MTP (k = 2, so drafts are rejected and their
positions rewritten) on prompts of 4,100 and 300 tokens (one batch): the greedy tokens and their log-probabilities equal
the portable reference's (in-process ``AttnCache``). The engine's KV-cache groups are the layout's kinds at
their own block sizes (entries one state per ``r`` tokens), all of one page size.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import vllm_support as vs
from tiny import make_config, make_model

pytestmark = pytest.mark.slow
N, K = 12, 2                # generated tokens per prompt, MTP drafts per step
LENGTHS = (4100, 300)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with vs.one_torch_thread():
        yield


def _groups(worker: Any) -> list[tuple[list[str], str, int, Any, int]]:
    """(layers, spec class, block size, tokens per state, page bytes) of each KV-cache group vLLM made."""
    return [(list(g.layer_names), type(g.kv_cache_spec).__name__, g.kv_cache_spec.block_size,
             g.kv_cache_spec.tokens_per_state, g.kv_cache_spec.page_size_bytes)
            for g in worker.model_runner.kv_cache_config.kv_cache_groups]


@torch.no_grad()
def _reference(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from the in-process model (prefill, then one token a step)."""
    state = model.new_state()
    logits, _ = model(torch.tensor([prompt]), state)
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        lp = logits[0, -1].float().log_softmax(-1)
        tokens.append(int(lp.argmax()))
        logprobs.append(float(lp[tokens[-1]]))
        logits, _ = model(torch.tensor([[tokens[-1]]]), state)
    return tokens, logprobs


def test_long_context_with_many_compressed_entries_equals_the_reference(tmp_path):
    from vllm import SamplingParams

    from vllm_deepseek_v4.vllm_plugin.kv_layout import cache_geometry, layer_kinds

    cfg = make_config(compress_ratios=[0, 4, 16, 128, 0], sliding_window=8, max_position_embeddings=8192)
    path = vs.write_model(tmp_path, make_model(cfg, seed=7))
    ref = vs.reference_model(path)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    want = [_reference(ref, p, N) for p in prompts]
    del ref

    params = SamplingParams(max_tokens=N, temperature=0.0, detokenize=False, ignore_eos=True, logprobs=0)
    with vs.engine(path, K, max_model_len=4160, max_num_batched_tokens=4160,
                   kv_cache_memory_bytes=96 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        counters = vs.spec_counters(llm)
        groups = vs.on_worker(llm, _groups)
    for out, (tokens, logprobs) in zip(outs, want):
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        got_lp = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(logprobs), rtol=0, atol=2e-4)
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] < counters["num_draft_tokens"]

    # vLLM kept our layout: one group per kind (no unification), entries one state per r tokens
    geometry = cache_geometry(cfg)
    kinds = {f"layers.{i}.attn.{k.suffix}": k for i in range(cfg.n_layers) for k in layer_kinds(cfg, cfg.ratio(i))}
    seen = set()
    for layers, cls, block_size, per_state, page in groups:
        assert page == geometry.page_bytes
        for name in layers:
            key = name[name.index("layers."):] if "layers." in name else name
            if key in kinds:
                k = kinds[key]
                seen.add(key)
                assert (block_size, per_state) == (geometry.block_size(k), k.tokens_per_state), name
                assert cls == ("SlidingWindowMLASpec" if k.sliding else "MLAAttentionSpec"), name
    assert seen == set(kinds)
