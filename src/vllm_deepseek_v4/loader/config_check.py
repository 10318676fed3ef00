"""Cross-check ``quantization_config`` against the tensors on disk; the tensors win, we only report.

Entries are matched against the checkpoint name of each module (in the spelling on disk and the canonical
upstream one) and against vLLM's runtime prefix (``model.layers.{L+K}.`` for MTP), because configs are
written in any of these (docs/checkpoint-formats.md §5.1).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping, Protocol

from ..config import DSV4Config
from ..quant import SCHEMES
from .records import ParamPlan

__all__ = ["quant_config_disagreements", "expected_scheme_ct"]

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
