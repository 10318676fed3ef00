"""Compile the per-convention tables into one flat, checked tuple of :class:`Rule`."""
from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple

from .rule import CONVENTIONS, Rule, template_coarse, template_fields, template_regex
from .rules import hf, nemo, upstream, vllm

__all__ = ["RULES", "PREFIX_ALIASES", "compile_rules", "CoarseIndex", "coarse_index", "RULES_COARSE"]

# Whole-prefix spellings normalised before matching (docs/checkpoint-formats.md §3).
PREFIX_ALIASES = (("model.language_model.", "model.", "VL wrapper prefix of the text model"),)

_DIGIT_SEGMENT = re.compile(r"(?:^|\.)\d+(?:\.|$)")


def _opts(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(row[3]) if len(row) > 3 else {}


def _rule(src: str, target: str | None, reason: str, convention: str, opts: dict[str, Any],
          key: tuple[str, str], **flags: Any) -> Rule:
    if _DIGIT_SEGMENT.search(src.replace("{", "<").replace("}", ">")):
        raise ValueError(f"template {src!r} has a literal numeric segment: use a placeholder")
    return Rule(pattern=re.compile(template_regex(src)), target=target, reason=reason,
                conventions=tuple(opts.get("conventions", (convention,))), unfuse=opts.get("unfuse"),
                shared=bool(opts.get("shared", False)), key=key, **flags)


def _convention_rules(mod: Any) -> Iterable[Rule]:
    conv = mod.CONVENTION
    for row in mod.TOP:
        yield _rule(row[0], row[1], row[2], conv, _opts(row), ("", row[0]))
    for s_src, s_tgt, s_reason, s_opts in mod.SCOPES:
        is_mtp_scope = bool(s_opts.get("scope_mtp"))
        in_mtp_block = bool(s_opts.get("mtp_block"))
        for row in mod.BLOCK:
            yield _rule(s_src + row[0], s_tgt + row[1], f"{s_reason}: {row[2]}", conv, _opts(row),
                        (s_src, row[0]), scope_mtp=is_mtp_scope, mtp_only=in_mtp_block)
        if in_mtp_block:
            continue  # MTP-specific tensors sit on the layer itself, not inside vLLM's mtp_block
        for row in mod.MTP:
            # shared tensors (embed/head copies) target the top-level name, not one inside the block
            target = row[1] if _opts(row).get("shared") else s_tgt + row[1]
            yield _rule(s_src + row[0], target, f"{s_reason}: {row[2]}", conv, _opts(row),
                        (s_src, row[0]), scope_mtp=is_mtp_scope, mtp_only=not is_mtp_scope)


def compile_rules(modules: Iterable[Any] = (upstream, hf, vllm, nemo)) -> tuple[Rule, ...]:
    """Merge identical rules across conventions; the same pattern with two different targets is a bug."""
    merged: dict[str, Rule] = {}
    for mod in modules:
        for r in _convention_rules(mod):
            prev = merged.get(r.pattern.pattern)
            if prev is None:
                merged[r.pattern.pattern] = r
                continue
            same = (prev.target, prev.unfuse, prev.shared, prev.mtp_only, prev.scope_mtp) == \
                   (r.target, r.unfuse, r.shared, r.mtp_only, r.scope_mtp)
            if not same:
                raise ValueError(f"naming tables disagree on {r.pattern.pattern}: "
                                 f"{prev.target!r} ({prev.reason}) vs {r.target!r} ({r.reason})")
            convs = tuple(c for c in CONVENTIONS if c in prev.conventions or c in r.conventions)
            merged[r.pattern.pattern] = Rule(prev.pattern, prev.target, prev.reason, convs, prev.unfuse,
                                             prev.shared, prev.mtp_only, prev.scope_mtp, prev.key)
    return tuple(merged.values())


class CoarseIndex(NamedTuple):
    """Which rules can match a name, by the name's coarse form (``rule.coarse``): a superset, never less."""

    by_form: dict[str, tuple[int, ...]]     # coarse form -> positions of the template rules that produce it
    wild: tuple[int, ...]                   # rules not written as templates: a candidate for every name
    templated: frozenset[int]               # ids of the rules whose pattern is exactly their template's regex
    identity: frozenset[int]                # ids of the template rules that rename every name to itself


def coarse_index(rules: tuple[Rule, ...]) -> CoarseIndex:
    by_form: dict[str, list[int]] = {}
    wild, templated, identity = [], [], []
    for pos, r in enumerate(rules):
        template = r.key[0] + r.key[1]
        if not template or template_regex(template) != r.pattern.pattern:
            wild.append(pos)
            continue
        templated.append(id(r))
        if r.unfuse is None and r.target == template_fields(template):
            identity.append(id(r))
        for form in template_coarse(template):
            by_form.setdefault(form, []).append(pos)
    return CoarseIndex({f: tuple(p) for f, p in by_form.items()}, tuple(wild), frozenset(templated),
                       frozenset(identity))


RULES: tuple[Rule, ...] = compile_rules()
RULES_COARSE: CoarseIndex = coarse_index(RULES)
