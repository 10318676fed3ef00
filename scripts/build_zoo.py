"""Write every DSv4 artifact layout users meet, from one BF16 model (by default the shipped tiny model).

    python scripts/build_zoo.py SRC_DIR OUT_DIR            # e.g. src/vllm_deepseek_v4/assets/tiny /tmp/dsv4-zoo
    python scripts/build_zoo.py SRC_DIR OUT_DIR --draft-study

The layouts, how each is written and how it is checked: ``vllm_deepseek_v4.devtools.zoo``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from vllm_deepseek_v4.devtools.zoo import DRAFT_STUDY, ZooError, build_zoo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="BF16 source artifact with MTP (e.g. src/vllm_deepseek_v4/assets/tiny)")
    ap.add_argument("out", help="output directory (one subdirectory per layout + zoo.json)")
    ap.add_argument("--no-load", action="store_true", help="skip load_model on each layout (verify and plan only)")
    ap.add_argument("--draft-study", action="store_true",
                    help="write only the draft-quantization study layouts (DRAFT_STUDY), indexed in draft_study.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        if args.draft_study:
            build_zoo(args.src, args.out, load=not args.no_load, layouts=DRAFT_STUDY, index_name="draft_study.json")
        else:
            build_zoo(args.src, args.out, load=not args.no_load)
    except ZooError as e:
        print(f"build_zoo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
