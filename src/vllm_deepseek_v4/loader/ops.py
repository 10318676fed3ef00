"""The ops that cut a planned source out of its on-disk tensor (``select`` / ``narrow`` / ``t``), applied.

Its own module so that both the reader (``stream``) and the value checks (``values``, which map a bad
value's index in a slice back to the on-disk tensor) use it without importing each other.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["apply_ops"]


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
