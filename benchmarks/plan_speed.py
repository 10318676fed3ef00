"""Time to plan a DSv4 layout vs the raw time to read its headers, as ratios (one run).

"Raw" is the floor: open each shard, read the 8-byte length and the JSON header, ``json.loads`` it, plus the
index. "Scan" adds our validation (offsets, dtypes, index <-> files); "plan" adds naming resolution, quant
detection and strict accounting. ``dsv4 inspect --json`` is timed end to end in a fresh process (start-up,
imports, scan, plan, report). Two targets, both against the raw read of the same layout:

- the published Flash layout (69,187 tensors): the full plan in-process <= 3x the raw read;
- a Pro-sized layout (145,116 tensors: Pro's 61 layers on Pro's compress schedule, 384 experts, 64 shards,
  Flash's shapes -- planning time depends on the number of tensors, not their size): ``dsv4 inspect --json``
  as a whole process <= 4x the raw read.

The steps of one layout run interleaved (each round times every step once) so that a busy machine slows them
alike; wall and CPU time are both reported. The planner pauses the cyclic GC while it builds its records
(they all stay alive), so the raw read is also shown with the GC paused. ``--steps`` adds the planner's CPU
time step by step (Flash).

  python benchmarks/plan_speed.py [--artifact DIR] [--repeat 9] [--steps] [--out benchmarks/results/plan_speed]
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from vllm_deepseek_v4.devtools import flash
from vllm_deepseek_v4.devtools.records import meta, write

COLUMNS = ["layout", "step", "tensors", "median_s", "p20_s", "p80_s", "ratio_vs_raw", "cpu_median_s",
           "cpu_ratio_vs_raw"]
RAW, PLAN, INSPECT = "raw header read (json.loads)", "full plan", "dsv4 inspect --json (new process)"
TARGETS = {("flash", PLAN): 3.0, ("pro-sized", INSPECT): 4.0}      # ratio_vs_raw at most
PRO_LAYERS, PRO_EXPERTS, PRO_SHARDS = 61, 384, 64
PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4]       # docs/dsv4-architecture.md §1.2: 0, 1 and odd HCA, even CSA


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", help="plan this artifact dir only (default: the Flash and Pro-sized layouts)")
    p.add_argument("--repeat", type=int, default=9, help="rounds; each times every step once")
    p.add_argument("--steps", action="store_true", help="also time the planner step by step (CPU)")
    p.add_argument("--out", default="")


def pro_sized_rows() -> tuple[list[flash.Row], dict[str, Any]]:
    """The Pro-sized layout: Flash's blocks (``devtools.flash``) re-indexed to Pro's counts, and its config."""
    rows = flash.inventory()
    block = {i: [(n[len(f"layers.{i}."):], s, dt) for n, s, dt, _ in rows if n.startswith(f"layers.{i}.")]
             for i in (0, 3, 4)}                         # Flash layer 0: sliding + hash; 3: HCA; 4: CSA
    tid2eid = next(r for r in block[0] if r[0] == "ffn.gate.tid2eid")

    def more_experts(local: list[tuple[str, list[int], str]]) -> list[tuple[str, list[int], str]]:
        """384 routed experts: copies of experts 0-127 as 256-383, and a router row per expert."""
        router = {"ffn.gate.weight", "ffn.gate.bias"}
        local = [(n, [PRO_EXPERTS] + s[1:] if n in router else s, dt) for n, s, dt in local]
        extra = [(re.sub(r"^ffn\.experts\.(\d+)\.", lambda m: f"ffn.experts.{int(m.group(1)) + 256}.", n), s, dt)
                 for n, s, dt in local if re.match(r"ffn\.experts\.(\d+)\.", n)
                 and int(n.split(".")[2]) < PRO_EXPERTS - 256]
        return local + extra

    def shard(i: int) -> str:
        return f"model-{i:05d}-of-{PRO_SHARDS:05d}.safetensors"
    out = [(n, s, dt, shard(1)) for n, s, dt, f in rows if n == "embed.weight"]
    for i, ratio in enumerate(PRO_RATIOS):
        local = more_experts(block[4 if ratio == 4 else 3])
        if i < 3:                                        # hash layers route by tid2eid instead of a gate bias
            local = [tid2eid if n == "ffn.gate.bias" else (n, s, dt) for n, s, dt in local]
        out += [(f"layers.{i}.{n}", s, dt, shard(1 + i * (PRO_SHARDS - 2) // PRO_LAYERS)) for n, s, dt in local]
    top = [(n, s, dt) for n, s, dt, _ in rows if not n.startswith(("layers.", "mtp.", "embed."))]
    out += [(n, s, dt, shard(PRO_SHARDS - 1)) for n, s, dt in top]
    mtp = more_experts([(n[len("mtp.0."):], s, dt) for n, s, dt, _ in rows if n.startswith("mtp.0.")])
    out += [(f"mtp.0.{n}", s, dt, shard(PRO_SHARDS)) for n, s, dt in mtp]
    cfg = dict(flash.config(), num_hidden_layers=PRO_LAYERS, n_routed_experts=PRO_EXPERTS,
               compress_ratios=PRO_RATIOS + [0])
    return out, cfg


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
        found, problems, explained, conventions = timed("resolve names (naming)", lambda: plan._resolve(ck, cfg))
        specs = timed("expected parameters", lambda: expected.expected_params(cfg))
        books = timed("account (classify, fill params)", lambda: account.account(specs, found, cfg, True))
        p = plan.LoadPlan(path=d, cfg=cfg, checkpoint=ck, include_mtp=True, params=books.params)
        timed("MTP checks, quantization_config", lambda: (plan._check_mtp(p), quant_config_disagreements(p)))
        del found, problems, explained, specs, books
        timed("GC: one young collection at the end", lambda: (gc.enable(), gc.collect(0)))
        t = time.process_time()
        del p, ck
        times.setdefault("free the plan", []).append(time.process_time() - t)
        if i == 0:                              # warm-up round
            times.clear()
    return [{"step": k, "cpu_median_s": statistics.median(v)} for k, v in times.items()]


def measure(layout: str, d: str, repeat: int) -> list[dict[str, Any]]:
    from vllm_deepseek_v4.checkpoint import scan_checkpoint
    from vllm_deepseek_v4.loader import build_plan
    plan = build_plan(d)
    assert plan.ok, plan.problems()[:5]
    n = len(plan.checkpoint.tensors)
    del plan
    steps = {RAW: lambda: raw_headers(d),
             "raw header read, GC paused": gc_paused(lambda: raw_headers(d)),
             "scan + validate": lambda: scan_checkpoint(d),
             PLAN: lambda: build_plan(d),
             INSPECT: inspect_cli(d)}
    res = rounds(steps, repeat)
    raw = res[RAW]
    return [{"layout": layout, "step": k, "tensors": n, **t, "ratio_vs_raw": t["median_s"] / raw["median_s"],
             "cpu_ratio_vs_raw": t["cpu_median_s"] / raw["cpu_median_s"]} for k, t in res.items()]


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    if args.artifact:
        return measure(os.path.basename(os.path.normpath(args.artifact)), args.artifact, args.repeat), (
            plan_steps(args.artifact, args.repeat) if args.steps else [])
    with tempfile.TemporaryDirectory(prefix="flash-") as fd, tempfile.TemporaryDirectory(prefix="pro-") as pd:
        flash.materialise(fd)
        rows, cfg = pro_sized_rows()
        flash.materialise(pd, rows, cfg=cfg)
        out = measure("flash", fd, args.repeat) + measure("pro-sized", pd, args.repeat)
        return out, plan_steps(fd, args.repeat) if args.steps else []


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: the measured ratio (wall, median) against its limit."""
    out = []
    for r in rows:
        limit = TARGETS.get((r["layout"], r["step"]))
        if limit is not None:
            out.append(f"{r['layout']}: {r['step']} / raw header read = {r['ratio_vs_raw']:.2f} "
                       f"(target <= {limit:g}: {'met' if r['ratio_vs_raw'] <= limit else 'MISSED'})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args()
    load = os.getloadavg()
    rows, steps = run(args)
    load_after = os.getloadavg()
    print(f"{COLUMNS[0]:>10s}{COLUMNS[1]:>36s}" + "".join(f"{c:>17s}" for c in COLUMNS[2:]))
    for r in rows:
        print(f"{r['layout']:>10s}{r['step']:>36s}" + "".join(
            f"{r[c]:>17.4g}" if isinstance(r[c], float) else f"{r[c]:>17}" for c in COLUMNS[2:]))
    for s in steps:
        print(f"  {s['step']:<50s} {s['cpu_median_s'] * 1e3:8.1f} ms CPU")
    print("\n".join(verdicts(rows)))
    if args.out:
        m = meta()
        m["loadavg_1m_before_after"] = [round(load[0], 2), round(load_after[0], 2)]
        write(args.out, m, rows, COLUMNS, "Load-plan speed: the published DSv4-Flash layout (69,187 tensors) and "
              "a Pro-sized one (145,116)")
        notes = ["", "Targets (wall-clock medians):", ""] + [f"- {v}" for v in verdicts(rows)]
        notes += ["", f"Load average (1 min) before / after: {load[0]:.2f} / {load_after[0]:.2f} on "
                  f"{os.cpu_count()} CPUs. Steps run interleaved, one of each per round; CPU includes the CLI's "
                  "child process."]
        if steps:
            notes += ["", "Planner CPU time by step, Flash (median; the first row is part of the scan row):", "",
                      "| step | cpu_ms |", "|---|---|"]
            notes += [f"| {s['step']} | {s['cpu_median_s'] * 1e3:.1f} |" for s in steps]
        with open(args.out + ".json") as fh:
            doc = json.load(fh)
        doc["steps"], doc["targets"] = steps, verdicts(rows)
        with open(args.out + ".json", "w") as fh:
            json.dump(doc, fh, indent=1)
        with open(args.out + ".md", "a") as fh:
            fh.write("\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
