"""``dsv4 check-vllm PATH [--json] [--device meta|cpu] [--tp N] [--no-stock]``.

Builds vLLM's own DeepSeek-V4 target and MTP classes and loads the artifact into them through our plan
(``vllm_deepseek_v4.native``), next to what vLLM's unmodified loader does. Exit 0: every vLLM parameter
filled (or explained padding), every tensor consumed or explained, every quant method matching the scheme
on disk; 1: problems; 2: usage; 3: environment (vLLM not installed, path missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check-vllm", help="load the artifact into vLLM's own DeepSeek-V4 target + MTP classes "
                                          "(native loader vs vLLM's stock loader)")
    p.add_argument("path", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta (default): headers only; cpu: read and load values (small artifacts)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check (meta: every rank)")
    p.add_argument("--no-stock", action="store_true", help="skip running vLLM's unmodified loaders")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..native.build import vllm_missing

    if args.tp < 1 or (args.tp > 1 and args.device != "meta"):
        print("dsv4 check-vllm: --tp must be >= 1, and > 1 only with --device meta", file=sys.stderr)
        return 2
    if not os.path.isdir(args.path):
        print(f"dsv4 check-vllm: {args.path}: no such artifact directory", file=sys.stderr)
        return 3
    missing = vllm_missing()
    if missing:
        print(f"dsv4 check-vllm: {missing}", file=sys.stderr)
        return 3
    from ..native.check import check_vllm

    if args.json:                    # vLLM logs to stdout: keep fd 1 for the JSON document alone
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            doc = check_vllm(args.path, device=args.device, tp=args.tp, stock=not args.no_stock)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
    else:
        doc = check_vllm(args.path, device=args.device, tp=args.tp, stock=not args.no_stock)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print(doc)
    return 0 if doc["ok"] else 1


def _print(doc: dict[str, Any]) -> None:
    print(f"{doc['path']}: vLLM native load ({doc['device']}, tp={doc['tp']}): {'OK' if doc['ok'] else 'PROBLEMS'}")
    for p in doc.get("problems", []):
        print(f"  problem: {p}")
    for kind in ("target", "mtp"):
        j = doc.get(kind)
        if j is None:
            continue
        q = doc["quant"].get(kind, {})
        print(f"  {kind}: {j['covered']}/{j['params']} parameters filled, quant {q.get('family')} "
              f"(experts {q.get('experts')}), {len(j['padding'])} padding, {len(j['unused'])} unused on disk")
        for u in j["uncovered"]:
            print(f"    uncovered: {u['param']}: {u['reason']}")
        for e in j["errors"]:
            print(f"    error: {e}")
        for m in j.get("quant_mismatches", []):
            print(f"    quant: {m}")
        for param, s in j.get("shared", {}).items():
            print(f"    {param}: {s['case']} ({s['source']})")
        for mod, how in j.get("own_kernels", {}).items():
            print(f"    {mod}: no vLLM kernel for its format; {how}")
    for kind, s in doc.get("stock", {}).items():
        if s.get("exception"):
            print(f"  stock {kind}: {s['exception']}")
        else:
            print(f"  stock {kind}: {s['loaded']}/{s['params']} loaded, {len(s['skipped'])} tensors skipped")
        for u in (s.get("unloaded") or [])[:8]:
            print(f"    unloaded: {u['param']}" + (f" ({u['note']})" if "note" in u else ""))
