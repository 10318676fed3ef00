"""Sampling with MTP speculative decoding leaves the output distribution unchanged (vLLM, shipped tiny model, fp32).

One short text prompt, ``N`` seeded samples of ``LENGTH`` tokens at ``T = 0.8`` from three engines: no
speculation, MTP k = 2 with greedy drafting, MTP k = 2 with probabilistic drafting (each run its own range of
per-request seeds, so the samples are independent). Compared with chi-square tests (small categories pooled):

- one-sample, against the EXACT distribution computed by the portable model: the marginals of tokens 1 and 2
  and the joint of tokens (1, 2) (token 2 is where the rejection sampler first acts);
- two-sample, against the no-speculation sample: the marginals of tokens 1..3 and the joints (1, 2), (2, 3).

Negative control: a sampler whose temperature is off by 10 % -- ``N`` seeded draws of tokens (1, 2) from the
exact joint law at ``T = 0.88`` (token 1 from its marginal, token 2 from its row) -- must fail the same family
of tests: the marginal of token 1 against the exact law and against the no-speculation sample must each reject
at the per-test alpha (p = 2.4e-13 and 7.4e-6; vLLM itself sampling at 0.88 gave 7e-13 and 1e-5). Drawing the
wrong sample from the law instead of a fourth vLLM pass saves ~24 s; what is under test there is the
statistics' power, not vLLM. Every p-value is printed (``pytest -s``). Runtime: three engine start-ups and
6,000 requests of 3 tokens: 88 s for the whole module on the idle 2-core box (139 s before the control was
drawn from the law and the attention's per-step work was hoisted), 12 min under a load of ~5 -- hence ``slow``. Two runs gave
identical p-values (the draft's sampling is seeded by the engine).

Bonferroni over all ``TESTS`` comparisons of correct samplers at family-wise ``ALPHA``: under the null
hypothesis a seed choice makes this test fail with probability <= ``ALPHA`` (= 1 %); the seeds are fixed, so a
given build passes or fails deterministically (up to vLLM's batch scheduling, which feeds the draft's own
sampling from the engine-wide generator seeded by ``LLM(seed=0)``).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import vllm_support as vs  # noqa: E402

pytestmark = pytest.mark.slow

TEMPERATURE, WRONG_TEMPERATURE = 0.8, 0.88
N, LENGTH, K = 2000, 3, 2
PROMPT = "def fibonacci(n):\n    "
MIN_EXPECTED = 5.0                         # chi-square cells: pool categories expected (or seen) fewer times
ALPHA = 0.01
ONE_SAMPLE = [(0,), (1,), (0, 1)]          # positions (0-based) of the statistics compared with the exact law
TWO_SAMPLE = [(0,), (1,), (2,), (0, 1), (1, 2)]
METHODS = ("greedy", "probabilistic")
TESTS = len(METHODS) * (len(ONE_SAMPLE) + len(TWO_SAMPLE)) + len(ONE_SAMPLE)   # + the no-spec sample vs exact
PER_TEST_ALPHA = ALPHA / TESTS


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df >= stat), via the regularised upper incomplete gamma function."""
    if df < 1:
        raise ValueError(f"chi2_sf: {df} degrees of freedom (too few categories to test)")
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def one_sample_p(counts: Counter, probs: dict, n: int) -> float:
    """Chi-square goodness of fit of ``counts`` (n draws) to ``probs``; cells with expected count below
    MIN_EXPECTED are pooled into one cell (with every category the law does not list)."""
    big = [c for c, p in probs.items() if p * n >= MIN_EXPECTED]
    observed = [counts.get(c, 0) for c in big]
    expected = [probs[c] * n for c in big]
    rest_o, rest_e = n - sum(observed), n - sum(expected)
    if rest_e > 1e-9 * n:
        observed.append(rest_o)
        expected.append(rest_e)
    elif rest_o:
        return 0.0                             # a draw the law gives probability 0
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return chi2_sf(stat, len(expected) - 1)


