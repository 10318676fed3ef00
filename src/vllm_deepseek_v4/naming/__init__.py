"""Naming: one table of rules maps every checkpoint convention onto the canonical (upstream) names."""
from __future__ import annotations

from .resolver import Piece, Resolved, Resolver
from .rule import CONVENTIONS, Rule, Unfuse
from .tables import RULES

__all__ = ["Piece", "Resolved", "Resolver", "Rule", "Unfuse", "RULES", "CONVENTIONS"]
