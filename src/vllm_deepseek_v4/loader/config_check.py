"""Cross-check config.json against the tensors on disk: ``quantization_config`` (the tensors win, we only
warn), and the sizes the tensors themselves show (hidden size, vocabulary, layer and MTP layer counts: one
error naming the field, on top of the per-tensor problems such a mismatch causes).

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
from .records import CONFIG, ParamPlan, Problem

if TYPE_CHECKING:
    from .account import Found

__all__ = ["quant_config_disagreements", "expected_scheme_ct", "config_contradictions"]

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


_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.", re.M)
_MTP_INDEX = re.compile(r"^mtp\.(\d+)\.", re.M)


def config_contradictions(cfg: DSV4Config, found: "list[Found]") -> list[Problem]:
    """The config.json fields that the tensors on disk contradict, each one line with its evidence.

    Called only for an artifact with problems (a good one costs nothing): the embedding's shape gives
    ``hidden_size`` and ``vocab_size``; the highest decoder / MTP layer on disk bounds ``num_hidden_layers``
    / ``num_nextn_predict_layers`` when the config declares more (a lower count shows as tensors that fit no
    layer, each named already)."""
    out = []

    def contradiction(key: str, on_disk: int, declared: int, evidence: str) -> None:
        out.append(Problem(CONFIG, "mtp.*" if "nextn" in key else "main", key, "config.json",
                           f"expected {on_disk} ({evidence}), found {declared}"))
    embed = next((src for f in found for name, src in zip(f.canonical, f.sources) if name == "embed.weight"), None)
    if embed is not None and len(embed.shape) == 2 and not getattr(embed, "ops", ()):
        where = f"{embed.tensor} is {list(embed.shape)} in {embed.file}"
        if embed.shape[1] != cfg.dim:
            contradiction("hidden_size", embed.shape[1], cfg.dim, where)
        if embed.shape[0] != cfg.vocab_size:
            contradiction("vocab_size", embed.shape[0], cfg.vocab_size, where)
    text = "\n".join(f.text for f in found)
    layers = {int(i) for i in _LAYER_INDEX.findall(text)}
    if layers and max(layers) + 1 < cfg.n_layers:
        contradiction("num_hidden_layers", max(layers) + 1, cfg.n_layers,
                      f"decoder layers 0-{max(layers)} on disk, none above")
    mtp = {int(i) for i in _MTP_INDEX.findall(text)}
    if mtp and max(mtp) + 1 < cfg.n_mtp_layers:
        contradiction("num_nextn_predict_layers", max(mtp) + 1, cfg.n_mtp_layers,
                      f"MTP layers 0-{max(mtp)} on disk, none above")
    return out
