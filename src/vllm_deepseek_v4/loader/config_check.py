"""Cross-check config.json against the tensors on disk: ``quantization_config`` (the tensors win, we only
warn), and the sizes the tensors themselves show (hidden size, vocabulary: one error naming the field, on top
of the per-tensor problems such a mismatch causes; layer, MTP layer and expert counts: one error naming the
field, checked before the parameter space is built, which then goes only as far as the tensors).

Entries are matched against the checkpoint name of each module (in the spelling on disk and the canonical
upstream one) and against vLLM's runtime prefix (``model.layers.{L+K}.`` for MTP), because configs are
written in any of these (docs/checkpoint-formats.md §5.1).
"""
from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol

from ..config import DSV4Config
from ..quant import SCHEMES
from .expected import Counts
from .records import CONFIG, ParamPlan, Problem

if TYPE_CHECKING:
    from .account import Found

__all__ = ["quant_config_disagreements", "expected_scheme_ct", "config_contradictions", "count_contradictions"]

# quant_method -> the format it declares (the schemes' ``methods``: fp8 -> fp8_block, modelopt* -> nvfp4)
_METHOD_SCHEME = {m: s.name for s in SCHEMES.values() for m in s.methods}


class LoadPlan(Protocol):
    """What the check reads of a load plan (``plan.LoadPlan``, which calls this check while it is built)."""

    cfg: DSV4Config
    params: Mapping[str, ParamPlan]


def _candidates(plan: "LoadPlan", module: str, disk: str) -> list[str]:
    L = plan.cfg.n_layers
    runtime = re.sub(r"^mtp\.(\d+)\.", lambda m: f"model.layers.{L + int(m.group(1))}.", module)
    runtime = re.sub(r"^layers\.", "model.layers.", runtime)
    return [disk, module, runtime]


def _ct_match(entry: str, names: Iterable[str]) -> bool:
    if entry.startswith("re:"):
        rx = re.compile(entry[3:])
        return any(rx.match(n) for n in names)
    return any(n == entry or n.endswith("." + entry) for n in names) or entry in ("Linear",)


def expected_scheme_ct(group: dict[str, Any]) -> str:
    """The scheme a compressed-tensors config group declares."""
    w = group.get("weights") or {}
    fmt = str(group.get("format") or "")
    bits, typ = w.get("num_bits"), w.get("type")
    # a format named in ``format`` first: mxfp4 shares 4-bit float weights with nvfp4
    named = [s.name for s in SCHEMES.values() if s.ct_format and s.ct_format in fmt]
    by_weights = [s.name for s in SCHEMES.values() if s.ct_weights == (bits, typ)]
    return (named + by_weights + [f"unknown({bits}-bit {typ})"])[0]


def quant_config_disagreements(plan: "LoadPlan") -> list[str]:
    qc = plan.cfg.quantization_config or {}
    method = qc.get("quant_method")
    if method != "compressed-tensors" and method not in _METHOD_SCHEME:
        return []
    linears = [(name, pp) for name, pp in plan.params.items() if pp.quant is not None]
    out: list[str] = []
    if method == "compressed-tensors":
        ignore = list(qc.get("ignore") or [])
        groups = list((qc.get("config_groups") or {}).values())
        for name, pp in linears:
            disk = pp.roles[next(iter(pp.roles))].tensor.rsplit(".", 1)[0]
            names = _candidates(plan, name, disk)
            ignored = any(_ct_match(e, names) for e in ignore)
            declared = next((expected_scheme_ct(g) for g in groups
                             if any(_ct_match(t, names) for t in g.get("targets") or [])), None)
            want = "bf16" if ignored or declared is None else declared
            if want != pp.scheme and not (want == "bf16" and pp.quant.variant == "deepseek"):
                out.append(f"{disk}: quantization_config says {want}"
                           f"{' (ignored)' if ignored else ''}, tensors on disk are {pp.scheme}; trusting the tensors")
    elif method == "fp8" and linears and not any(pp.scheme == _METHOD_SCHEME[method] for _, pp in linears):
        out.append("quantization_config says fp8 but no module on disk is FP8; trusting the tensors")
    elif method in ("modelopt", "modelopt_fp4"):
        q = qc.get("quantization") or qc
        excl = list(q.get("exclude_modules") or [])
        for name, pp in linears:
            disk = pp.roles[next(iter(pp.roles))].tensor.rsplit(".", 1)[0]
            names = _candidates(plan, name, disk)
            if pp.scheme == _METHOD_SCHEME[method] and any(fnmatch.fnmatchcase(n, e) for n in names for e in excl):
                out.append(f"{disk}: excluded by hf_quant_config exclude_modules but NVFP4 on disk; trusting the tensors")
    return out[:50] + ([f"... {len(out) - 50} more"] if len(out) > 50 else [])


