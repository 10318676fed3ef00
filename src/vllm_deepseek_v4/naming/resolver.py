"""Map every on-disk tensor name to canonical (upstream) tensor names, with the slicing each needs.

Every name must match exactly one rule: none is an :class:`UnmappedTensorError` (collected by the plan),
two is an :class:`AmbiguousRuleError` naming both reasons. Matching is done once per *skeleton* (the name
with its numeric segments blanked), which is exact because rules only capture whole numeric segments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..config import DSV4Config
from ..errors import AmbiguousRuleError, TensorShapeError
from .batch import at_least
from .rule import Rule
from .tables import PREFIX_ALIASES, RULES, RULES_COARSE, coarse_index

__all__ = ["Piece", "Resolved", "Resolver", "Op"]

# A transform step applied to the on-disk tensor, in order: ("select", dim, i) | ("narrow", dim, start, n) | ("t",)
Op = tuple

_NUM = re.compile(r"(?<![^.])\d+(?![^.])")


@dataclass(frozen=True, slots=True)
class Piece:
    """One canonical tensor (or a part of one) taken from one on-disk tensor."""

    canonical: str
    source: str
    shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolved:
    """What one on-disk tensor means: its rule (None if unmapped) and the pieces it fills."""

    source: str
    rule: Rule | None
    pieces: tuple[Piece, ...]
    problem: str = ""


class Resolver:
    """Resolves names against the compiled rule table for one config (L decides which layers are MTP)."""

    def __init__(self, cfg: DSV4Config, rules: Sequence[Rule] = RULES) -> None:
        self.cfg, self.rules = cfg, tuple(rules)
        self._by_skeleton: dict[str, tuple[Rule, ...]] = {}
        self._coarse = RULES_COARSE if self.rules is RULES else coarse_index(self.rules)
        self._by_coarse: dict[str, tuple[Rule, ...]] = {}
        # a main-layer name ``place_mtp`` moves into an MTP block (index >= L): at the start, after a newline
        self.mtp_layer = re.compile(r"layers\." + at_least(cfg.n_layers) + r"\.")
        self.mtp_layer_after_newline = re.compile(r"\nlayers\." + at_least(cfg.n_layers) + r"\.")

    def coarse_candidates(self, form: str) -> tuple[Rule, ...]:
        """Every rule that can match a name of coarse form ``form`` (``rule.coarse``), in table order."""
        hit = self._by_coarse.get(form)
        if hit is None:
            pos = sorted(set(self._coarse.by_form.get(form, ())).union(self._coarse.wild))
            hit = self._by_coarse[form] = tuple(self.rules[p] for p in pos)
        return hit

    def is_template_rule(self, rule: Rule) -> bool:
        """True if ``rule.pattern`` is its template's regex (literals, digit runs and word alternations only)."""
        return id(rule) in self._coarse.templated

    def targets_layer(self, rule: Rule) -> bool:
        """True if ``rule`` is a template rule whose target starts ``layers.{layer}.``: every name it renames
        starts ``layers.N.`` with N its captured digits, the index ``place_mtp`` reads."""
        return id(rule) in self._coarse.templated and (rule.target or "").startswith("layers.{layer}.")

    def renames_to_self(self, rule: Rule) -> bool:
        """True if ``rule`` is a template rule whose target is its own template (upstream names)."""
        return id(rule) in self._coarse.identity

    def _candidates(self, name: str) -> tuple[Rule, ...]:
        skel = _NUM.sub("#", name)
        hit = self._by_skeleton.get(skel)
        if hit is None:
            hit = tuple(r for r in self.rules if r.pattern.match(name))
            self._by_skeleton[skel] = hit
        return hit

    def resolve(self, name: str, shape: Sequence[int]) -> Resolved:
        key = name
        for old, new, _ in PREFIX_ALIASES:
            if key.startswith(old):
                key = new + key[len(old):]
        rules = self._candidates(key)
        if not rules:
            return Resolved(name, None, (), "matches no naming rule")
        if len(rules) > 1:
            raise AmbiguousRuleError(tensor=name, hint="matches several naming rules: " +
                                     "; ".join(f"{r.pattern.pattern} ({r.reason})" for r in rules))
        rule = rules[0]
        m = rule.pattern.match(key)
        assert m is not None, (name, rule.pattern.pattern)
        if rule.target is None:
            return Resolved(name, rule, ())
        groups = m.groupdict()
        pieces = self._pieces(name, tuple(shape), rule, groups)
        out, problem = [], ""
        for p in pieces:
            canon, problem_p = self.place_mtp(p.canonical, rule)
            problem = problem or problem_p
            out.append(Piece(canon, p.source, p.shape, p.ops))
        return Resolved(name, rule, tuple(out), problem)

    def resolve_all(self, items: Iterable[tuple[str, Sequence[int]]]) -> list[Resolved]:
        return [self.resolve(n, s) for n, s in items]

    def place_mtp(self, canon: str, rule: Rule) -> tuple[str, str]:
        """``layers.N.`` with N >= L is MTP block ``N - L``; MTP-only names below L are a problem."""
        if not canon.startswith("layers."):
            return canon, ""
        dot = canon.index(".", 7)
        n, L = int(canon[7:dot]), self.cfg.n_layers
        if n >= L:
            return f"mtp.{n - L}" + canon[dot:], ""
        if rule.mtp_only:
            return canon, f"only valid in an MTP layer (index >= {L}), found in layer {n}"
        return canon, ""

    def _pieces(self, name: str, shape: tuple[int, ...], rule: Rule, g: dict[str, str | None]) -> list[Piece]:
        uf = rule.unfuse
        assert rule.target is not None
        if uf is None:
            return [Piece(rule.target.format(**g), name, shape)]
        role = g.get("role") or "weight"
        if uf.transposed and role != "weight":
            raise TensorShapeError(tensor=name, hint=f"transposed stacked experts carry no quant roles; found {role}")
        experts: list[tuple[Op, ...]] = [()]
        rest = shape
        if uf.stacked:
            if not shape:
                raise TensorShapeError(tensor=name, expected="a stacked [E, ...] tensor", found=list(shape))
            experts = [(("select", 0, e),) for e in range(shape[0])]
            rest = shape[1:]
        pieces = []
        for ei, pre in enumerate(experts):
            fmt = dict(g, expert=str(ei), role=role)
            for part, ops, pshape in self._split(name, rest, uf, role):
                fmt["part"] = part
                pieces.append(Piece(rule.target.format(**fmt), name, pshape, pre + ops))
        return pieces

    def _split(self, name: str, shape: tuple[int, ...], uf, role: str) -> list[tuple[str, tuple[Op, ...], tuple[int, ...]]]:
        """Cut one (per-expert) tensor into its parts. Quant companions are cut in proportion."""
        tail: tuple[Op, ...] = (("t",),) if uf.transposed else ()
        out_shape = tuple(reversed(shape)) if uf.transposed and len(shape) == 2 else shape
        if not uf.parts:
            return [("", tail, out_shape)]
        if len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
            return [(p, (), shape) for p in uf.parts]                   # one global scale shared by all parts
        if len(shape) == 1 and shape[0] == len(uf.parts):
            return [(p, (("select", 0, i),), ()) for i, p in enumerate(uf.parts)]  # one global per part
        dim = (1 if uf.split_in else 0)
        stored_dim = (1 - dim) if uf.transposed else dim
        total = shape[stored_dim]
        logical = [int(getattr(self.cfg, s)) for s in uf.sizes] if uf.sizes else []
        if not logical:
            if total % len(uf.parts):
                raise TensorShapeError(tensor=name, expected=f"dim {stored_dim} divisible into {len(uf.parts)} parts",
                                       found=list(shape))
            logical = [total // len(uf.parts)] * len(uf.parts)
        want = sum(logical)
        if want % total and total % want:
            raise TensorShapeError(tensor=name, expected=f"dim {stored_dim} proportional to {want} ({uf.parts})",
                                   found=list(shape))
        sizes = [s * total // want for s in logical]
        if sum(sizes) != total or any(s * want != l * total for s, l in zip(sizes, logical)):
            raise TensorShapeError(tensor=name, expected=f"parts {uf.parts} of sizes {logical} to split dim {stored_dim} "
                                   f"evenly ({role})", found=list(shape))
        pieces, start = [], 0
        for part, n in zip(uf.parts, sizes):
            pshape = list(shape)
            pshape[stored_dim] = n
            ps = tuple(reversed(pshape)) if uf.transposed else tuple(pshape)
            pieces.append((part, (("narrow", stored_dim, start, n),) + tail, ps))
            start += n
        return pieces
