"""The rule type of the naming tables, and the tiny template language the tables are written in.

A template is a dotted name with placeholders: ``{L}`` layer index, ``{K}`` MTP index, ``{E}`` expert index,
``{Q}`` a weight role suffix (``weight``, ``scale``, ``weight_scale_inv``...), and ``{name:a|b}`` an
alternation captured as ``name``. Targets are ``str.format`` strings over the captured names
(``layer``, ``mtp``, ``expert``, ``role`` and the alternation names). Patterns are anchored ``^...$``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product

__all__ = ["Rule", "Unfuse", "ROLE_SUFFIXES", "template_regex", "template_coarse", "template_fields", "coarse",
           "CONVENTIONS"]

CONVENTIONS = ("upstream", "hf", "vllm", "nemo")

# Every suffix under which a quantized or plain linear stores a tensor (docs/checkpoint-formats.md §6.9).
ROLE_SUFFIXES = ("weight", "scale", "weight_scale_inv", "weight_scale", "weight_scale_2", "weight_packed",
                 "weight_global_scale", "input_global_scale", "input_scale", "weight_zero_point", "weight_shape")

_PLACEHOLDERS = {"L": r"(?P<layer>\d+)", "K": r"(?P<mtp>\d+)", "E": r"(?P<expert>\d+)",
                 "Q": "(?P<role>" + "|".join(sorted(ROLE_SUFFIXES, key=len, reverse=True)) + ")"}
_GROUPS = {"L": "layer", "K": "mtp", "E": "expert", "Q": "role"}     # the group each placeholder captures
# What each placeholder can stand for in a coarse string (see ``coarse``): an index is one digit run.
_COARSE_WORDS = {"L": ("#",), "K": ("#",), "E": ("#",), "Q": ROLE_SUFFIXES}
_FIELD = re.compile(r"\{(\w+)(?::([\w|.]+))?\}")
_DIGITS = str.maketrans("0123456789", "#" * 10)


def coarse(text: str) -> str:
    """``text`` with every run of ASCII digits (and ``#``) collapsed to one ``#``: ``w13_x.12`` -> ``w#_x.#``.

    Blurs more than a skeleton (``w1`` and ``w3`` meet), but a name a template matches always has a coarse
    form among the template's (``template_coarse``).
    """
    text = text.translate(_DIGITS)
    while "##" in text:
        text = text.replace("##", "#")
    return text


def template_regex(template: str) -> str:
    """Translate a template into an anchored regex source (dots escaped, placeholders captured)."""
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        name, alts = m.group(1), m.group(2)
        alt_rx = "|".join(re.escape(a) for a in alts.split("|")) if alts else ""
        out.append(f"(?P<{name}>{alt_rx})" if alts else _PLACEHOLDERS[name])
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "^" + "".join(out) + "$"


def template_fields(template: str) -> str:
    """``template`` as a ``str.format`` target of its own captures (``layers.{L}.{m:a|b}`` -> ``layers.{layer}.{m}``):
    a rule whose target equals this renames every name to itself."""
    return _FIELD.sub(lambda m: "{" + (m.group(1) if m.group(2) else _GROUPS[m.group(1)]) + "}", template)


def template_coarse(template: str) -> set[str]:
    """The coarse forms (``coarse``) of every name ``template`` matches: alternations and roles spelled out.

    Exact because ``coarse`` acts character by character on digits and collapses runs: a name is the
    template's pieces with digit runs in the index slots, and one ``#`` in a slot collapses the same way.
    """
    pieces: list[tuple[str, ...]] = []
    pos = 0
    for m in _FIELD.finditer(template):
        name, alts = m.group(1), m.group(2)
        pieces += [(template[pos:m.start()],), tuple(alts.split("|")) if alts else _COARSE_WORDS[name]]
        pos = m.end()
    pieces.append((template[pos:],))
    return {coarse("".join(p)) for p in product(*pieces)}


@dataclass(frozen=True)
class Unfuse:
    """How one fused on-disk tensor splits into canonical tensors.

    ``stacked``: dim 0 indexes experts (target gets ``{expert}``). ``transposed``: each (expert) slice is
    stored ``[in, out]`` (NeMo). ``parts``: the output dim (or the input dim if ``split_in``) is cut into
    these parts, in order, sized by the config fields in ``sizes`` (empty = equal parts).
    """

    parts: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    stacked: bool = False
    transposed: bool = False
    split_in: bool = False


@dataclass(frozen=True)
class Rule:
    """One naming rule: an anchored pattern, its canonical target (None = dropped on purpose), and why."""

    pattern: re.Pattern[str]
    target: str | None
    reason: str
    conventions: tuple[str, ...] = CONVENTIONS
    unfuse: Unfuse | None = None
    shared: bool = False        # target is a shared top-level tensor (embed/head) aliased from an MTP block
    mtp_only: bool = False      # only valid inside an MTP block (e_proj, enorm, ...)
    scope_mtp: bool = False     # the scope itself says MTP (``mtp.K.``); else a layer index >= L says it
    key: tuple[str, str] = field(default=("", ""), compare=False)  # (scope template, local template)

    def __post_init__(self) -> None:
        if not self.reason.strip():
            raise ValueError(f"rule {self.pattern.pattern!r} has no reason")
        src = self.pattern.pattern
        if not (src.startswith("^") and src.endswith("$")):
            raise ValueError(f"rule {src!r} is not anchored ^...$")
        bad = set(self.conventions) - set(CONVENTIONS)
        if bad:
            raise ValueError(f"rule {src!r}: unknown conventions {sorted(bad)}")
        if self.unfuse and self.target and "{part}" not in self.target and self.unfuse.parts:
            raise ValueError(f"rule {src!r}: an unfuse with parts needs {{part}} in its target")
