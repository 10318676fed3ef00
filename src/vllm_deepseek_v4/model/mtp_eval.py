"""Teacher-forced main + MTP predictions over known text: the training losses and the draft's agreement.

Shared by ``scripts/train_tiny.py`` (its loss is :func:`teacher_forced_losses`), the tiny-model tests and the
acceptance benchmarks, so "MTP loss" and "agreement" mean one thing everywhere.

Positions: for ``ids [B, S]`` the main model predicts token ``p + 1`` at every ``p``; ``mtp.k=0`` at ``p`` sees
the main streams at ``p`` and the true token ``p + 1`` and predicts ``p + 2``, for ``p = 0 .. S - 3``.
*Agreement* is the fraction of those ``p`` where the draft's argmax equals the main model's argmax at
``p + 1`` -- what greedy speculative decoding with one draft token accepts on this text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .model import DSV4Model

__all__ = ["teacher_forced_logits", "teacher_forced_losses", "MTPScores", "mtp_scores"]


def teacher_forced_logits(model: DSV4Model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, S]`` (S >= 3) from position 0 -> ``(main [B, S, V], draft [B, S - 2, V])`` fp32 logits."""
    if ids.dim() != 2 or ids.shape[1] < 3:
        raise ValueError(f"teacher_forced_logits: ids must be [B, S] with S >= 3, got {list(ids.shape)}")
    main, hidden = model(ids)
    draft, _ = model.forward_mtp(hidden[:, :-2], ids[:, 1:-1], model.new_mtp_state(), k=0)
    return main, draft


def teacher_forced_losses(model: DSV4Model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross entropy of the main model and of the draft (token ``p + 2``), as tensors."""
    main, draft = teacher_forced_logits(model, ids)
    V = main.shape[-1]
    main_ce = F.cross_entropy(main[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    mtp_ce = F.cross_entropy(draft.reshape(-1, V), ids[:, 2:].reshape(-1))
    return main_ce, mtp_ce


@dataclass(frozen=True)
class MTPScores:
    """Teacher-forced scores over some text (means over positions)."""

    main_loss: float          # next-token cross entropy (nats)
    mtp_loss: float           # cross entropy of the draft on token p + 2
    main_accuracy: float      # argmax main(p) == token p + 1
    draft_accuracy: float     # argmax draft(p) == token p + 2
    agreement: float          # argmax draft(p) == argmax main(p + 1): greedy acceptance at k = 1
    positions: int            # draft positions scored

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def mtp_scores(model: DSV4Model, windows: torch.Tensor, *, batch: int = 8) -> MTPScores:
    """Score ``windows [n, S]`` (each an independent sequence from position 0) in batches of ``batch``."""
    sums = dict(main_loss=0.0, mtp_loss=0.0, main_accuracy=0.0, draft_accuracy=0.0, agreement=0.0)
    n_main = n_draft = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        main, draft = teacher_forced_logits(model, ids)
        V = main.shape[-1]
        sums["main_loss"] += F.cross_entropy(main[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum").item()
        sums["mtp_loss"] += F.cross_entropy(draft.reshape(-1, V), ids[:, 2:].reshape(-1), reduction="sum").item()
        main_top, draft_top = main.argmax(-1), draft.argmax(-1)
        sums["main_accuracy"] += (main_top[:, :-1] == ids[:, 1:]).sum().item()
        sums["draft_accuracy"] += (draft_top == ids[:, 2:]).sum().item()
        sums["agreement"] += (draft_top == main_top[:, 1:-1]).sum().item()
        n_main += ids[:, 1:].numel()
        n_draft += ids[:, 2:].numel()
    if n_draft == 0:
        raise ValueError("mtp_scores: no windows to score")
    per_main = {"main_loss", "main_accuracy"}
    return MTPScores(**{k: v / (n_main if k in per_main else n_draft) for k, v in sums.items()}, positions=n_draft)
