"""Greedy decoding and greedy speculative decoding with the MTP draft, on the portable model (no vLLM).

Speculative loop (batch 1), with ``P`` the position of the pending token ``x`` (decided, not yet fed):

1. draft: ``mtp.0`` at ``P - 1`` (main streams at ``P - 1`` and ``x``) proposes ``d1``; for ``k > 1`` its
   output streams ``Z`` are fed back as the hidden input with the token just drafted (vLLM's reuse of the
   depth-1 block), giving ``d2 .. dk``;
2. verify: one main forward over ``[x, d1 .. dk]`` at ``P .. P + k``; ``g[i]`` is the main model's greedy
   token after ``d_i``; the accepted prefix is the longest with ``d_{i+1} == g[i]``; ``g[a]`` is the bonus;
3. roll back: the main state to the snapshot taken before the verify forward, re-fed with ``[x, d1 .. da]``
   when ``a < k``; the MTP state to its snapshot before the chained steps ``2 .. k``, then fed the true pairs
   (main streams at ``P .. P + a`` and the tokens after them) -- its last output is the next round's ``d1``.

The committed tokens are main-model argmaxes only, so the output equals plain greedy decoding up to
floating-point differences between a chunked and a one-token forward (the tests and benchmarks check it).

Expected acceptance at temperature ``T`` (:func:`expected_acceptance`), exactly from the two distributions: with
``p`` the target's sampling distribution (``softmax(logits / T)``, then top-k / top-p, as vLLM's rejection sampler
applies them) and ``q`` the draft's, one draft token is accepted with probability ``p(argmax q)`` under greedy
drafting (vLLM's default ``draft_sample_method``) and ``sum_x min(p(x), q(x))`` under probabilistic drafting
(the draft samples from ``q = softmax(draft_logits / T)`` -- vLLM applies the temperature only, never top-k /
top-p, to the draft -- and vLLM accepts with ``min(1, p / q)``). At ``T = 0`` both reduce to
``argmax q == argmax p``.

Given the token ``x`` a served sequence actually holds at a drafted position, the probability that it was an
accepted draft is ``1[x == argmax q]`` (greedy drafting) or ``min(1, q(x) / p(x))`` (probabilistic): what
:func:`expected_on_tokens` runs through vLLM's k = 1 drafting chain to predict the counters of exactly those
sequences (greedy drafting: exactly; probabilistic: up to Bernoulli noise given the tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DSV4Error
from .kv_store import AttnCache
from .model import DSV4Model, ModelState

__all__ = ["SpecStats", "snapshot_state", "greedy_generate", "speculative_generate", "DRAFT_SAMPLE_METHODS",
           "sampling_probs", "draft_acceptance", "expected_acceptance", "expected_on_tokens"]

DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")      # vLLM's SpeculativeConfig.draft_sample_method values


@dataclass
class SpecStats:
    """Counters of one speculative run. A *draft* is one round of ``k`` proposed tokens."""

    k: int
    drafts: int = 0
    accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)    # rounds whose token i was accepted
    rounds: list[tuple[int, list[int], int]] = field(default_factory=list)   # (position of d1, drafts, accepted)

    @property
    def draft_tokens(self) -> int:
        return self.drafts * self.k

    @property
    def acceptance(self) -> float:
        """Accepted / draft tokens."""
        return self.accepted / self.draft_tokens if self.drafts else 0.0

    @property
    def per_position(self) -> list[float]:
        """Accepted at position i / drafts."""
        return [n / self.drafts if self.drafts else 0.0 for n in self.accepted_at]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verify step: 1 (the bonus) + accepted / drafts."""
        return 1.0 + (self.accepted / self.drafts if self.drafts else 0.0)

    def merge(self, other: SpecStats) -> None:
        if other.k != self.k:
            raise ValueError(f"SpecStats.merge: k={other.k} into k={self.k}")
        self.drafts += other.drafts
        self.accepted += other.accepted
        self.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at)]
        self.rounds += other.rounds


