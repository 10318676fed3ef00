"""MTP draft acceptance without vLLM: greedy speculative decoding on the portable model, per zoo layout and k.

For every layout (a zoo built by ``scripts/build_zoo.py``, or artifact paths) and k = 1..3: the fixed prompt
set the vLLM benchmark uses (``assets/bench_prompts.jsonl``, encoded with the layout's own tokenizer), N
greedy tokens per prompt, once plainly and once speculatively (``model/speculative.py``). Reports acceptance
(accepted / draft tokens), per-position acceptance (accepted at i / drafts), mean acceptance length
(1 + accepted / drafts) and whether the speculative tokens equal plain greedy decoding. Checks: speculative
== greedy everywhere, equivalent layouts (``zoo.json`` ``equivalent_to``) identical, the BF16 draft's k=1
acceptance, and each quantized layout's distance to BF16. At ``--temperature`` (default 0.8), the expected
k = 1 acceptance of greedy and of probabilistic drafting on the held-out windows, computed exactly from the two
distributions (``model/speculative.py`` ``expected_acceptance``, teacher-forced). Writes OUT.json (rows read by
``benchmarks/acceptance.py``), OUT.md and OUT.png.

    python benchmarks/offline_acceptance.py --zoo /tmp/dsv4-zoo --out benchmarks/results/offline_acceptance
    python benchmarks/offline_acceptance.py path/to/artifact --num-prompts 4 --max-tokens 32 --k 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vllm_deepseek_v4.cli.bench_acceptance import load_prompts
from vllm_deepseek_v4.devtools.corpus import heldout_windows, load_tokenizer
from vllm_deepseek_v4.devtools.records import meta, portable
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.model.mtp_eval import mtp_scores
from vllm_deepseek_v4.model.speculative import SpecStats, expected_acceptance, greedy_generate, speculative_generate

COLUMNS = ["layout", "k", "acceptance", "per_position", "mean_acceptance_length", "identical_to_greedy",
           "drafts", "greedy_agreement_with_reference", "heldout_agreement", "heldout_main_loss", "heldout_mtp_loss",
           "heldout_expected_greedy_T", "heldout_expected_probabilistic_T"]
REFERENCE = "upstream_bf16"


def layouts(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = [{"name": Path(p).name, "path": p, "has_mtp": True, "equivalent_to": None} for p in args.artifacts]
    if args.zoo:
        index = json.loads((Path(args.zoo) / "zoo.json").read_text())["layouts"]
        out += [{"name": n, "path": str(Path(args.zoo) / n), **{k: e[k] for k in ("has_mtp", "equivalent_to")}}
                for n, e in index.items()]
    if args.only:
        keep = set(args.only.split(","))
        out = [lay for lay in out if lay["name"] in keep]
    if not out:
        raise SystemExit("no artifacts: pass paths or --zoo DIR")
    return out


def run_layout(path: str, prompts: list[str], ks: list[int], n: int, windows: torch.Tensor | None,
               temperature: float = 0.8) -> tuple[list[list[int]], dict[int, Any], dict[str, float]]:
    """Plain greedy tokens per prompt; per k the merged stats and the speculative tokens; teacher-forced
    held-out scores (trajectory-free: both models see the same text), with the expected acceptance of both
    drafting methods at ``temperature``."""
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    model.eval()
    tok = load_tokenizer(path)
    ids = [torch.tensor([tok.encode(p).ids]) for p in prompts]
    scores = mtp_scores(model, windows, batch=2).as_dict() if windows is not None else {}
    if windows is not None:
        text = [(w[:1].tolist(), w[1:].tolist()) for w in windows]
        for method in ("greedy", "probabilistic"):
            scores[f"expected_{method}_T"] = expected_acceptance(model, text, temperature, method)
    greedy = [greedy_generate(model, x, n) for x in ids]
    by_k: dict[int, Any] = {}
    for k in ks:
        stats = SpecStats(k=k, accepted_at=[0] * k)
        tokens = []
        for x in ids:
            out, s = speculative_generate(model, x, n, k)
            stats.merge(s)
            tokens.append(out)
        by_k[k] = (stats, tokens)
    return greedy, by_k, scores


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two greedy runs agree, counted up to each prompt's first divergence."""
    same = total = 0
    for x, y in zip(a, b):
        first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        same, total = same + first, total + len(x)
    return same / total if total else 0.0


