"""Greedy speculative decoding with the MTP draft (``model/speculative.py``).

- The output is token-identical to plain greedy decoding for k = 1..3, on a random tiny model (whose draft
  accepts almost nothing, so every round rolls back) and with a forced draft ("oracle": the true greedy
  continuation, optionally wrong at chosen positions) so full and partial acceptance are exercised too.
- Accounting: every round's accepted count is the number of leading drafts that match greedy decoding.
- The draft's own state survives rollbacks: the MTP logits computed during a run equal a teacher-forced
  MTP pass over the final sequence.
- On the shipped trained model: identical to greedy, and a draft whose head was left random (what the
  upstream loader bug produces) accepts ~nothing while the properly loaded draft accepts most tokens.
- Expected acceptance at T > 0 (``draft_acceptance``): greedy drafting ``p(argmax q)``, probabilistic drafting
  ``sum min(p, q)``, checked against a simulation of the rejection rule; on the shipped model probabilistic
  drafting is expected to accept far more at T = 0.8 (the issue measured 25 % vs 61 % through vLLM).
- ``expected_on_tokens`` (the k = 1 drafting chain on given tokens) reproduces the counters of a real greedy
  speculative run exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import make_model

from vllm_deepseek_v4.model.model import ModelState
from vllm_deepseek_v4.model.speculative import (SpecStats, draft_acceptance, expected_acceptance, expected_on_tokens,
                                                 greedy_generate, snapshot_state, speculative_generate)

PROMPT_LEN, N = 16, 24           # tiny config: window 8, ratios 4 and 8, so compressors emit during decoding


@pytest.fixture(scope="module")
def random_model() -> Any:
    return make_model(seed=3)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 512, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def greedy(random_model, prompt) -> list[int]:
    return greedy_generate(random_model, prompt, N + 4)


class ForcedDraft:
    """Replaces the draft's choice by the true greedy token (except at ``wrong`` positions), while the real
    MTP block still runs on every call, so its state handling is what is exercised. Records the real draft
    logits per position (later calls overwrite earlier ones: the last is the catch-up with true inputs)."""

    def __init__(self, model: Any, sequence: list[int], wrong: set[int] = frozenset()) -> None:
        self.model, self.sequence, self.wrong = model, sequence, wrong
        self.real = model.forward_mtp
        self.seen: dict[int, torch.Tensor] = {}

    def __call__(self, hidden: torch.Tensor, next_ids: torch.Tensor, state: ModelState | None = None,
                 *, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        start = state.pos
        logits, Z = self.real(hidden, next_ids, state, k=k)
        forced = logits.clone()
        for j in range(next_ids.shape[1]):
            p = start + j
            self.seen[p] = logits[0, j].clone()
            target = p + 2                                   # the draft at p predicts token p + 2
            if target < len(self.sequence):
                tok = self.sequence[target] if target not in self.wrong else (self.sequence[target] + 1) % 512
                forced[0, j] = -1e9
                forced[0, j, tok] = 1e9
        return forced, Z


def _forced(model: Any, sequence: list[int], wrong: set[int] = frozenset()) -> ForcedDraft:
    f = ForcedDraft(model, sequence, wrong)
    model.forward_mtp = f
    return f


@pytest.fixture
def restore(random_model):
    yield
    random_model.__dict__.pop("forward_mtp", None)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_equals_greedy_on_a_random_model(random_model, prompt, greedy, k):
    out, stats = speculative_generate(random_model, prompt, N, k)
    assert out == greedy[:N]
    assert stats.drafts >= N // (k + 1) and stats.draft_tokens == stats.drafts * k


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_perfect_draft_is_always_accepted_and_output_stays_greedy(random_model, prompt, greedy, k, restore):
    sequence = prompt[0].tolist() + greedy
    forced = _forced(random_model, sequence)
    out, stats = speculative_generate(random_model, prompt, N, k)
    assert out == greedy[:N]
    assert stats.acceptance == 1.0 and stats.per_position == [1.0] * k
    assert stats.mean_acceptance_length == k + 1
    assert stats.drafts == -(-(N - 1) // (k + 1))        # k + 1 tokens per round after the prefill token
    _assert_draft_state_matches_teacher_forcing(random_model, forced, sequence)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_partial_acceptance_rolls_back_exactly(random_model, prompt, greedy, k, restore):
    sequence = prompt[0].tolist() + greedy
    wrong = {p for p in range(PROMPT_LEN, len(sequence)) if p % 4 == 0 or p % 9 == 0}   # mixes 0, some, all
    forced = _forced(random_model, sequence, wrong)
    out, stats = speculative_generate(random_model, prompt, N, k)
    assert out == greedy[:N]
    counts = [0] * (k + 1)
    for pos, drafts, accepted in stats.rounds:        # recount from the greedy sequence
        truth = sequence[pos: pos + k]
        a = next((i for i, (d, t) in enumerate(zip(drafts, truth)) if d != t), k)
        assert accepted == a, f"round at {pos}: drafts {drafts}, greedy {truth}, counted {accepted}"
        counts[a] += 1
    assert counts[0] and counts[k] and (k == 1 or sum(counts[1:k])), f"rounds do not mix outcomes: {counts}"
    assert stats.accepted == sum(a for _, _, a in stats.rounds)
    _assert_draft_state_matches_teacher_forcing(random_model, forced, sequence)


def _assert_draft_state_matches_teacher_forcing(model: Any, forced: ForcedDraft, sequence: list[int]) -> None:
    """The draft logits the run computed (last per position) equal one MTP pass over the final sequence."""
    ids = torch.tensor([sequence[: PROMPT_LEN + N - 4]])
    with torch.no_grad():
        _, hidden = model(ids)
        want, _ = forced.real(hidden[:, :-1], ids[:, 1:], model.new_mtp_state())
    positions = [p for p in sorted(forced.seen) if p < want.shape[1]]
    assert len(positions) >= PROMPT_LEN + N // 2
    got = torch.stack([forced.seen[p] for p in positions])
    torch.testing.assert_close(got, want[0, positions], rtol=1e-4, atol=1e-4)


def test_stats_formulas():
    s = SpecStats(k=2, drafts=4, accepted=5, accepted_at=[3, 2])
    assert s.draft_tokens == 8 and s.acceptance == 5 / 8
    assert s.per_position == [0.75, 0.5] and s.mean_acceptance_length == 1 + 5 / 4
    s.merge(SpecStats(k=2, drafts=4, accepted=1, accepted_at=[1, 0]))
    assert s.acceptance == 6 / 16 and s.per_position == [0.5, 0.25]


def test_snapshot_is_independent_of_later_decoding(random_model, prompt):
    state = random_model.new_state()
    with torch.no_grad():
        random_model(prompt, state)
        snap = snapshot_state(state)
        a, _ = random_model(prompt[:, :3], state)
        b, _ = random_model(prompt[:, :3], snap)
    assert snap.pos == state.pos and torch.equal(a, b)


def test_snapshot_refuses_external_caches():
    class Paged:                     # any KVStore but the in-process AttnCache (e.g. vLLM's paged caches)
        pass
    with pytest.raises(Exception, match="external KV cache"):
        snapshot_state(ModelState([Paged()]))


def test_bad_arguments_are_refused(random_model, prompt):
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_generate(random_model, prompt, 4, 0)
    with pytest.raises(ValueError, match=r"\[1, S\]"):
        greedy_generate(random_model, prompt.repeat(2, 1), 4)


# ---- the shipped trained model ----
@pytest.fixture(scope="module")
def shipped() -> tuple[Any, list[torch.Tensor]]:
    from tokenizers import Tokenizer

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.cli.bench_acceptance import load_prompts
    from vllm_deepseek_v4.loader.load import load_model

    path = tiny_model_path()
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    prompts = [torch.tensor([tok.encode(p).ids]) for p in load_prompts(None, 2)]   # the vLLM bench's first two
    return model.eval(), prompts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shipped_model_speculative_equals_greedy(shipped, k):
    model, prompts = shipped
    out, stats = speculative_generate(model, prompts[0], 24, k)
    assert out == greedy_generate(model, prompts[0], 24)
    assert stats.accepted > 0                               # the accepting path ran, not only rollbacks


def test_a_random_draft_head_accepts_nothing_while_the_shared_head_accepts_most(shipped):
    """The upstream loader bug leaves the MTP's own head uninitialised; ours shares the main head. Give the
    draft a separate random head on purpose: acceptance collapses to ~0."""
    model, prompts = shipped
    good, bad = SpecStats(k=1, accepted_at=[0]), SpecStats(k=1, accepted_at=[0])
    for ids in prompts:
        good.merge(speculative_generate(model, ids, 24, 1)[1])
    D, V = model.cfg.dim, model.cfg.vocab_size
    random_head = torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * D ** -0.5
    real = model.forward_mtp

    def with_random_head(hidden, next_ids, state=None, *, k=0):
        _, Z = real(hidden, next_ids, state, k=k)
        return model.mtp[k].head_input(Z).float() @ random_head.T, Z
    model.forward_mtp = with_random_head
    try:
        for ids in prompts:
            bad.merge(speculative_generate(model, ids, 24, 1)[1])
    finally:
        del model.forward_mtp
    assert good.acceptance > 0.4, f"trained draft acceptance {good.acceptance:.3f}"
    assert bad.acceptance < 0.05, f"random-head draft acceptance {bad.acceptance:.3f}"


def test_draft_acceptance_formulas_match_a_simulated_rejection_sampler():
    g = torch.Generator().manual_seed(0)
    target, draft = torch.randn(3, 6, generator=g) * 2, torch.randn(3, 6, generator=g) * 2
    T = 0.8
    p, q = torch.softmax(target / T, -1), torch.softmax(draft / T, -1)
    greedy = draft_acceptance(target, draft, T, "greedy")
    assert torch.allclose(greedy, p.gather(1, draft.argmax(1, keepdim=True))[:, 0])
    # probabilistic: d ~ q, accepted with min(1, p(d) / q(d)) -- simulated, 200k draws per row
    n = 200_000
    d = torch.multinomial(q, n, replacement=True, generator=g)
    ratio = (p.gather(1, d) / q.gather(1, d)).clamp(max=1)
    simulated = (torch.rand(3, n, generator=g) < ratio).float().mean(1)
    assert torch.allclose(draft_acceptance(target, draft, T, "probabilistic"), simulated, atol=0.005)
    assert torch.allclose(draft_acceptance(target, target, T, "probabilistic"), torch.ones(3))   # q == p
    at_zero = (target.argmax(1) == draft.argmax(1)).float()
    assert torch.equal(draft_acceptance(target, draft, 0.0, "probabilistic"), at_zero)
    with pytest.raises(ValueError, match="method must be one of"):
        draft_acceptance(target, draft, T, "sampled")


def test_shipped_model_expected_acceptance_probabilistic_beats_greedy_at_temperature(shipped):
    model, prompts = shipped
    seqs = [(ids[0, :-24].tolist(), ids[0, -24:].tolist()) for ids in prompts]     # held-out prompt text
    greedy = expected_acceptance(model, seqs, 0.8, "greedy")
    probabilistic = expected_acceptance(model, seqs, 0.8, "probabilistic")
    at_zero = expected_acceptance(model, seqs, 0.0, "probabilistic")
    assert 0.05 < greedy < probabilistic and probabilistic > 0.4, (greedy, probabilistic)
    assert at_zero == expected_acceptance(model, seqs, 0.0, "greedy")


def test_expected_on_tokens_reproduces_a_greedy_speculative_runs_counters(shipped):
    model, prompts = shipped
    for ids in prompts:
        out, stats = speculative_generate(model, ids, 24, 1)
        seqs = [(ids[0].tolist(), out)]
        accepted, drafts, var = expected_on_tokens(model, seqs, 0.0, "greedy")
        assert (accepted, drafts, var) == (stats.accepted, stats.drafts, 0.0)
        acc_p, drafts_p, var_p = expected_on_tokens(model, seqs, 0.8, "probabilistic")
        assert 0 < acc_p < drafts_p <= len(out) - 1 and var_p > 0