def snapshot_state(state: ModelState) -> ModelState:
    """A copy of ``state`` to roll back to (tensors cloned, so it survives any later cache update)."""
    for i, c in enumerate(state.layers):
        if not isinstance(c, AttnCache):
            raise DSV4Error(f"snapshot_state: layer {i} holds an external KV cache ({type(c).__name__}); "
                            "only the in-memory AttnCache can be rolled back here")
    return ModelState([c.snapshot() for c in state.layers], state.pos)


def _check(model: DSV4Model, ids: torch.Tensor, n: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"expected prompt ids [1, S] with S >= 1, got {list(ids.shape)}")
    if n < 1:
        raise ValueError(f"expected n >= 1 tokens to generate, got {n}")


@torch.no_grad()
def greedy_generate(model: DSV4Model, ids: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens after the prompt ``ids [1, S]``: prefill, then one token per forward."""
    _check(model, ids, n)
    state = model.new_state()
    logits, _ = model(ids, state)
    out = [int(logits[0, -1].argmax())]
    while len(out) < n:
        logits, _ = model(ids.new_tensor([[out[-1]]]), state)
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
def speculative_generate(model: DSV4Model, ids: torch.Tensor, n: int, k: int) -> tuple[list[int], SpecStats]:
    """``n`` tokens after ``ids [1, S]`` by greedy speculative decoding with ``k`` MTP draft tokens per step.

    Every round drafts and verifies ``k`` tokens (also the last one, whose surplus is cut off), so the
    statistics are per full round."""
    _check(model, ids, n)
    if not model.mtp:
        raise ValueError("speculative_generate: the model has no MTP block (loaded without mtp.*?)")
    if k < 1:
        raise ValueError(f"expected k >= 1 draft tokens, got {k}")
    stats = SpecStats(k=k, accepted_at=[0] * k)
    state = model.new_state()
    logits, hidden = model(ids, state)
    pending = int(logits[0, -1].argmax())
    out = [pending]
    mtp_state = model.new_mtp_state()
    # The draft catches up over the prompt: pairs (streams at p, token p + 1); its last output drafts d1.
    draft_logits, Z = model.forward_mtp(hidden, torch.cat((ids[:, 1:], ids.new_tensor([[pending]])), 1), mtp_state)
    while len(out) < n:
        pos = state.pos
        mtp_snap = snapshot_state(mtp_state)
        drafts = [int(draft_logits[0, -1].argmax())]
        z = Z[:, -1:]
        for _ in range(k - 1):
            step_logits, z = model.forward_mtp(z, ids.new_tensor([[drafts[-1]]]), mtp_state)
            drafts.append(int(step_logits[0, -1].argmax()))
        main_snap = snapshot_state(state)
        chunk = ids.new_tensor([[pending] + drafts])
        logits, hidden = model(chunk, state)
        greedy = logits[0].argmax(-1).tolist()                   # greedy[i]: main's token after chunk[: i + 1]
        a = 0
        while a < k and drafts[a] == greedy[a]:
            stats.accepted_at[a] += 1
            a += 1
        stats.drafts += 1
        stats.accepted += a
        stats.rounds.append((pos + 1, drafts, a))
        new = drafts[:a] + [greedy[a]]
        out += new
        if a < k:                                                 # drop the rejected tail from the main state
            state = main_snap
            model(chunk[:, : a + 1], state)
        mtp_state = mtp_snap
        draft_logits, Z = model.forward_mtp(hidden[:, : a + 1], ids.new_tensor([new]), mtp_state)
        pending = new[-1]
    return out[:n], stats


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution vLLM samples from for ``logits [..., V]`` at ``temperature > 0``: ``softmax(logits / T)``,
    restricted to the ``top_k`` most likely tokens and to the smallest most-likely set holding ``top_p`` of the
    mass, renormalised (fp32)."""
    if temperature <= 0:
        raise ValueError(f"sampling_probs: temperature must be > 0 (greedy has no distribution), got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is None and top_p is None:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if top_k is not None:
        sorted_p[..., top_k:] = 0
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    if top_p is not None:                     # top-k first: keep a token while the mass before it is < top_p
        sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def draft_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float, method: str,
                     *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Per row of ``[..., V]`` logits: the probability that vLLM accepts one draft token (module docstring)."""
    if method not in DRAFT_SAMPLE_METHODS:
        raise ValueError(f"draft_acceptance: method must be one of {DRAFT_SAMPLE_METHODS}, got {method!r}")
    if temperature == 0:
        return (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    p = sampling_probs(target_logits, temperature, top_k, top_p)
    if method == "greedy":
        return p.gather(-1, draft_logits.argmax(-1, keepdim=True))[..., 0]
    return torch.minimum(p, sampling_probs(draft_logits, temperature)).sum(-1)


def _drafted_pairs(model: DSV4Model, sequences: list[tuple[list[int], list[int]]]):
    """Per sequence with a prompt and >= 2 output tokens: ``(target logits, draft logits, token)`` at every
    output token but the first (the prefill's). The draft at ``p`` (main streams at ``p``, token ``p + 1``)
    proposes token ``p + 2``, which ``main[p + 1]`` scores."""
    from .mtp_eval import teacher_forced_logits

    for prompt, output in sequences:
        if len(prompt) < 1 or len(output) < 2:
            continue
        seq = torch.tensor([list(prompt) + list(output)])
        main, draft = teacher_forced_logits(model, seq)
        p = torch.arange(len(prompt) - 1, seq.shape[1] - 2)
        yield main[0, p + 1], draft[0, p], seq[0, p + 2]


@torch.no_grad()
def expected_acceptance(model: DSV4Model, sequences: list[tuple[list[int], list[int]]], temperature: float,
                        method: str, *, top_k: int | None = None, top_p: float | None = None) -> float:
    """Mean acceptance of a one-token draft over the generated tokens of ``(prompt, output)`` pairs, teacher-forced.

    The draft at ``p`` (main streams at ``p``, token ``p + 1``) proposes token ``p + 2``, which ``main[p + 1]``
    scores; every output token but the first (the prefill's) is a draft target, all weighted alike. It is what
    a draft at a random position accepts (for k > 1: per-position acceptance at position 0); vLLM's counters
    weight the positions its drafting chain visits, see :func:`expected_on_tokens`. Deeper positions (chained
    drafts on sampled prefixes) are not computed here."""
    rates = [draft_acceptance(main, draft, temperature, method, top_k=top_k, top_p=top_p)
             for main, draft, _ in _drafted_pairs(model, sequences)]
    if not rates:
        raise ValueError("expected_acceptance: no sequence with a prompt and at least two output tokens")
    return float(torch.cat(rates).mean())


@torch.no_grad()
def expected_on_tokens(model: DSV4Model, sequences: list[tuple[list[int], list[int]]], temperature: float,
                       method: str, *, top_k: int | None = None,
                       top_p: float | None = None) -> tuple[float, float, float]:
    """``(expected accepted, expected drafts, variance of accepted)`` of vLLM with ONE draft token per step on exactly these served
    sequences: each position's probability of being an accepted draft given its token (module docstring), run
    through the chain (a draft for output token ``i`` is followed by one for ``i + 2`` if accepted -- the bonus
    token -- else ``i + 1``). The variance is the Bernoulli noise given the tokens (an approximation: it
    ignores how an outcome moves the later drafts); 0 for greedy drafting, whose outcome the token decides."""
    if method not in DRAFT_SAMPLE_METHODS:
        raise ValueError(f"expected_on_tokens: method must be one of {DRAFT_SAMPLE_METHODS}, got {method!r}")
    accepted = drafts = var = 0.0
    for main, draft, x in _drafted_pairs(model, sequences):
        if temperature == 0 or method == "greedy":
            given = (draft.argmax(-1) == x).double()
        else:
            p = sampling_probs(main, temperature, top_k, top_p).double().gather(-1, x[:, None])[:, 0]
            q = sampling_probs(draft, temperature).double().gather(-1, x[:, None])[:, 0]
            given = torch.where(p > 0, (q / p).clamp(max=1), torch.zeros_like(p))
        reach = [1.0] + [0.0] * (len(given) + 1)        # reach[i]: P(a draft targets drafted position i)
        for i, c in enumerate(given.tolist()):
            accepted, drafts, var = accepted + reach[i] * c, drafts + reach[i], var + reach[i] * c * (1 - c)
            reach[i + 1] += reach[i] * (1 - c)
            reach[i + 2] += reach[i] * c
    return accepted, drafts, var
