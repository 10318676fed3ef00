"""Time to plan the published DSv4-Flash layout vs the raw time to read its headers (one run, as a ratio).

"Raw" is the floor: open each shard, read the 8-byte length and the JSON header, ``json.loads`` it, plus the
index. "Scan" adds our validation (offsets, dtypes, index <-> files); "plan" adds naming resolution, quant
detection and strict accounting. Target: plan <= 3x raw and under 1 s (issue 2).

  python benchmarks/plan_speed.py [--artifact DIR] [--repeat 5] [--out benchmarks/results/plan_speed]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _common import meta, timeit, write  # noqa: E402

INVENTORY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "dsv4_inventory.py")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", help="artifact dir (default: materialise the sparse Flash layout)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="")


def raw_headers(d: str) -> int:
    n = 0
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with open(f, "rb") as fh:
            n += len(json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0])))
    with open(os.path.join(d, "model.safetensors.index.json")) as fh:
        json.load(fh)
    return n


def run(args: argparse.Namespace) -> list[dict]:
    from vllm_deepseek_v4.checkpoint import scan_checkpoint
    from vllm_deepseek_v4.loader import build_plan
    d = args.artifact
    if not d:
        d = tempfile.mkdtemp(prefix="flash-")
        subprocess.run([sys.executable, INVENTORY, "sparse", "flash", d], check=True, capture_output=True)
    plan = build_plan(d)
    assert plan.ok, plan.problems()[:5]
    raw = timeit(lambda: raw_headers(d), repeat=args.repeat)
    scan = timeit(lambda: scan_checkpoint(d), repeat=args.repeat)
    full = timeit(lambda: build_plan(d), repeat=args.repeat)
    n = len(plan.checkpoint.tensors)
    rows = []
    for label, t in (("raw header read (json.loads)", raw), ("scan + validate", scan), ("full plan", full)):
        rows.append({"step": label, "tensors": n, **t, "ratio_vs_raw": t["median_s"] / raw["median_s"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args()
    rows = run(args)
    cols = ["step", "tensors", "median_s", "p20_s", "p80_s", "ratio_vs_raw"]
    print(" ".join(f"{c:>28s}" if i == 0 else f"{c:>12s}" for i, c in enumerate(cols)))
    for r in rows:
        print(f"{r['step']:>28s}" + "".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols[1:]))
    if args.out:
        write(args.out, meta(), rows, cols, "Load-plan speed on the published DSv4-Flash layout (69,187 tensors)")


if __name__ == "__main__":
    main()
