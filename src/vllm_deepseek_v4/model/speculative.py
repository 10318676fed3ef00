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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DSV4Error
from .kv_store import AttnCache
from .model import DSV4Model, ModelState

__all__ = ["SpecStats", "snapshot_state", "greedy_generate", "speculative_generate"]


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
