"""Resolve a whole checkpoint's names at once, with the same answers as ``Resolver.resolve`` name by name.

69,187 names at a few microseconds each would dominate planning. Instead names are grouped by their coarse
form (``coarse``: digit runs collapsed, one string pass over all names); the rules that can match a group
are looked up from the templates' coarse forms; and a group whose only candidate is a plain rename is
matched and renamed by one ``re.subn`` over the group's names joined by newlines. The count of
replacements proves every name matched, and no other rule can match any of them, so each name resolves to
exactly that rule. Anything else (no or several candidates, a name the rule does not match, fused tensors
cut into slices, an MTP-only name below layer L) is left to ``Resolver.resolve`` name by name.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from itertools import starmap
from typing import Sequence

from .rule import Rule, coarse
from .tables import PREFIX_ALIASES

__all__ = ["Batch", "resolve_names", "positional_target"]

_MAIN_LAYER = re.compile(r"\nlayers\.([0-9]+)\.")      # the index ``Resolver.place_mtp`` reads, after a newline


@dataclass(slots=True)
class Batch:
    """Names that one rule renames as a whole: ``canonical[i]`` is the one piece of name ``index[i]``."""

    rule: Rule
    index: list[int]                 # positions in the input, ascending
    canonical: list[str] | None      # None when the rule drops the names on purpose (target None)


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
    if not n or text.count("\n") != n - 1 or not text.isascii():   # newlines in names, or non-ASCII digits
        return [], list(range(n))
    for old, new, _ in PREFIX_ALIASES:                               # as ``Resolver.resolve`` does, per name
        text = ("\n" + text).replace("\n" + old, "\n" + new)[1:]
    keys = text.split("\n")
    groups: dict[str, list[int]] = {}
    for i, form in enumerate(coarse(text).split("\n")):
        group = groups.get(form)
        if group is None:
            groups[form] = [i]
        else:
            group.append(i)
    batches: list[Batch] = []
    rest: list[int] = []
    for form, index in groups.items():
        rules = resolver.coarse_candidates(form)
        batch = _batch(resolver, rules[0], index, list(map(keys.__getitem__, index))) if len(rules) == 1 else None
        if batch is None:
            rest += index
        else:
            batches.append(batch)
    rest.sort()
    return batches, rest


def _batch(resolver, rule: Rule, index: list[int], keys: list[str]) -> Batch | None:
    if rule.unfuse is not None or not resolver.is_template_rule(rule):    # template regexes never cross a newline
        return None
    # "\n" + the pattern + a newline ahead matches exactly one whole line, like ^...$ on the name alone, and
    # starts with a literal the regex engine can search for
    rx = re.compile("\n" + rule.pattern.pattern[1:-1] + "(?=\n)")
    text = "\n" + "\n".join(keys) + "\n"
    if rule.target is None or resolver.renames_to_self(rule):
        if rx.subn("", text)[1] != len(keys):
            return None
        if rule.target is None:
            return Batch(rule, index, None)
        canonical = keys
    else:
        fmt = positional_target(rule)
        if fmt is None:
            return None
        found = rx.findall(text)
        if len(found) != len(keys):
            return None
        if rx.groups == 0:
            canonical = [fmt] * len(keys)
        elif rx.groups == 1:
            canonical = list(map(fmt.format, found))
        else:
            canonical = list(starmap(fmt.format, found))
        text = "\n" + "\n".join(canonical) + "\n"
    if text.startswith("\nlayers.") or "\nlayers." in text:
        numbers = _MAIN_LAYER.findall(text)
        if len(numbers) != len(canonical):
            return None
        if rule.mtp_only or any(int(s) >= resolver.cfg.n_layers for s in set(numbers)):
            placed = [resolver.place_mtp(c, rule) for c in canonical]
            if any(problem for _, problem in placed):
                return None
            canonical = [c for c, _ in placed]
    return Batch(rule, index, canonical)
