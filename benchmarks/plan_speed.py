"""Time to plan the published DSv4-Flash layout vs the raw time to read its headers (one run, as a ratio).

"Raw" is the floor: open each shard, read the 8-byte length and the JSON header, ``json.loads`` it, plus the
index. "Scan" adds our validation (offsets, dtypes, index <-> files); "plan" adds naming resolution, quant
detection and strict accounting. Target: plan <= 3x raw and under 1 s.

The steps run interleaved (each round times every step once) so that a busy machine slows them alike; wall
and CPU time are both reported. The planner pauses the cyclic GC while it builds its records (they all stay
alive), so the raw read is also shown with the GC paused. ``dsv4 inspect --json`` is timed end to end in a
fresh process (start-up, imports, plan, report). ``--steps`` adds the planner's CPU time step by step.

  python benchmarks/plan_speed.py [--artifact DIR] [--repeat 9] [--steps] [--out benchmarks/results/plan_speed]
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from vllm_deepseek_v4.devtools.records import meta, write

COLUMNS = ["step", "tensors", "median_s", "p20_s", "p80_s", "ratio_vs_raw", "cpu_median_s", "cpu_ratio_vs_raw"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", help="artifact dir (default: materialise the sparse Flash layout)")
    p.add_argument("--repeat", type=int, default=9, help="rounds; each times every step once")
    p.add_argument("--steps", action="store_true", help="also time the planner step by step (CPU)")
    p.add_argument("--out", default="")


def raw_headers(d: str) -> int:
    n = 0
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with open(f, "rb") as fh:
            n += len(json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0])))
    with open(os.path.join(d, "model.safetensors.index.json")) as fh:
        json.load(fh)
    return n


def gc_paused(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()
    return run


def inspect_cli(d: str) -> Callable[[], None]:
    cmd = [sys.executable, "-m", "vllm_deepseek_v4.cli.main", "inspect", d, "--json"]
    return lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the CLI runs in a child)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def rounds(steps: dict[str, Callable[[], Any]], repeat: int) -> dict[str, dict[str, float]]:
    """Median / p20 / p80 wall and median CPU seconds per step, the steps interleaved round by round."""
    for fn in steps.values():                  # warm-up: imports, first-use caches
        fn()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for k, fn in steps.items():
            c, w = _cpu(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(_cpu() - c)
    out = {}
    for k in steps:
        ts = sorted(wall[k])
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[k] = {"median_s": statistics.median(ts), "p20_s": q(0.2), "p80_s": q(0.8), "n": len(ts),
                  "cpu_median_s": statistics.median(cpu[k])}
    return out


def plan_steps(d: str, repeat: int) -> list[dict[str, Any]]:
    """CPU time of each step of ``build_plan`` (the same calls in the same order, GC paused as it does)."""
    from vllm_deepseek_v4.checkpoint.format import _read_header
    from vllm_deepseek_v4.checkpoint.scan import _scan
    from vllm_deepseek_v4.config import load_config
    from vllm_deepseek_v4.loader import account, expected, plan
    from vllm_deepseek_v4.loader.config_check import quant_config_disagreements

    times: dict[str, list[float]] = {}

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t = time.process_time()
        r = fn()
        times.setdefault(label, []).append(time.process_time() - t)
        return r
    for i in range(repeat + 1):
        gc.disable()
        files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        timed("scan: read + json.loads headers (in scan below)",
              lambda: [_read_header(f, os.path.getsize(f)) for f in files])
        ck = timed("scan (headers, index, validation)", lambda: _scan(d))
        cfg = timed("config", lambda: load_config(d))
        p = plan.LoadPlan(path=d, cfg=cfg, checkpoint=ck, include_mtp=True)
        batches, loose, conventions = timed("resolve names (naming.batch)", lambda: plan._resolve(p))
        specs = timed("expected parameters", lambda: expected.expected_params(cfg))
        timed("account (classify, fill params)", lambda: account.account(p, specs, batches, loose))
        timed("MTP checks, naming, quantization_config", lambda: (plan._check_mtp(p), plan._naming(conventions),
                                                                quant_config_disagreements(p)))
        del batches, loose, specs
        timed("GC: one young collection at the end", lambda: (gc.enable(), gc.collect(0)))
        t = time.process_time()
        del p, ck
        times.setdefault("free the plan", []).append(time.process_time() - t)
        if i == 0:                              # warm-up round
            times.clear()
    return [{"step": k, "cpu_median_s": statistics.median(v)} for k, v in times.items()]


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    if args.artifact:
        return measure(args.artifact, args)
    with tempfile.TemporaryDirectory(prefix="flash-") as d:
        subprocess.run([sys.executable, "-m", "vllm_deepseek_v4.devtools.flash", "sparse", d],
                       check=True, capture_output=True)
        return measure(d, args)


def measure(d: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    from vllm_deepseek_v4.checkpoint import scan_checkpoint
    from vllm_deepseek_v4.loader import build_plan
    plan = build_plan(d)
    assert plan.ok, plan.problems()[:5]
    n = len(plan.checkpoint.tensors)
    del plan
    steps = {"raw header read (json.loads)": lambda: raw_headers(d),
             "raw header read, GC paused": gc_paused(lambda: raw_headers(d)),
             "scan + validate": lambda: scan_checkpoint(d),
             "full plan": lambda: build_plan(d),
             "dsv4 inspect --json (new process)": inspect_cli(d)}
    res = rounds(steps, args.repeat)
    raw = res["raw header read (json.loads)"]
    rows = [{"step": k, "tensors": n, **t, "ratio_vs_raw": t["median_s"] / raw["median_s"],
             "cpu_ratio_vs_raw": t["cpu_median_s"] / raw["cpu_median_s"]} for k, t in res.items()]
    return rows, plan_steps(d, args.repeat) if args.steps else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args()
    load = os.getloadavg()
    rows, steps = run(args)
    load_after = os.getloadavg()
    print(f"{COLUMNS[0]:>36s}" + "".join(f"{c:>17s}" for c in COLUMNS[1:]))
    for r in rows:
        print(f"{r['step']:>36s}" + "".join(f"{r[c]:>17.4g}" if isinstance(r[c], float) else f"{r[c]:>17}"
                                            for c in COLUMNS[1:]))
    for s in steps:
        print(f"  {s['step']:<50s} {s['cpu_median_s'] * 1e3:8.1f} ms CPU")
    if args.out:
        m = meta()
        m["loadavg_1m_before_after"] = [round(load[0], 2), round(load_after[0], 2)]
        write(args.out, m, rows, COLUMNS, "Load-plan speed on the published DSv4-Flash layout (69,187 tensors)")
        notes = [f"", f"Load average (1 min) before / after: {load[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} "
                 "CPUs. Steps run interleaved, one of each per round; CPU includes the CLI's child process."]
        if steps:
            notes += ["", "Planner CPU time by step (median; the first row is part of the scan row):", "",
                      "| step | cpu_ms |", "|---|---|"]
            notes += [f"| {s['step']} | {s['cpu_median_s'] * 1e3:.1f} |" for s in steps]
            with open(args.out + ".json") as fh:
                doc = json.load(fh)
            doc["steps"] = steps
            with open(args.out + ".json", "w") as fh:
                json.dump(doc, fh, indent=1)
        with open(args.out + ".md", "a") as fh:
            fh.write("\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