def two_sample_p(a: Counter, b: Counter) -> float:
    """Chi-square test of homogeneity of two samples; categories seen fewer than 2 * MIN_EXPECTED times in
    both together are pooled into one cell."""
    na, nb = sum(a.values()), sum(b.values())
    cells = [(a.get(c, 0), b.get(c, 0)) for c in set(a) | set(b)]
    big = [x for x in cells if x[0] + x[1] >= 2 * MIN_EXPECTED]
    rest = (na - sum(x[0] for x in big), nb - sum(x[1] for x in big))
    if sum(rest):
        big.append(rest)
    stat = 0.0
    for oa, ob in big:
        tot = oa + ob
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    return chi2_sf(stat, len(big) - 1)


def project(samples: list[tuple[int, ...]], positions: tuple[int, ...]) -> Counter:
    return Counter(tuple(s[i] for i in positions) for s in samples)


@torch.no_grad()
def joint_law(model, prompt: list[int], temperature: float) -> torch.Tensor:
    """``[V, V]``: the exact joint law of tokens (1, 2) after ``prompt`` at ``temperature`` (float64)."""
    from vllm_deepseek_v4.model.speculative import sampling_probs

    logits, _ = model(torch.tensor([prompt]))
    p1 = sampling_probs(logits[0, -1].double(), temperature).double()
    firsts = torch.arange(p1.numel())
    joint = torch.empty(p1.numel(), p1.numel(), dtype=torch.float64)
    for chunk in firsts.split(512):          # every first token, so the marginal of token 2 is exact
        ids = torch.cat((torch.tensor(prompt).expand(len(chunk), -1), chunk[:, None]), 1)
        step, _ = model(ids)
        joint[chunk] = p1[chunk, None] * sampling_probs(step[:, -1].double(), temperature).double()
    return joint


def exact_law(joint: torch.Tensor) -> dict[tuple[int, ...], dict]:
    """The laws of token 1, token 2 and (token 1, token 2) as the statistics read them (the joint's cells
    too small to matter at ``N`` are left out: they fall into the pooled cell)."""
    nz = (joint * N >= 1e-3).nonzero().tolist()
    return {(0,): {(i,): float(v) for i, v in enumerate(joint.sum(1))},
            (1,): {(i,): float(v) for i, v in enumerate(joint.sum(0))},
            (0, 1): {(i, j): float(joint[i, j]) for i, j in nz}}


def sample_law(joint: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    """``N`` seeded draws of tokens (1, 2) from the whole ``joint``: token 1 from its marginal, token 2 from
    its row (a truncated joint would drop the tail where a hotter law differs, and hide the error)."""
    g = torch.Generator().manual_seed(seed)
    firsts = torch.multinomial(joint.sum(1), N, replacement=True, generator=g).tolist()
    return [(a, int(torch.multinomial(joint[a], 1, generator=g))) for a in firsts]


def sample(llm, prompt: list[int], temperature: float, seed0: int) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=LENGTH, temperature=temperature, seed=seed0 + i, detokenize=False,
                             ignore_eos=True) for i in range(N)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * N, params, use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def runs() -> dict:
    from tokenizers import Tokenizer

    from vllm_deepseek_v4.assets import tiny_model_path

    path = tiny_model_path()
    prompt = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(PROMPT).ids
    out: dict = {"prompt": prompt}
    set_threads, before_threads = torch.set_num_threads, torch.get_num_threads()
    try:
        with vs.engine(path, 0, max_num_seqs=512, max_model_len=64) as llm:
            out["none"] = sample(llm, prompt, TEMPERATURE, 0)
        for j, method in enumerate(METHODS, 2):
            spec = {"method": "mtp", "num_speculative_tokens": K, "draft_sample_method": method}
            with vs.engine(path, 0, max_num_seqs=512, max_model_len=64, speculative_config=spec) as llm:
                before = vs.spec_counters(llm)
                out[method] = sample(llm, prompt, TEMPERATURE, j * N)
                out[f"{method}_counters"] = vs.diff_counters(vs.spec_counters(llm), before)
    finally:
        torch.set_num_threads = set_threads               # the CPU worker stubs it out for the process
        set_threads(before_threads)
    model = vs.reference_model(path)
    out["exact"] = exact_law(joint_law(model, prompt, TEMPERATURE))
    out["wrong"] = sample_law(joint_law(model, prompt, WRONG_TEMPERATURE), seed=N)      # tokens 1 and 2
    return out


