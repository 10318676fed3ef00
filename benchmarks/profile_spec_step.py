"""Where a decode step's time goes, with and without MTP speculation, on the shipped tiny model (in-process vLLM).

Each configuration runs in a fresh subprocess (one engine per K): greedy, ``--prompts`` prompts x ``--max-tokens``
tokens, one request at a time, after a warm-up request. Instead of cProfile (which inflates every Python call)
the named functions of vLLM's step and of our plugin are wrapped with wall-clock timers; the table gives
milliseconds per engine step (inclusive: a row contains the rows it calls) and the end-to-end speedup.

    python benchmarks/profile_spec_step.py --k 0,1,2 --out benchmarks/results/profile_spec_step
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import subprocess
import sys
import time

from vllm_deepseek_v4.devtools.records import meta, portable

# (module, qualified name, label): inclusive timers, listed in the table in this order.
TIMED = [
    ("vllm.v1.engine.core", "EngineCore.step", "engine step"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", "execute_model"),
    ("vllm_deepseek_v4.vllm_plugin.model", "DSV4ForCausalLM.forward", "  target forward (ours)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", "  vLLM input preparation"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens", "sample_tokens (incl. proposal)"),
    ("vllm.v1.sample.rejection_sampler", "RejectionSampler.forward", "  rejection sampler"),
    ("vllm.v1.sample.sampler", "Sampler.forward", "  sampler"),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.propose", "  draft proposal (vLLM)"),
    ("vllm_deepseek_v4.vllm_plugin.mtp", "DSV4MTPDraft.forward", "    MTP block forward (ours)"),
    ("vllm_deepseek_v4.vllm_plugin.mtp", "DSV4MTPDraft.compute_logits", "    MTP logits (ours)"),
    # Pieces of every block, target and MTP together (they sit under both forwards above).
    ("vllm_deepseek_v4.model.attention", "Attention.forward", "attention, all blocks incl. MTP"),
    ("vllm_deepseek_v4.model.moe", "MoE.forward", "MoE, all blocks incl. MTP"),
    ("vllm_deepseek_v4.model.hyper", "hc_pre", "hc_pre incl. Sinkhorn, all sites"),
    ("vllm_deepseek_v4.model.hyper", "hc_post", "hc_post, all sites"),
]
# Modules that imported hc_pre / hc_post by name: the timer must replace those bindings too.
HC_USERS = ("vllm_deepseek_v4.model.block", "vllm_deepseek_v4.model.mtp", "vllm_deepseek_v4.model.model")


def _install_timers(total: dict[str, float], calls: collections.Counter) -> None:
    for modname, qual, _ in TIMED:
        owner = importlib.import_module(modname)
        *path, attr = qual.split(".")
        for p in path:
            owner = getattr(owner, p)
        fn = getattr(owner, attr)

        def timed(*a, __fn=fn, __q=qual, **k):
            t = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                total[__q] += time.perf_counter() - t
                calls[__q] += 1

        functools.update_wrapper(timed, fn)
        setattr(owner, attr, timed)
        if not path:                                   # a module-level function: rebind where it was imported
            for user in HC_USERS:
                m = importlib.import_module(user)
                if getattr(m, attr, None) is fn:
                    setattr(m, attr, timed)


def run_one(k: int, n_prompts: int, max_tokens: int) -> dict:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "VLLM_LOGGING_LEVEL": "ERROR"})
    from vllm import LLM, SamplingParams

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.cli.bench_acceptance import load_prompts

    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    _install_timers(total, calls)
    kw: dict = dict(model=tiny_model_path(), dtype="float32", enforce_eager=True, max_model_len=512)
    if k:
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = load_prompts(None, n_prompts)
    llm.generate(prompts[:1], sp, use_tqdm=False)                   # warm-up, not counted
    total.clear()
    calls.clear()
    t = time.perf_counter()
    outs = [o for p in prompts for o in llm.generate([p], sp, use_tqdm=False)]
    wall = time.perf_counter() - t
    steps = calls["EngineCore.step"]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"k": k, "wall_s": wall, "steps": steps, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ms_per_step": {q: 1000 * total[q] / steps for _, q, _ in TIMED if calls[q]},
            "texts": [o.outputs[0].text for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="0,1,2", help="comma-separated K (0 = no speculation)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/profile_spec_step")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # child mode: one K, JSON out
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args.prompts, args.max_tokens)), flush=True)
        return
    runs = []
    for k in (int(x) for x in args.k.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(k), "--prompts", str(args.prompts),
                              "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, timeout=1800)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"k={k} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        runs.append(json.loads(line[len("RESULT "):]))
    base = next((r for r in runs if r["k"] == 0), None)
    for r in runs:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["mean_tokens_per_step"] = r["tokens"] / r["steps"]
        r["greedy_matches_no_spec"] = r["texts"] == base["texts"] if base else None
    head = ["", *[f"K={r['k']}" if r["k"] else "no spec" for r in runs]]
    rows = [["tokens/s", *[f"{r['tokens_per_s']:.1f}" for r in runs]],
            ["speedup", *[f"{r['speedup']:.2f}x" if r["speedup"] else "-" for r in runs]],
            ["tokens per step", *[f"{r['mean_tokens_per_step']:.2f}" for r in runs]],
            ["greedy = no spec", *[str(r["greedy_matches_no_spec"]) for r in runs]]]
    for _, q, label in TIMED:
        cells = [f"{r['ms_per_step'][q]:.2f}" if q in r["ms_per_step"] else "-" for r in runs]
        if any(c != "-" for c in cells):
            rows.append([f"`{label.strip()}`" if not label.startswith(" ") else
                         "&nbsp;" * (len(label) - len(label.lstrip())) + label.strip(), *cells])
    m = meta()
    md = ["# Where a decode step's time goes (ms per engine step, inclusive), shipped tiny model",
          "", f"Machine: {m['machine']}; git {m['git_sha']}; python {m['python']}; in-process vLLM engine, fp32, "
          f"enforce-eager, OMP_NUM_THREADS=1, {args.prompts} prompts x {args.max_tokens} greedy tokens, one request "
          "at a time.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        runs_out = [{k: v for k, v in r.items() if k != "texts"} for r in runs]
        json.dump(portable({"meta": m, "runs": runs_out}), fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