def checks(rows: list[dict[str, Any]], lays: list[dict[str, Any]], tokens: dict[str, Any]) -> dict[str, Any]:
    """The must-show properties, computed from the rows and the generated tokens."""
    by = {(r["layout"], r["k"]): r for r in rows}
    out: dict[str, Any] = {"all_identical_to_greedy": all(r["identical_to_greedy"] for r in rows)}
    ref_k1 = by.get((REFERENCE, 1))
    out["bf16_k1_acceptance"] = ref_k1["acceptance"] if ref_k1 else None
    equiv = {}
    for lay in lays:
        ref = lay["equivalent_to"]
        if ref and lay["name"] in tokens and ref in tokens:
            equiv[lay["name"]] = tokens[lay["name"]] == tokens[ref] and all(
                by[(lay["name"], k)]["per_position"] == by[(ref, k)]["per_position"]
                for k in {r["k"] for r in rows} if (ref, k) in by)
    out["equivalent_layouts_identical"] = equiv
    different = {lay["name"] for lay in lays if not lay["equivalent_to"]} - {REFERENCE}   # the quantized ones
    out["acceptance_minus_bf16"] = {
        f"{r['layout']}@k{r['k']}": round(r["acceptance"] - by[(REFERENCE, r["k"])]["acceptance"], 4)
        for r in rows if (REFERENCE, r["k"]) in by and r["layout"] in different}
    return out


