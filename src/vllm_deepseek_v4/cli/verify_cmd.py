"""``dsv4 verify PATH [--no-mtp] [--values [--progress]]``: exit 0 if loadable and complete, else 1 with one
line per problem.

Plain ``verify`` reads headers only (standard library, no torch): names, shapes, dtypes, quant schemes,
MTP completeness, alias shapes. ``--values`` then reads every planned tensor once (streaming, one reused
buffer: memory about the largest tensor) and checks what ``loader.values`` checks at load: NaN/Inf floats,
FP8/E8M0 NaN codes, scales <= 0, expert ids out of range, alias copies equal to their primary. Each value
problem is one line ``<tensor> in <file>: <found> (expected ...)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .inspect_cmd import plan_or_report


def add_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="check an artifact is loadable and complete (exit 0) or list problems (exit 1)")
    p.add_argument("path", help="artifact directory")
    p.add_argument("--no-mtp", action="store_true", help="do not require the MTP block")
    p.add_argument("--values", action="store_true", help="also read every tensor once and check its values "
                   "(NaN/Inf, FP8/E8M0 NaN codes, scales > 0, expert ids, alias copies equal)")
    p.add_argument("--progress", action="store_true", help="with --values: progress on stderr even when it is "
                   "not a terminal (default: only on a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan, rep = plan_or_report(args.path, include_mtp=not args.no_mtp)
    # the plan's problems, then what the portable engine cannot build (a quant group mixing schemes)
    problems = (plan.problems() + [p.line for p in plan.one_scheme_problems(rep["quant"])] if plan is not None
                else rep["errors"])
    for line in problems:
        print(line)
    if problems:
        if args.values:
            print(f"{args.path}: values not read: the header problems above come first")
        return 1
    head = (f"{args.path}: OK ({rep['tensors']:,} tensors, naming {rep['naming']}, "
            f"MTP {'complete' if rep['mtp']['complete'] else 'not required'}")
    if not args.values:
        print(f"{head}; headers checked; values not read -- use --values)")
        return 0
    import torch  # noqa: F401  (imported before the clock: a few seconds on a busy box)

    from ..loader.stream import scan_values

    bar = _Progress() if args.progress or sys.stderr.isatty() else None
    t0 = time.perf_counter()
    result = scan_values(plan, progress=bar)
    if bar is not None:
        bar.close()
    for err in result.problems:
        print(err)
    if result.problems:
        return 1
    secs = time.perf_counter() - t0
    print(f"{head}; values checked: {result.tensors:,} tensors, {result.nbytes / 1e9:.2f} GB in {secs:.1f} s)")
    return 0


class _Progress:
    """A plain-text progress line on stderr, redrawn at most 4 times a second (no dependency)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int, nbytes: int, total_bytes: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.25 and done < total:
            return
        self.last = now
        rate = nbytes / max(now - self.t0, 1e-9) / 1e9
        pct = 100.0 * nbytes / total_bytes if total_bytes else 100.0
        sys.stderr.write(f"\rverify --values: {pct:5.1f}%  {done:,}/{total:,} tensors  "
                         f"{nbytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB  {rate:.2f} GB/s ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
