"""Map every on-disk tensor name to canonical (upstream) tensor names, with the slicing each needs.

Every name must match exactly one rule: none leaves it unmapped (the plan reports it), two or more is an
:class:`AmbiguousRuleError` naming every reason. All names of a checkpoint are resolved at once
(``resolve_names``), one regex match per skeleton (``naming.batch``): plain renames come back as batches,
fused tensors (cut by their shapes) as pieces. A layer index at or above L places a name in MTP block
``index - L``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from typing import Callable, Sequence

from ..config import DSV4Config
from ..errors import AmbiguousRuleError, DSV4Error, TensorShapeError
from .batch import Batch, at_least, forms, renamed
from .rule import Rule, Unfuse, coarse
from .tables import PREFIX_ALIASES, RULES, RULES_COARSE, CoarseIndex, coarse_index

__all__ = ["Piece", "Resolution", "Resolver", "Op"]

# A transform step applied to the on-disk tensor, in order: ("select", dim, i) | ("narrow", dim, start, n) | ("t",)
Op = tuple

_LAYER = re.compile(r"layers\.(\d+)\.")
_FIELD = re.compile(r"\{(\w+)(?::([\w|.]+))?\}")


@dataclass(frozen=True, slots=True)
class Piece:
    """One canonical tensor (or a part of one) taken from one on-disk tensor."""

    canonical: str
    source: str
    shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()


@dataclass(slots=True)
class Resolution:
    """Where every name went, by its position in the input."""

    batches: list[Batch] = field(default_factory=list)             # whole tensors renamed (or dropped) by a rule
    fused: list[tuple[int, Rule, list[Piece]]] = field(default_factory=list)   # tensors cut into pieces
    unmapped: list[int] = field(default_factory=list)              # names no rule matches
    refused: list[tuple[int, DSV4Error]] = field(default_factory=list)   # several rules match, or a bad cut
    misplaced: list[tuple[int, Rule, str]] = field(default_factory=list)  # an MTP-only name below layer L: why


def _numeric_segments_are_indices(template: str) -> bool:
    """True if every all-digit segment of every name ``template`` matches is one ``{L}``/``{K}``/``{E}``.

    ``resolve_names`` decides once per skeleton; that is exact only if no rule reads a number as text."""
    pieces: list[tuple[str, ...]] = []
    pos = 0
    for m in _FIELD.finditer(template):
        name, alts = m.groups()
        # an index is "\0" here; a role suffix always has letters, so it never makes a segment numeric
        pieces += [(template[pos:m.start()],), tuple(alts.split("|")) if alts else ("x" if name == "Q" else "\0",)]
        pos = m.end()
    pieces.append((template[pos:],))
    return all(seg == "\0" or not seg or seg.strip("0123456789\0")
               for name in map("".join, product(*pieces)) for seg in name.split("."))


@lru_cache(maxsize=8)
def _checked_index(rules: tuple[Rule, ...]) -> CoarseIndex:
    """The coarse index of ``rules``, once they are known to suit matching by skeleton."""
    index = RULES_COARSE if rules is RULES else coarse_index(rules)
    if index.wild:
        raise ValueError(f"naming rule {rules[index.wild[0]].pattern.pattern!r} is not its template's regex: "
                         "rules are matched by skeleton, so each must be written as a template")
    for r in rules:
        if not _numeric_segments_are_indices(r.key[0] + r.key[1]):
            raise ValueError(f"naming rule {r.pattern.pattern!r} reads a numeric segment as text; "
                             "every number must be an {L}, {K} or {E} placeholder")
    return index


class Resolver:
    """Resolves names against the compiled rule table for one config (L decides which layers are MTP)."""

    def __init__(self, cfg: DSV4Config, rules: Sequence[Rule] = RULES) -> None:
        self.cfg, self.rules = cfg, tuple(rules)
        self._coarse = _checked_index(RULES if self.rules == RULES else self.rules)
        self._by_coarse: dict[str, tuple[Rule, ...]] = {}
        # a canonical "layers.N." with N >= L: at the start of a batch's text, or after a newline in it (two
        # patterns, so that each scans for its literal start)
        layer = r"layers\." + at_least(cfg.n_layers) + r"\."
        self._mtp_first, self._mtp_later = re.compile(layer), re.compile("\n" + layer)

    def candidates(self, form: str) -> tuple[Rule, ...]:
        """Every rule that can match a name of digit-blanked form ``form``, in table order."""
        key = coarse(form)
        hit = self._by_coarse.get(key)
        if hit is None:
            pos = sorted(self._coarse.by_form.get(key, ()))
            hit = self._by_coarse[key] = tuple(self.rules[p] for p in pos)
        return hit

    def resolve_names(self, names: Sequence[str], shape_of: Callable[[int], tuple[int, ...]]) -> Resolution:
        """Resolve every name; ``shape_of(i)`` is the shape of tensor ``names[i]`` (read only for fused ones)."""
        keys, text = _unaliased(names)
        out = Resolution()
        for f in forms(keys, text):
            found = [self._matches(keys[i], f.form) for i in f.firsts()]
            if len(found) == 1 or self._alike(found):
                self._settle(found[0], f.index, f.runs, names, keys, shape_of, out)
                continue
            for found_one, index in zip(found, f.skeletons()):
                self._settle(found_one, index, f.runs, names, keys, shape_of, out)
        return out

    def _alike(self, found: list[list[tuple[Rule, re.Match[str]]]]) -> bool:
        """True if one rule matches every skeleton of a form and keeps (or drops) each name as it is: then
        the skeletons need not be told apart (``w1``/``w2``/``w3`` of upstream experts)."""
        rule = found[0][0][0] if len(found[0]) == 1 else None
        return (rule is not None and (rule.target is None or id(rule) in self._coarse.identity)
                and all(len(one) == 1 and one[0][0] is rule for one in found))

    def _matches(self, key: str, form: str) -> list[tuple[Rule, re.Match[str]]]:
        return [(rule, m) for rule in self.candidates(form) if (m := rule.pattern.fullmatch(key))]

    def _settle(self, found: list[tuple[Rule, re.Match[str]]], index: list[int], runs: list[tuple[int, int]],
                names: Sequence[str], keys: list[str], shape_of: Callable[[int], tuple[int, ...]],
                out: Resolution) -> None:
        """File the names of one skeleton (``found``: the rules that match its first name, with the match)."""
        if not found:
            out.unmapped += index
        elif len(found) > 1:
            hint = "; ".join(f"{rule.pattern.pattern} ({rule.reason})" for rule, _ in found)
            out.refused += [(i, AmbiguousRuleError(f"matches several naming rules: {hint}", tensor=names[i]))
                            for i in index]
        elif found[0][0].target is None:
            out.batches.append(Batch(found[0][0], index, None))
        elif found[0][0].unfuse is not None:
            self._cut(found[0][0], index, names, keys, shape_of, out)
        else:
            self._rename(*found[0], index, runs, keys, out)

    def _rename(self, rule: Rule, match: re.Match[str], index: list[int], runs: list[tuple[int, int]],
                keys: list[str], out: Resolution) -> None:
        names = list(map(keys.__getitem__, index))
        canonical = names if id(rule) in self._coarse.identity else renamed(rule, match, runs, names)
        text = "\n".join(canonical)
        if rule.mtp_only or self._mtp_first.match(text) or self._mtp_later.search(text):   # in an MTP layer
            placed = [self._place_mtp(c, rule) for c in canonical]
            out.misplaced += [(i, rule, problem) for i, (_, problem) in zip(index, placed) if problem]
            index = [i for i, (_, problem) in zip(index, placed) if not problem]
            canonical = [c for c, problem in placed if not problem]
            text = "\n".join(canonical)
        if index:
            out.batches.append(Batch(rule, index, canonical, text))

    def _cut(self, rule: Rule, index: list[int], names: Sequence[str], keys: list[str],
             shape_of: Callable[[int], tuple[int, ...]], out: Resolution) -> None:
        """Fused tensors, one by one: their pieces' sizes depend on each tensor's shape."""
        for i in index:
            groups = rule.pattern.fullmatch(keys[i]).groupdict()  # type: ignore[union-attr]  # one skeleton
            try:
                pieces = self._pieces(names[i], tuple(shape_of(i)), rule, groups)
            except DSV4Error as e:
                out.refused.append((i, e))
                continue
            placed = [self._place_mtp(p.canonical, rule) for p in pieces]
            problem = next((problem for _, problem in placed if problem), "")
            if problem:
                out.misplaced.append((i, rule, problem))
            else:
                out.fused.append((i, rule, [Piece(c, p.source, p.shape, p.ops) for (c, _), p in zip(placed, pieces)]))

    def _place_mtp(self, canon: str, rule: Rule) -> tuple[str, str]:
        """``layers.N.`` with N >= L is MTP block ``N - L``; an MTP-only name below L is a problem."""
        m = _LAYER.match(canon)
        if m is None:
            return canon, ""
        n, L = int(m.group(1)), self.cfg.n_layers
        if n >= L:
            return f"mtp.{n - L}." + canon[m.end():], ""
        if rule.mtp_only:
            return canon, f"only valid in an MTP layer (index >= {L}), found in layer {n}"
        return canon, ""

    def _pieces(self, name: str, shape: tuple[int, ...], rule: Rule, g: dict[str, str | None]) -> list[Piece]:
        uf = rule.unfuse
        assert rule.target is not None and uf is not None
        role = g.get("role") or "weight"
        if uf.transposed and role != "weight":
            raise TensorShapeError(f"transposed stacked experts carry no quant roles; found {role}", tensor=name)
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

    def _split(self, name: str, shape: tuple[int, ...], uf: Unfuse,
               role: str) -> list[tuple[str, tuple[Op, ...], tuple[int, ...]]]:
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
        if sum(sizes) != total or any(s * want != n * total for s, n in zip(sizes, logical)):
            raise TensorShapeError(tensor=name, expected=f"parts {uf.parts} of sizes {logical} to split dim "
                                   f"{stored_dim} evenly ({role})", found=list(shape))
        pieces, start = [], 0
        for part, n in zip(uf.parts, sizes):
            pshape = list(shape)
            pshape[stored_dim] = n
            ps = tuple(reversed(pshape)) if uf.transposed else tuple(pshape)
            pieces.append((part, (("narrow", stored_dim, start, n),) + tail, ps))
            start += n
        return pieces


def _unaliased(names: Sequence[str]) -> tuple[list[str], str]:
    """``names`` with whole-prefix spellings normalised (``PREFIX_ALIASES``), as the rules spell them, and
    joined by newlines."""
    keys = list(names)
    text = "\n".join(keys)
    for old, new, _ in PREFIX_ALIASES:
        if text.startswith(old) or "\n" + old in text:
            keys = [new + k[len(old):] if k.startswith(old) else k for k in keys]
            text = "\n".join(keys)
    return keys, text