def plot(rows: list[dict[str, Any]], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["layout"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    width = 0.8 / len(ks)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 4.2))
    for j, k in enumerate(ks):
        vals = [next((r["acceptance"] for r in rows if r["layout"] == n and r["k"] == k), 0.0) for n in names]
        bars = ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"k = {k}")
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks([i + width * (len(ks) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("acceptance (accepted / draft tokens)")
    ax.set_title("MTP draft acceptance, greedy, portable model (no vLLM)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)
    return out + ".png"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--zoo", default=None, help="a directory written by scripts/build_zoo.py (reads its zoo.json)")
    ap.add_argument("--only", default=None, help="comma-separated layout names to keep")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--prompts", default=None, help="JSONL of {\"prompt\": ...} (default: assets/bench_prompts.jsonl)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--heldout-windows", type=int, default=4, help="teacher-forced held-out windows (0: none)")
    ap.add_argument("--heldout-len", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8, help="of the held-out expected acceptance columns")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/offline_acceptance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    prompts = load_prompts(args.prompts, args.num_prompts)
    lays = layouts(args)
    rows: list[dict[str, Any]] = []
    skipped, greedy_tokens, spec_tokens = {}, {}, {}
    for lay in lays:
        if not lay["has_mtp"]:
            skipped[lay["name"]] = "no MTP block in the artifact (transformers drops mtp.*)"
            print(f"== {lay['name']}: skipped ({skipped[lay['name']]})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        windows = heldout_windows(lay["path"], args.heldout_windows, args.heldout_len) if args.heldout_windows else None
        greedy, by_k, scores = run_layout(lay["path"], prompts, ks, args.max_tokens, windows, args.temperature)
        greedy_tokens[lay["name"]] = greedy
        spec_tokens[lay["name"]] = {k: toks for k, (_, toks) in by_k.items()}
        for k, (stats, toks) in by_k.items():
            rows.append({"layout": lay["name"], "k": k, "acceptance": round(stats.acceptance, 4),
                         "per_position": [round(p, 4) for p in stats.per_position],
                         "mean_acceptance_length": round(stats.mean_acceptance_length, 4),
                         "identical_to_greedy": toks == greedy, "drafts": stats.drafts,
                         "draft_tokens": stats.draft_tokens, "accepted": stats.accepted,
                         **{f"heldout_{key}": round(scores[key], 4) for key in (
                             "agreement", "main_loss", "mtp_loss", "expected_greedy_T", "expected_probabilistic_T")
                            if key in scores}})
        print(f"== {lay['name']}: " + ", ".join(f"k={r['k']} {r['acceptance']:.3f}" for r in rows
                                                if r["layout"] == lay["name"]) + f" ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr)
    if REFERENCE in greedy_tokens:
        for r in rows:
            agree = agreement(greedy_tokens[r["layout"]], greedy_tokens[REFERENCE])
            r["greedy_agreement_with_reference"] = round(agree, 4)
    m = meta()
    m.update(prompts=len(prompts), max_tokens=args.max_tokens, ks=ks, threads=args.threads, dtype="float32",
             temperature=args.temperature,
             heldout=f"{args.heldout_windows} x {args.heldout_len} tokens",
             skipped=skipped, checks=checks(rows, lays, greedy_tokens))
    table = [{**r, "per_position": " / ".join(f"{p:.3f}" for p in r["per_position"])} for r in rows]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(portable({"meta": m, "rows": rows}), fh, indent=1)
    write_markdown(args.out, m, table)
    plot(rows, args.out)
    c = m["checks"]
    ok = c["all_identical_to_greedy"] and all(c["equivalent_layouts_identical"].values())
    print(json.dumps(c, indent=1), file=sys.stderr)
    return 0 if ok else 1


def write_markdown(out: str, m: dict[str, Any], table: list[dict[str, Any]]) -> None:
    c = m["checks"]
    lines = ["# MTP draft acceptance offline (portable model, greedy, no vLLM)", "",
             f"Machine: {m['machine']}; git {m['git_sha']}; python {m['python']}; torch threads {m['threads']}, "
             f"fp32 compute.", "",
             f"{m['prompts']} prompts (assets/bench_prompts.jsonl, the vLLM benchmark's set) x {m['max_tokens']} "
             "greedy tokens, each layout's own tokenizer. acceptance = accepted / draft tokens; per position = "
             "accepted at i / drafts; mean acceptance length = 1 + accepted / drafts (bonus token included); "
             "greedy agreement = share of tokens equal to upstream_bf16's greedy output before the first "
             "divergence (quantized trunks change the main model too); held-out columns: teacher-forced on "
             f"the first {m['heldout']} of data/tiny_corpus/heldout.jsonl (agreement = draft argmax == main argmax at "
             "the next position, i.e. k = 1 acceptance without trajectory effects; losses in nats; "
             f"heldout_expected_*_T = expected k = 1 acceptance at T = {m['temperature']} of greedy drafting, "
             "mean p_target(argmax q), and of probabilistic drafting, mean sum min(p_target, q_draft)).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table:
        lines.append("| " + " | ".join(_fmt(r.get(col, "")) for col in COLUMNS) + " |")
    lines += ["", "## Checks", "",
              f"- BF16 draft ({REFERENCE}) acceptance at k = 1: **{_fmt(c['bf16_k1_acceptance'])}**",
              f"- speculative output token-identical to plain greedy for every layout and k: "
              f"**{c['all_identical_to_greedy']}**",
              "- equivalent layouts identical (tokens and per-position acceptance): "
              + (", ".join(f"{k}: {v}" for k, v in c["equivalent_layouts_identical"].items()) or "none"),
              "- acceptance minus BF16 (same k), layouts not equivalent to it: "
              + ", ".join(f"{k} {v:+.3f}" for k, v in c["acceptance_minus_bf16"].items())]
    if m["skipped"]:
        lines.append("- skipped: " + "; ".join(f"{k}: {v}" for k, v in m["skipped"].items()))
    lines += ["", "A quantized trunk changes the main model's own greedy output (see greedy agreement), so its "
              "generated acceptance is measured on different text than BF16's and moves by a few points either "
              "way; the held-out agreement compares every layout on the same text."]
    lines += ["", f"![acceptance per layout and k]({Path(out).name}.png)", ""]
    Path(out + ".md").write_text("\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