# The counts that multiply the parameter space: config.json field, the canonical name segment that holds the
# index (at the start of a name, or anywhere in it), what an index counts (for the evidence), its part.
_COUNTED = (("num_hidden_layers", "layers.", True, "decoder layers", "main"),
            ("num_nextn_predict_layers", "mtp.", True, "MTP layers", "mtp.*"),
            ("n_routed_experts", ".ffn.experts.", False, "routed experts", "main"))


def _contradiction(key: str, part: str, on_disk: int, declared: int, evidence: str) -> Problem:
    return Problem(CONFIG, part, key, "config.json", f"expected {on_disk} ({evidence}), found {declared}")


def _holds(found: "list[Found]", segment: str, at_start: bool) -> bool:
    """Whether a canonical name on disk holds ``segment`` (at its start if ``at_start``): a substring search
    per batch of names, no parsing (a good Flash artifact, 69k names, pays ~0.6 ms for the three counts)."""
    line = "\n" + segment if at_start else segment
    # searched from the end: the highest index sits at the end of a batch (names in checkpoint order)
    return any(f.text.rfind(line) >= 0 or (at_start and f.text.startswith(segment)) for f in found)


def count_contradictions(cfg: DSV4Config, found: "list[Found]", include_mtp: bool) -> tuple[Counts, list[Problem]]:
    """The layer, MTP layer and expert counts to build the expected parameters for, and a problem for each
    count config.json declares above the highest index on disk (one line naming the field and the evidence).

    Checked before the parameters are expanded: a count of 10^6 would otherwise build millions of parameters
    only to report each one missing. Only a count above what is on disk is checked: a lower one shows as the
    tensors that fit no layer or expert, each named by the accounting. A count with no index on disk at all is
    left as declared (nothing to bound it by), except MTP layers: one is enough for the plan to report the
    whole block missing (``plan._check_mtp``) with the declared count."""
    declared = Counts.of(cfg)
    counts, out = list(declared), []
    for i, (key, segment, at_start, what, part) in enumerate(_COUNTED):
        n = declared[i]
        if n == 0 or (key == "num_nextn_predict_layers" and not include_mtp):
            continue
        if _holds(found, f"{segment}{n - 1}.", at_start):       # the highest index is there: no contradiction
            continue
        rx = re.compile(("^" if at_start else "") + re.escape(segment) + r"(\d+)\.", re.M)
        on_disk = {int(j) for f in found for j in rx.findall(f.text)}
        if not on_disk:
            counts[i] = min(n, 1) if key == "num_nextn_predict_layers" else n
            continue
        top = max(on_disk)
        if top + 1 < n:
            counts[i] = top + 1
            out.append(_contradiction(key, part, top + 1, n, f"{what} 0-{top} on disk, none above"))
    return Counts(*counts), out


def config_contradictions(cfg: DSV4Config, found: "list[Found]") -> list[Problem]:
    """The sizes in config.json that the embedding on disk contradicts (``hidden_size``, ``vocab_size``), each
    one line with its evidence, on top of the per-tensor problems such a mismatch causes. Called only for an
    artifact with problems (a good one costs nothing); the counts are ``count_contradictions``'s."""
    out = []
    embed = next((src for f in found for name, src in zip(f.canonical, f.sources) if name == "embed.weight"), None)
    if embed is not None and len(embed.shape) == 2 and not getattr(embed, "ops", ()):
        where = f"{embed.tensor} is {list(embed.shape)} in {embed.file}"
        if embed.shape[1] != cfg.dim:
            out.append(_contradiction("hidden_size", "main", embed.shape[1], cfg.dim, where))
        if embed.shape[0] != cfg.vocab_size:
            out.append(_contradiction("vocab_size", "main", embed.shape[0], cfg.vocab_size, where))
    return out
