"""Line up the columns of role sources that fill the same linear modules.

A *column* holds one role (``weight``, ``scale``...) for a list of modules, as the naming step renamed them
together: ``layers.N.ffn.experts.E.w1.weight`` for every N and E is one column, the matching ``.scale``
names another. A *cell* is a set of modules filled by exactly the same columns, so every module of a cell
has the same roles, and ``account`` can classify them a column at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .expected import ParamSpec
from .records import AnySource

__all__ = ["Column", "cells"]


@dataclass(slots=True)
class Column:
    """Sources of one role for a list of expected linear modules, each module once."""

    role: str
    modules: list[str]
    sources: list[AnySource]
    index: list[int]                 # each source's position in the checkpoint
    specs: list[ParamSpec]           # of ``modules``
    members: frozenset[str]          # set(modules); columns of one module list share it
    _at: dict[str, int] | None = field(default=None, init=False)

    def positions(self, modules: list[str]) -> list[int]:
        """Where each of ``modules`` sits in this column."""
        if self._at is None:
            self._at = dict(zip(self.modules, range(len(self.modules))))
        return list(map(self._at.__getitem__, modules))


def cells(columns: list[Column]) -> list[tuple[list[str], list[Column]]]:
    """Partition the modules of ``columns`` by which columns fill them: ``(modules, columns)`` per cell."""
    families: dict[frozenset[str], list[Column]] = {}
    for col in columns:
        families.setdefault(col.members, []).append(col)
    sets = list(families)
    if sum(map(len, sets)) == len(frozenset().union(*sets)):        # disjoint: the usual case
        return [(cols[0].modules, cols) for cols in families.values()]
    parts: list[tuple[set[str], list[frozenset[str]]]] = []        # (modules, the families that fill them)
    for fs in sets:
        rest, refined = set(fs), []
        for part, members in parts:
            common = part & rest
            if not common:
                refined.append((part, members))
                continue
            refined.append((common, members + [fs]))
            if len(common) < len(part):
                refined.append((part - common, members))
            rest -= common
        if rest:
            refined.append((rest, [fs]))
        parts = refined
    return [(sorted(part), [col for fs in members for col in families[fs]]) for part, members in parts]
