"""Stream an artifact through its load plan: one canonical tensor at a time, never a list of all weights.

``iter_plan_tensors`` yields ``(key, tensor)`` in canonical names: ``{module}.{role}`` for linear modules,
the full name for plain tensors. Fused sources are sliced by their ``ops``; copies of the shared
``embed``/``head`` are compared with the primary and only the primary is yielded. Peak extra memory is one
source tensor (the reader keeps no tensor data between reads).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ..errors import AliasMismatchError

if TYPE_CHECKING:
    import torch

    from .plan import LoadPlan, Source

__all__ = ["iter_plan_tensors", "apply_ops", "plan_keys"]


def apply_ops(t: "torch.Tensor", ops: tuple[tuple, ...]) -> "torch.Tensor":
    """Apply ``select`` / ``narrow`` / ``t`` steps in order (views; ``contiguous`` is the caller's choice)."""
    for op in ops:
        if op[0] == "select":
            t = t.select(op[1], op[2])
        elif op[0] == "narrow":
            t = t.narrow(op[1], op[2], op[3])
        elif op[0] == "t":
            t = t.t()
        else:
            raise ValueError(f"unknown op {op!r}")
    return t


def plan_keys(plan: "LoadPlan") -> list[str]:
    """Every canonical key the plan fills, in streaming order."""
    return [key for name, pp in plan.params.items() for key in _keys(name, pp)]


def _keys(name: str, pp) -> list[str]:
    return [name] if pp.quant is None else [f"{name}.{role}" for role in pp.roles]


def iter_plan_tensors(plan: "LoadPlan", *, progress: bool = True, atol: float = 0.0) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield every planned tensor once, in canonical names. Raises if the plan is not ``ok``."""
    import torch
    from tqdm import tqdm

    from ..checkpoint import TensorReader

    plan.raise_if_bad()
    total = sum(len(pp.roles) for pp in plan.params.values())
    bar = tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False)
    with TensorReader(plan.checkpoint) as reader:
        def read(src: "Source") -> torch.Tensor:
            t = reader.read(plan.checkpoint.tensors[src.tensor])
            return apply_ops(t, src.ops).contiguous() if src.ops else t
        for name, pp in plan.params.items():
            for role, src in pp.roles.items():
                t = read(src)
                key = name if pp.quant is None else f"{name}.{role}"
                for alias in pp.aliases:
                    _compare(key, src, t, alias, read(alias), atol)
                bar.update(1)
                yield key, t
    bar.close()


def _compare(key: str, src: "Source", t: "torch.Tensor", alias: "Source", a: "torch.Tensor", atol: float) -> None:
    """Aliased copies of a shared tensor must hold the same values (after casting: fp32 copies of bf16 heads)."""
    import torch
    if a.shape != t.shape:
        raise AliasMismatchError(file=alias.file, tensor=alias.tensor, expected=f"shape {list(t.shape)} of {src.tensor}",
                                 found=list(a.shape))
    diff = (a.float() - t.float()).abs().max().item() if t.numel() else 0.0
    if not diff <= atol:
        raise AliasMismatchError(file=alias.file, tensor=alias.tensor, expected=f"the values of {src.tensor} "
                                 f"({key})", found=f"max abs difference {diff:g}",
                                 hint="two copies of a shared tensor disagree; which one the draft should use is unknown")
    del torch
