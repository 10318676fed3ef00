"""Per-step overhead of the plugin's attention with many short requests per step, before vs after a change.

One in-process vLLM engine (shipped tiny model, no speculation, ``max_num_seqs=512``, ``max_model_len=64``)
generates ``--requests`` identical short prompts x ``--max-tokens`` sampled tokens, twice after a warm-up: once
plainly (tokens/s, and the process's CPU seconds, less sensitive to other jobs on a shared box) and once under
cProfile (cumulative seconds of the attention functions). Many requests per step is where work done once per
request segment, rather than once per step, shows.

Each run is a fresh child process; the baseline runs the package source of ``--baseline-rev`` (``git archive``
into a temporary directory, first on ``PYTHONPATH``; the child records which package it imported), the other
the working tree, alternating for ``--rounds`` rounds so both see the same background load.

    python benchmarks/step_overhead.py --baseline-rev 9d7a395 --out benchmarks/results/step_overhead
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

from vllm_deepseek_v4.devtools.records import REPO_ROOT, meta, portable

# (file suffix, function name): cumulative times reported from the profile (inclusive of what they call).
PROFILED = [
    ("model/attention.py", "forward"),
    ("model/attention.py", "_segment"),
    ("model/attention.py", "_entries"),
    ("model/attention.py", "output"),
    ("kernels/dispatch.py", "sink_attention"),
    ("model/primitives.py", "apply_rope"),
    ("model/compressor.py", "select"),
    ("vllm_plugin/kv.py", "window"),
    ("vllm_plugin/kv.py", "memo"),
    ("vllm_plugin/kv.py", "_locate"),
]
# The profile of the task that asked for this change (before it; same workload, cProfile, this kind of box).
BASELINE = {"profiled_total_s": 15.8, "segment_cumulative_s": 12.1, "segment_calls": 15000,
            "attend_cumulative_s": 5.7, "sink_attention_s": 2.6, "apply_rope_s": 2.2, "apply_rope_calls": 25100,
            "note": "quoted from the task text (cProfile of 1,000 requests x 3 tokens before the change)"}


def _cumulative(prof: cProfile.Profile) -> dict[str, dict[str, float]]:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, dict[str, float]] = {}
    for (path, _line, name), (_cc, ncalls, _tt, ct, _callers) in stats.items():
        for suffix, fn in PROFILED:
            if name == fn and path.endswith(suffix):
                key = f"{suffix}:{fn}"
                prev = out.get(key, {"calls": 0, "cumulative_s": 0.0})
                out[key] = {"calls": prev["calls"] + ncalls, "cumulative_s": prev["cumulative_s"] + ct}
    return out


def run(n_requests: int, max_tokens: int, model: str) -> dict:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "VLLM_LOGGING_LEVEL": "ERROR"})
    from vllm import LLM, SamplingParams

    import vllm_deepseek_v4

    llm = LLM(model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=64, max_num_seqs=512, seed=0, kv_cache_memory_bytes=64 << 20)
    prompt = {"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}

    def generate(n: int) -> tuple[float, float, int]:
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, detokenize=False,
                                 ignore_eos=True) for i in range(n)]
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate([prompt] * n, params, use_tqdm=False)
        return time.perf_counter() - t, time.process_time() - c, sum(len(o.outputs[0].token_ids) for o in outs)

    generate(8)                                                         # warm-up, not counted
    wall, cpu, tokens = generate(n_requests)
    prof = cProfile.Profile()
    prof.enable()
    t = time.perf_counter()
    generate(n_requests)
    profiled = time.perf_counter() - t
    prof.disable()
    return {"package": vllm_deepseek_v4.__file__, "wall_s": wall, "cpu_s": cpu, "tokens": tokens,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "profiled_total_s": profiled,
            "cumulative": _cumulative(prof)}


def _child(src: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--one", "--requests", str(args.requests), "--max-tokens",
           str(args.max_tokens), "--model", args.model]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"run with {src} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict = json.loads(line[len("RESULT "):])
    if not result["package"].startswith(src):
        raise SystemExit(f"the child imported {result['package']}, not the package under {src}")
    return result


def main() -> None:
    from vllm_deepseek_v4.assets import tiny_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-rev", help="git revision whose src/ is the baseline (required)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=tiny_model_path())
    ap.add_argument("--out", default="benchmarks/results/step_overhead")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)    # child mode: one run, JSON out
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run(args.requests, args.max_tokens, args.model)), flush=True)
        return
    if not args.baseline_rev:
        ap.error("--baseline-rev is required: the git revision to compare the working tree with")
    runs: dict[str, list[dict]] = {"baseline": [], "working tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.baseline_rev, "src"], cwd=REPO_ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for _ in range(args.rounds):
            for label, src in (("baseline", os.path.join(tmp, "src")), ("working tree", str(REPO_ROOT / "src"))):
                runs[label].append(_child(src, args))
    m = meta()
    summary = {label: _summary(rs) for label, rs in runs.items()}
    base, new = summary["baseline"], summary["working tree"]
    ratios = {k: new[k] / base[k] for k in ("tokens_per_s", "tokens_per_cpu_s")}
    ratios["attention_forward_profiled"] = new["attention_forward_s"] / base["attention_forward_s"]
    head = f"| | baseline ({args.baseline_rev}) | working tree ({m['git_sha']}) | after / before |"
    rows = [("tokens/s (median)", "tokens_per_s", "{:.1f}"), ("tokens per CPU second (median)",
             "tokens_per_cpu_s", "{:.1f}"), ("cProfile: whole generate, s (median)", "profiled_total_s", "{:.2f}"),
            ("cProfile: `Attention.forward` cumulative, s (median)", "attention_forward_s", "{:.2f}")]
    md = ["# Attention's per-step overhead: many short requests per step (shipped tiny model)", "",
          f"Machine: {m['machine']}, a shared and noisy box (other jobs ran meanwhile: compare CPU seconds and "
          f"the ratios, not single wall times); in-process vLLM engine, fp32, enforce-eager, OMP_NUM_THREADS=1, "
          f"max_num_seqs=512; {args.requests} identical 8-token prompts x {args.max_tokens} sampled tokens; "
          f"{args.rounds} alternating rounds of fresh processes per side, medians.", "",
          head, "|---|---|---|---|"]
    for name, key, fmt in rows:
        ratio = f"{new[key] / base[key]:.2f}"
        md.append(f"| {name} | {fmt.format(base[key])} | {fmt.format(new[key])} | {ratio} |")
    md += ["", f"The task's profile before the change (cProfile, same workload): {BASELINE['profiled_total_s']} s in "
           f"all, {BASELINE['segment_cumulative_s']} s in `Attention._segment` ({BASELINE['segment_calls']} calls).",
           "", "cProfile, cumulative seconds of the last round (calls):", "",
           "| function | baseline | working tree |", "|---|---|---|"]
    last = {label: rs[-1]["cumulative"] for label, rs in runs.items()}
    for suffix, fn in PROFILED:
        key = f"{suffix}:{fn}"
        cells = [f"{c[key]['cumulative_s']:.2f} ({c[key]['calls']})" if key in c else "-" for c in last.values()]
        md.append(f"| `{key}` | {' | '.join(cells)} |")
    md += ["", "cProfile inflates every Python call, so its seconds overstate Python-heavy code; the tokens/s "
           "and CPU-second rows are measured without it."]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(portable({"meta": m, "baseline_rev": args.baseline_rev, "task_baseline": BASELINE,
                            "summary": summary, "ratios": ratios, "runs": runs}), fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


def _summary(rs: list[dict]) -> dict[str, float]:
    med = statistics.median
    return {"tokens_per_s": med(r["tokens_per_s"] for r in rs),
            "tokens_per_cpu_s": med(r["tokens_per_cpu_s"] for r in rs),
            "profiled_total_s": med(r["profiled_total_s"] for r in rs),
            "attention_forward_s": med(r["cumulative"]["model/attention.py:forward"]["cumulative_s"] for r in rs)}


if __name__ == "__main__":
    main()
