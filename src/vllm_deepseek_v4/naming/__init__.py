"""Naming: one table of rules maps every checkpoint convention onto the canonical (upstream) names."""
from __future__ import annotations

from .batch import Batch
from .resolver import Piece, Resolution, Resolver
from .rule import CONVENTIONS, Rule, Unfuse
from .tables import RULES

__all__ = ["Batch", "Piece", "Resolution", "Resolver", "Rule", "Unfuse", "RULES", "CONVENTIONS"]
