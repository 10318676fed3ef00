"""Write a random DSv4 with DeepSeek-V4-Flash's true per-layer dimensions (3 layers + MTP, 0.56 B parameters).

What it holds and why: ``vllm_deepseek_v4.devtools.flash_dims``. ``--check`` then loads it into the portable
model (fp32) and runs one seeded 300-token prompt: the logits must be finite and spread, the argmax varied.

    python scripts/flash_dims_model.py OUT [--seed 0] [--agree 0.15 | --random-draft] [--native] [--check]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from vllm_deepseek_v4.devtools import flash_dims


def check(path: str, vocab: int) -> str | None:
    """Run the portable model over a seeded prompt; a message if its logits are not sane, else ``None``."""
    from vllm_deepseek_v4.loader.load import load_model

    model, _ = load_model(path, dtype=torch.float32, progress=False)
    prompt = torch.randint(0, vocab, (1, 300), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with torch.no_grad():
        logits = model.eval()(prompt)[0][0]
    picks = logits.argmax(-1).unique().numel()
    print(f"prefill of 300 tokens: {time.perf_counter() - t:.1f} s; logits std {logits.std():.3f}, "
          f"{picks} distinct argmax tokens over 300 positions")
    if not torch.isfinite(logits).all():
        return "non-finite logits"
    if logits.std() < 0.1 or picks < 30:
        return f"degenerate logits (std {logits.std():.3f}, {picks} distinct argmax tokens)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (config.json, safetensors shards, index, flash_dims.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--agree", type=float, default=0.15,
                    help="scale of the trunk's block outputs that makes the MTP layer a good draft (default 0.15)")
    ap.add_argument("--random-draft", action="store_true", help="leave the MTP layer random (drafts rejected)")
    ap.add_argument("--native", action="store_true", help="Flash's published format: FP8 block + MXFP4 experts")
    ap.add_argument("--check", action="store_true", help="run the portable model once and check its logits")
    args = ap.parse_args()
    cfg = flash_dims.config(native=args.native)
    print(f"{flash_dims.param_count(cfg) / 1e9:.3f} B parameters "
          f"({'FP8 + MXFP4' if args.native else 'BF16'}, seed {args.seed})")
    t = time.perf_counter()
    flash_dims.write(args.out, seed=args.seed, agree=None if args.random_draft else args.agree, native=args.native)
    print(f"written to {args.out} in {time.perf_counter() - t:.1f} s")
    problem = check(args.out, cfg["vocab_size"]) if args.check else None
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
