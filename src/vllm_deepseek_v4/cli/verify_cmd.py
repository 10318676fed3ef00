"""``dsv4 verify PATH [--no-mtp]``: exit 0 if loadable and complete, else 1 with one line per problem."""
from __future__ import annotations

import argparse
from typing import Any

from .inspect_cmd import plan_or_report


def add_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="check an artifact is loadable and complete (exit 0) or list problems (exit 1)")
    p.add_argument("path", help="artifact directory")
    p.add_argument("--no-mtp", action="store_true", help="do not require the MTP block")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plan, rep = plan_or_report(args.path, include_mtp=not args.no_mtp)
    problems = plan.problems() if plan is not None else rep["errors"]
    for line in problems:
        print(line)
    if not problems:
        print(f"{args.path}: OK ({rep['tensors']:,} tensors, naming {rep['naming']}, "
              f"MTP {'complete' if rep['mtp']['complete'] else 'not required'})")
    return 0 if not problems else 1
