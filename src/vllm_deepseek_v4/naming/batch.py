"""Resolve a whole checkpoint's names at once, with the same answers as ``Resolver.resolve`` name by name.

69,187 names at a few microseconds each would dominate planning. Instead names are grouped by their form
with digits blanked (one bytes pass over all names), and the rules that can match a group are looked up
from the templates' coarse forms (``rule.coarse``): no other rule can match any name of the group. If one
rule is left, names of one form differ only in their digits, so the rule is matched against one name per
spelling and the rest is checked column by column (``_matched_parts``); upstream names are their own
canonical names, other plain renames are one ``findall`` per group. Anything else (no or several
candidates, a name the rule does not match, fused tensors cut into slices, an MTP-only name below layer L)
is left to ``Resolver.resolve`` name by name; tests/test_plan_bulk.py checks both ways agree.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from itertools import compress, starmap
from typing import Iterator, Sequence

from .rule import Rule, coarse
from .tables import PREFIX_ALIASES

__all__ = ["Batch", "resolve_names", "positional_target", "at_least"]

_BLANK = bytes.maketrans(b"0123456789", b"#" * 10)     # every digit as "#": the group key
_MAY_DIFFER = frozenset("0123456789#")                  # characters a digit-blanked form does not pin down


@dataclass(slots=True)
class Batch:
    """Names that one rule renames as a whole: ``canonical[i]`` is the one piece of name ``index[i]``."""

    rule: Rule
    index: list[int]                 # positions in the input, ascending
    canonical: list[str] | None      # None when the rule drops the names on purpose (target None)
    text: str = ""                   # "\n".join(canonical), for whole-batch string passes


def positional_target(rule: Rule) -> str | None:
    """``rule.target`` over the pattern's groups by position (``{layer}`` -> ``{0}``), for ``findall`` tuples;
    None if it is more than a plain rename (slices, format specs, a field the pattern does not capture)."""
    if rule.unfuse is not None or rule.target is None:
        return None
    out = []
    for literal, name, spec, conv in string.Formatter().parse(rule.target):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if spec or conv or name not in rule.pattern.groupindex:
            return None
        out.append("{%d}" % (rule.pattern.groupindex[name] - 1))
    return "".join(out)


def resolve_names(resolver, names: Sequence[str]) -> tuple[list[Batch], list[int]]:
    """Split ``names`` into batches renamed in bulk and the positions left to ``resolver.resolve``."""
    n = len(names)
    text = "\n".join(names)
    if not n or not text.isascii():             # non-ASCII digits: \d matches them, the column checks do not
        return [], list(range(n))
    keys = names
    for old, new, _ in PREFIX_ALIASES:                               # as ``Resolver.resolve`` does, per name
        if text.startswith(old) or "\n" + old in text:
            text = ("\n" + text).replace("\n" + old, "\n" + new)[1:]
            keys = text.split("\n")
    forms = text.encode("ascii").translate(_BLANK).split(b"\n")
    if len(forms) != n:                         # a newline inside a name
        return [], list(range(n))
    groups: dict[bytes, list[int]] = {}
    for i, form in enumerate(forms):
        group = groups.get(form)
        if group is None:
            groups[form] = [i]
        else:
            group.append(i)
    batches: list[Batch] = []
    rest: list[int] = []
    for form, index in groups.items():
        rules = resolver.coarse_candidates(coarse(form.decode("ascii")))
        if len(rules) != 1 or rules[0].unfuse is not None or not resolver.is_template_rule(rules[0]):
            rest += index                       # only template regexes are known not to cross a newline
            continue
        for part, part_keys, lines in _matched_parts(rules[0], index, list(map(keys.__getitem__, index)), rest):
            batch = _batch(resolver, rules[0], part, part_keys, lines)
            if batch is None:
                rest += part
            else:
                batches.append(batch)
    rest.sort()
    return batches, rest


def _batch(resolver, rule: Rule, index: list[int], keys: list[str], lines: str) -> Batch | None:
    """A batch of names ``rule`` matches (``lines``: them joined by newlines), renamed; None to leave them to
    ``Resolver.resolve``."""
    if rule.target is None:
        return Batch(rule, index, None)
    if resolver.renames_to_self(rule):
        canonical, text = keys, lines
    else:
        fmt = positional_target(rule)
        if fmt is None:
            return None
        # "\n" + the pattern + a newline ahead matches exactly one whole line, like ^...$ on the name alone
        found = re.compile("\n" + rule.pattern.pattern[1:-1] + "(?=\n)").findall("\n" + lines + "\n")
        if len(found) != len(keys):
            return None
        if not rule.pattern.groups:
            canonical = [fmt] * len(keys)
        elif rule.pattern.groups == 1:
            canonical = list(map(fmt.format, found))
        else:
            canonical = list(starmap(fmt.format, found))
        text = "\n".join(canonical)
    if resolver.targets_layer(rule):            # every name is layers.N...: is any N an MTP layer (N >= L)?
        if rule.mtp_only or resolver.mtp_layer.match(text) or resolver.mtp_layer_after_newline.search(text):
            placed = [resolver.place_mtp(c, rule) for c in canonical]
            if any(problem for _, problem in placed):
                return None
            canonical = [c for c, _ in placed]
            text = "\n".join(canonical)
    elif text.startswith("layers.") or "\nlayers." in text:
        return None
    return Batch(rule, index, canonical, text)


def _matched_parts(rule: Rule, index: list[int], keys: list[str],
                   rest: list[int]) -> Iterator[tuple[list[int], list[str], str]]:
    """Parts of a group of names (one digit-blanked form, so one length) that ``rule`` matches as a whole,
    with the part's names joined by newlines; positions of the parts it may not match go to ``rest``.

    ``rule`` matches a part's first name; every other name has the same characters except where the first
    has a digit (or ``#``), so it matches the same way if it has digits where the rule reads a number and
    the same characters elsewhere (the ``1`` of ``w1``). Checked column by column, the names being lines of
    one width. Where such a pinned column varies, one name of each spelling is matched too; if the rule
    reads its numbers in other columns, the part is split by spelling and each piece checked on its own.
    """
    work = [(index, keys)]
    while work:
        index, keys = work.pop()
        first = keys[0]
        free = _free_columns(rule, first)
        if free is None:
            rest += index
            continue
        lines, width, n = "\n".join(keys), len(first) + 1, len(keys)
        columns = [c for c, ch in enumerate(first) if ch in _MAY_DIFFER]
        if not all(lines[c::width].isdigit() for c in columns if c in free):
            rest += index
            continue
        pinned = [lines[c::width] for c in columns if c not in free]
        if all(col == col[0] * n for col in pinned):
            yield index, keys, lines
            continue
        # names differ in a pinned column (w1, w2, w3): one name per spelling stands for all names with it
        marks = pinned[0] if len(pinned) == 1 else list(map("".join, zip(*pinned)))
        spellings = dict.fromkeys(marks)
        if all(_free_columns(rule, keys[marks.index(mark)]) == free for mark in spellings):
            yield index, keys, lines
            continue
        for mark in spellings:                  # split by spelling: each part is smaller
            sel = list(compress(range(n), map(mark.__eq__, marks)))
            work.append((list(map(index.__getitem__, sel)), list(map(keys.__getitem__, sel))))


def _free_columns(rule: Rule, name: str) -> set[int] | None:
    """The columns of ``name`` that ``rule`` reads as a number (its \\d+ captures); None if it does not match."""
    m = rule.pattern.match(name)
    if m is None:
        return None
    free: set[int] = set()
    for group in rule.pattern.groupindex:
        if f"(?P<{group}>\\d+)" in rule.pattern.pattern and m.start(group) >= 0:
            free.update(range(*m.span(group)))
    return free


def at_least(n: int) -> str:
    """Regex source for a run of decimal digits (leading zeros allowed) whose value is at least ``n``."""
    s = str(n)
    alts = [f"[1-9][0-9]{{{len(s)},}}"]                 # more significant digits than n
    alts += [f"{s[:i]}[{int(d) + 1}-9][0-9]{{{len(s) - i - 1}}}" for i, d in enumerate(s) if d != "9"]
    return "0*(?:" + "|".join(alts + [s]) + ")"