def p_values(runs: dict, name: str) -> dict[str, float]:
    n_tokens = len(runs[name][0])                          # the negative control draws tokens 1 and 2 only
    got = {f"exact {pos}": one_sample_p(project(runs[name], pos), runs["exact"][pos], N) for pos in ONE_SAMPLE}
    if name != "none":
        got.update({f"vs no-spec {pos}": two_sample_p(project(runs[name], pos), project(runs["none"], pos))
                    for pos in TWO_SAMPLE if max(pos) < n_tokens})
    print(f"\n{name} (T={WRONG_TEMPERATURE if name == 'wrong' else TEMPERATURE}, N={N}): "
          + ", ".join(f"{k}: p={v:.3g}" for k, v in got.items()) + f"  [per-test alpha {PER_TEST_ALPHA:.2g}]")
    return got


def test_without_speculation_samples_the_exact_law(runs):
    assert all(len(s) == LENGTH for s in runs["none"])
    bad = {k: v for k, v in p_values(runs, "none").items() if v < PER_TEST_ALPHA}
    assert not bad, f"vLLM without speculation differs from the portable model's law: {bad}"


@pytest.mark.parametrize("method", METHODS)
def test_mtp_sampling_leaves_the_output_distribution_unchanged(runs, method):
    c = runs[f"{method}_counters"]
    print(f"\n{method} drafting: {c}")
    assert c["num_draft_tokens"] > N and c["num_accepted_tokens"] > 0    # speculation really ran and accepted
    bad = {k: v for k, v in p_values(runs, method).items() if v < PER_TEST_ALPHA}
    assert not bad, f"MTP k={K} with {method} drafting changes the output distribution: {bad}"


def test_negative_control_temperature_off_by_ten_percent_is_detected(runs):
    got = p_values(runs, "wrong")
    # the family rejects through the token-1 marginal, against the exact law and against the correct sampler
    assert got["exact (0,)"] < PER_TEST_ALPHA, got
    assert got["vs no-spec (0,)"] < PER_TEST_ALPHA, got


def test_chi_square_helpers():
    assert math.isclose(chi2_sf(3.841458820694124, 1), 0.05, rel_tol=1e-6)     # the textbook 5 % points
    assert math.isclose(chi2_sf(18.307038053275146, 10), 0.05, rel_tol=1e-6)
    law = {(0,): 0.5, (1,): 0.5}
    assert one_sample_p(Counter({(0,): 500, (1,): 500}), law, 1000) == 1.0
    assert one_sample_p(Counter({(0,): 600, (1,): 400}), law, 1000) < 1e-9
    assert one_sample_p(Counter({(0,): 999, (2,): 1}), {(0,): 1.0}, 1000) == 0.0     # an impossible draw
    assert two_sample_p(Counter({(0,): 50, (1,): 50}), Counter({(0,): 50, (1,): 50})) == 1.0
    assert two_sample_p(Counter({(0,): 60, (1,): 40}), Counter({(0,): 40, (1,): 60})) < 0.01


def test_probabilistic_drafting_accepts_more_than_greedy_drafting(runs):
    rate = {m: runs[f"{m}_counters"]["num_accepted_tokens"] / runs[f"{m}_counters"]["num_draft_tokens"]
            for m in METHODS}
    print(f"\nacceptance at T={TEMPERATURE}, k={K}: " + ", ".join(f"{m} {r:.1%}" for m, r in rate.items()))
    assert rate["probabilistic"] > 2 * rate["greedy"], rate          # measured 33.9 % vs 7.5 % (N = 2000)
