"""``dsv4`` entry point: argparse subcommands, each an ``add_parser(sub)`` / ``run(args) -> int`` pair.

Exit codes: 0 ok; 1 the check found problems; 2 usage error; 3 environment (missing path, an OS error, no GPU).
An artifact's own defects (files that are not files, bad headers or config) are ``DSV4Error``s: exit 1, one
line each, never a traceback (``tests/test_corpus.py``).
Heavy imports stay inside each ``run`` so ``dsv4 --help`` and ``dsv4 inspect`` start fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import bench_acceptance, check_vllm_cmd, compare_cmd, inspect_cmd, verify_cmd

_COMMANDS = {"inspect": inspect_cmd, "verify": verify_cmd, "compare": compare_cmd,
             "bench-acceptance": bench_acceptance, "check-vllm": check_vllm_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 artifact tools (MTP-aware).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _COMMANDS.values():
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import DSV4Error
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    try:
        return int(args.func(args))
    except DSV4Error as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:             # the environment: a missing path, or one the OS will not let us read
        print(f"dsv4 {args.command}: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
