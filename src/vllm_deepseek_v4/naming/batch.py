"""String passes over many tensor names at once: group them by skeleton, rename a group in one go.

A name's *skeleton* is the name with its whole numeric segments blanked (``layers.#.ffn.experts.#.w1.weight``).
Rules capture exactly the whole numeric segments, so every name of one skeleton matches the same rules with
its numbers in the same places: one regex match per skeleton decides for all of them (``Resolver``).

Skeletons are found without a regex over 69k names: the names, joined by newlines, have every ASCII digit
blanked to ``#`` in one bytes pass (a *form*; all names of a form have one length); a form's digit runs
that are not whole segments (the ``1`` of ``w1``) are read column by column and tell its skeletons apart.
A name the bytes pass cannot blank (non-ASCII, or holding ``#`` or a newline) is a form of its own.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from itertools import compress, starmap
from typing import Sequence

from .rule import Rule

__all__ = ["Batch", "Form", "forms", "renamed", "at_least"]

_BLANK = bytes.maketrans(b"0123456789", b"#" * 10)     # every digit as "#": the form
_RUN = re.compile("#+")
_CONVERT = {"r": repr, "s": str, "a": ascii}


@dataclass(slots=True)
class Batch:
    """Names one rule renames whole: name ``index[i]`` is the canonical tensor ``canonical[i]``."""

    rule: Rule
    index: list[int]                 # positions in the input, ascending
    canonical: list[str] | None      # None when the rule drops the names on purpose (target None)
    text: str = ""                   # "\n".join(canonical), for whole-batch string passes


@dataclass(slots=True)
class Form:
    """Names with one digit-blanked form: one length, digits in the same columns.

    ``runs`` are the columns ``(start, end)`` of the form's whole numeric segments, in order; ``digits`` holds
    each name's other digits (``w1``'s ``1``; None when the form has none). Names that agree on those are one
    skeleton.
    """

    form: str
    index: list[int]                         # positions in the input, ascending
    runs: list[tuple[int, int]]
    digits: Sequence[str] | None = None

    def firsts(self) -> list[int]:
        """The position of the first name of each skeleton."""
        if self.digits is None:
            return self.index[:1]
        return [self.index[self.digits.index(d)] for d in dict.fromkeys(self.digits)]

    def skeletons(self) -> list[list[int]]:
        """The positions of each skeleton's names, in the order of ``firsts``."""
        if self.digits is None:
            return [self.index]
        return [list(compress(self.index, map(d.__eq__, self.digits))) for d in dict.fromkeys(self.digits)]


def _digit_runs(form: str) -> tuple[list[tuple[int, int]], list[int]]:
    """The whole-segment digit runs of ``form``, and the columns of its other digits (``w1``'s ``1``)."""
    runs, pinned = [], []
    for m in _RUN.finditer(form):
        a, b = m.span()
        if (a == 0 or form[a - 1] == ".") and (b == len(form) or form[b] == "."):
            runs.append((a, b))
        else:
            pinned += range(a, b)
    return runs, pinned


def forms(keys: Sequence[str], text: str | None = None) -> list[Form]:
    """Group ``keys`` by digit-blanked form (``text``: the keys joined by newlines, if at hand)."""
    text = "\n".join(keys) if text is None else text
    lines = text.encode("ascii").translate(_BLANK).split(b"\n") if text.isascii() and "#" not in text else []
    if keys and len(lines) == len(keys):        # (one more line than names: a name holds a newline)
        regular, odd = range(len(keys)), []
    else:                                       # rare: each name the bytes pass cannot blank is its own group
        odd = [i for i, k in enumerate(keys) if not k.isascii() or "#" in k or "\n" in k]
        regular = sorted(set(range(len(keys))).difference(odd))
        text = "\n".join(map(keys.__getitem__, regular))
        lines = text.encode("ascii").translate(_BLANK).split(b"\n") if regular else []
    by_form: dict[bytes, list[int]] = {}
    for i, form in zip(regular, lines):
        try:
            by_form[form].append(i)
        except KeyError:
            by_form[form] = [i]
    out = []
    for raw, index in by_form.items():
        form = raw.decode("ascii")
        runs, pinned = _digit_runs(form)
        digits = None
        if pinned:                              # read down the columns of the names (all one length)
            lines, width = "\n".join(map(keys.__getitem__, index)), len(form) + 1
            columns = [lines[c::width] for c in pinned]
            digits = columns[0] if len(columns) == 1 else list(map("".join, zip(*columns)))
        out.append(Form(form, index, runs, digits))
    # a group of one: every field of its target is read from its own match, so it needs no runs
    return out + [Form(keys[i], [i], []) for i in odd]


def renamed(rule: Rule, match: re.Match[str], runs: list[tuple[int, int]], keys: list[str]) -> list[str]:
    """``rule.target`` for every name of one skeleton (``keys``; ``match``: the rule on ``keys[0]``).

    The target's fields that read a whole numeric segment take each name's own digits; every other field
    reads text the names share, so it is filled in once from ``match``.
    """
    assert rule.target is not None
    fmt, columns = [], []
    for literal, field, spec, conv in string.Formatter().parse(rule.target):
        fmt.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        span = match.span(field)
        if span in runs:
            fmt.append("{%d%s%s}" % (len(columns), "!" + conv if conv else "", ":" + spec if spec else ""))
            columns.append(span)
        else:
            value = _CONVERT[conv](match.group(field)) if conv else match.group(field)
            fmt.append(format(value, spec or "").replace("{", "{{").replace("}", "}}"))
    target = "".join(fmt)
    if not columns:
        return [target.format()] * len(keys)
    lines, width = "\n".join(keys), len(keys[0]) + 1
    # each name's digits in one segment: the segment's columns read down the names (all one length)
    digits = [lines[a::width] if b == a + 1 else list(map("".join, zip(*(lines[c::width] for c in range(a, b)))))
              for a, b in columns]
    return list(map(target.format, digits[0])) if len(digits) == 1 else list(starmap(target.format, zip(*digits)))


def at_least(n: int) -> str:
    """Regex source for a run of decimal digits (leading zeros allowed) whose value is at least ``n``."""
    s = str(n)
    alts = [f"[1-9][0-9]{{{len(s)},}}"]                 # more significant digits than n
    alts += [f"{s[:i]}[{int(d) + 1}-9][0-9]{{{len(s) - i - 1}}}" for i, d in enumerate(s) if d != "9"]
    return "0*(?:" + "|".join(alts + [s]) + ")"
