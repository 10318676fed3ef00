"""``dsv4 inspect PATH [--json] [--no-mtp]``: what the loader sees in an artifact, from headers only."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import DSV4Error


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="summarise an artifact: naming, per-module quant, MTP, problems")
    p.add_argument("path", help="artifact directory (or a .safetensors file next to config.json)")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.add_argument("--no-mtp", action="store_true", help="plan the main model only")
    p.set_defaults(func=run)


def plan_or_report(path: str, include_mtp: bool) -> tuple[Any, dict[str, Any]]:
    """Build the plan; a fatal artifact error (bad header, missing shard, bad config) becomes a report."""
    from ..loader.plan import build_plan
    if not os.path.exists(path):
        what = "a dangling or looping symlink" if os.path.lexists(path) else "no such file or directory"
        raise FileNotFoundError(f"no such artifact: {path} ({what})")
    try:
        plan = build_plan(path, include_mtp=include_mtp)
    except DSV4Error as e:
        return None, {"path": path, "ok": False, "errors": [str(e)], "unmapped": [], "missing": []}
    return plan, plan.to_json()


def _human(rep: dict[str, Any]) -> str:
    if "tensors" not in rep:
        return f"{rep['path']}: NOT LOADABLE\n  " + "\n  ".join(rep["errors"])
    gb = rep["bytes"] / 1e9
    lines = [f"{rep['path']}: {'OK' if rep['ok'] else 'PROBLEMS'}",
             f"  {rep['tensors']:,} tensors in {rep['files']} file(s), {gb:,.2f} GB; naming: {rep['naming']}",
             f"  layers: {rep['num_hidden_layers']} main + {rep['mtp_layers']} MTP"]
    mtp = rep["mtp"]
    if mtp["layers"]:
        sh = mtp["shared"]
        lines.append(f"  MTP: {'complete' if mtp['complete'] else 'INCOMPLETE'}; shared embed <- {sh['embed']}, "
                     f"head <- {sh['head']}" + (f"; aliases checked: {mtp['aliases']}" if mtp.get("aliases") else ""))
    for part, groups in rep["quant"].items():
        lines.append(f"  quant {part:6s} " + ", ".join(f"{g}={s}" for g, s in groups.items()))
    if rep["explained"]:
        lines.append(f"  {len(rep['explained'])} tensor(s) on disk not loaded, each with a reason (see --json)")
    for w in rep["warnings"]:
        lines.append(f"  warning: {w}")
    for e in rep["errors"]:
        lines.append(f"  error: {e}")
    for u in rep["unmapped"][:20]:
        lines.append(f"  unmapped: {u['file']}: {u['name']}: {u['reason']}")
    if len(rep["unmapped"]) > 20:
        lines.append(f"  ... {len(rep['unmapped']) - 20} more unmapped")
    for m in rep["missing"][:20]:
        lines.append(f"  missing: {m['param']}: {m['reason']}")
    if len(rep["missing"]) > 20:
        lines.append(f"  ... {len(rep['missing']) - 20} more missing")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    _, rep = plan_or_report(args.path, include_mtp=not args.no_mtp)
    if args.json:
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(_human(rep))
    return 0 if rep["ok"] else 1
