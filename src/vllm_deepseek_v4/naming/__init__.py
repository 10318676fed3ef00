"""Naming: one table of rules maps every checkpoint convention onto the canonical (upstream) names."""
from __future__ import annotations

from .batch import Batch, resolve_names
from .resolver import Piece, Resolved, Resolver
from .rule import CONVENTIONS, Rule, Unfuse
from .tables import RULES

__all__ = ["Batch", "resolve_names", "Piece", "Resolved", "Resolver", "Rule", "Unfuse", "RULES", "CONVENTIONS"]
