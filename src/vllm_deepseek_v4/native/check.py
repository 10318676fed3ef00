"""``dsv4 check-vllm``: route an artifact through vLLM's own target and MTP classes, natively and stock.

The JSON document (``check_vllm``)::

    {path, ok, device, tp,
     target: {params, covered, uncovered: [{param, reason}], unused: [{name, file, reason}], padding, errors,
              quant_family, quant_methods, quant_mismatches},
     mtp:    {... the same, plus shared: {draft param: {case: shared|own, source, file, reason}}},
     quant:  {target: {family, experts, modules: {vLLM module: scheme}}, mtp: {...}},
     stock:  {target: {params, loaded, unloaded, skipped, exception, quant_methods}, mtp: {...}},
     problems: [...]}

``ok`` is about the *native* load (every parameter filled or explained, every tensor consumed or explained,
every quant method matching the scheme on disk); ``stock`` is reported, never judged.
"""
from __future__ import annotations

from typing import Any

__all__ = ["check_vllm"]


def check_vllm(path: str, *, device: str = "meta", tp: int = 1, stock: bool = True,
               plan: Any = None) -> dict[str, Any]:
    from ..loader import build_plan
    from .session import load_native

    plan = plan if plan is not None else build_plan(path)
    doc: dict[str, Any] = {"path": path, "ok": False, "device": device, "tp": tp}
    ranks = range(tp) if device == "meta" else range(1)
    results = [load_native(path, device=device, tp=tp, rank=r, plan=plan) for r in ranks]
    res = results[0]
    problems = list(res.problems)
    for kind in ("target", "mtp"):
        reps = [r.reports[kind] for r in results if kind in r.reports]
        if not reps:
            continue
        j = reps[0].to_json()
        for r, other in zip(ranks[1:], reps[1:]):       # every rank must be complete too
            o = other.to_json()
            for key in ("uncovered", "errors"):
                j[key] += [{**x, "rank": r} if isinstance(x, dict) else f"rank {r}: {x}" for x in o[key]]
        doc[kind] = j
    doc["quant"] = {k: {"family": c.family, "experts": c.experts,
                        "modules": {m: s.scheme for m, s in sorted(c.modules.items())}}
                    for k, c in res.quant.items()}
    if stock:
        from .stock import stock_load

        doc["stock"] = stock_load(path, plan, device=device)
    doc["problems"] = problems
    doc["ok"] = not problems and all(r.ok for r in results) and "target" in doc
    return doc
