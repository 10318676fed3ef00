"""Native vs stock loading time of vLLM's own DeepSeek-V4 target + MTP draft, on the same >= 1 GB artifact.

The artifact is the vLLM-geometry model (``scripts/vllm_geometry_model.py``: every layer type, one MTP
block) scaled up -- ``hidden_size`` 1024, 64 routed experts of 512, 4 layers + MTP -- in the upstream BF16
release format (the layout stock vLLM 0.32 loads without error), about 1.1 GB in 2 shards. Values are seeded
random BF16 / F32 (loading never decodes them).

Each measurement runs in its own child process, which builds vLLM's ``DeepseekV4ForCausalLM`` and
``DeepSeekV4MTP`` on CPU (untimed) and then times only the loading:

- ``stock``: vLLM's own ``load_weights`` of both classes, each fed vLLM's ``safetensors_weights_iterator``
  over every shard (what vLLM's default loader does for the target and again for the draft), quant config
  derived from the artifact;
- ``native``: what the plugin's native engine runs, ``native.load_native``: our ``build_plan`` (headers only,
  timed here) + ``native.loader.load_class`` for both classes (one positional read per planned tensor, the
  parameter's own ``weight_loader``, value checks, accounting; timed by ``load_native`` itself, which also
  installs our kernels where vLLM has none -- none for this BF16 artifact). ``native_excl_plan`` is the same
  without the plan.

The page cache is warmed by reading every shard once before any measurement. ``--rounds`` alternates the
two measurements that many times and reports medians; ratio = native / stock (target <= 1.1). Torch runs
with one intra-op thread in every child (a shared 2-core box). Peak RSS (``VmHWM``) per child is recorded.

    python benchmarks/native_load.py [--rounds 7] [--keep DIR] [--out benchmarks/results/native_load]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
SCALE = {"hidden_size": 1024, "n_routed_experts": 64, "moe_intermediate_size": 512}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def write_artifact(out: Path, *, seed: int = 0, shards: int = 2) -> dict[str, Any]:
    """The scaled vLLM-geometry model in upstream BF16 format (names and shapes from our model on meta)."""
    import torch
    from safetensors.torch import save_file

    from vllm_deepseek_v4.assets import tiny_model_path
    from vllm_deepseek_v4.config import DSV4Config
    from vllm_deepseek_v4.model import DSV4Model
    from vllm_geometry_model import _FP32_MARKS, GEOMETRY

    cfg_dict = {**GEOMETRY, **SCALE}
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = DSV4Model(DSV4Config.from_dict(cfg_dict), dtype=torch.float32)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    total = sum(torch.Size(s).numel() * (4 if any(m in n for m in _FP32_MARKS) else 2) for n, (s, _) in shapes.items())
    per, i, k, weight_map = total / shards + 1, 0, 0, {}
    while i < len(names):
        part, size = {}, 0
        while i < len(names) and (size < per or k == shards - 1):
            n = names[i]
            s, dt = shapes[n]
            if dt.is_floating_point:
                fp32 = any(m in n for m in _FP32_MARKS)
                t = (torch.randn(s, generator=g, dtype=torch.float32 if fp32 else torch.bfloat16) * 0.02)
            else:
                t = torch.randint(0, cfg_dict["n_routed_experts"], s, generator=g, dtype=dt)
            part[n] = t.contiguous()
            size += t.numel() * t.element_size()
            i += 1
        k += 1
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del part
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    tiny = Path(tiny_model_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / f).is_file():
            (out / f).write_bytes((tiny / f).read_bytes())
    return {"tensors": len(names), "bytes": total, "shards": shards}


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(mode: str, path: str) -> dict[str, Any]:
    """One measurement in this (child) process; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    out = {"mode": mode, **(_stock(path) if mode == "stock" else _native(path))}
    out["peak_rss_mb"] = round(_vmhwm_mb())
    print("RESULT " + json.dumps(out), flush=True)
    return out


def _stock(path: str) -> dict[str, Any]:
    """vLLM's own ``load_weights`` on its classes, with vLLM's own quant config."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from vllm_deepseek_v4.native.build import construct, ensure_distributed, make_vllm_config
    from vllm_deepseek_v4.native.standins import cpu_standins

    with cpu_standins():
        vc = make_vllm_config(path, native=False)
        ensure_distributed(vc)
        target = construct(vc, "target", device="cpu", quant_config=vc.quant_config)
        mtp = construct(vc, "mtp", device="cpu", quant_config=vc.quant_config)
        files = sorted(str(p) for p in Path(path).glob("*.safetensors"))
        c0, t0 = time.process_time(), time.perf_counter()
        loaded_t = target.load_weights(safetensors_weights_iterator(files, False))
        t1 = time.perf_counter()
        loaded_m = mtp.load_weights(safetensors_weights_iterator(files, False))
        t2 = time.perf_counter()
    return dict(seconds=t2 - t0, cpu_s=time.process_time() - c0, target_s=t1 - t0, mtp_s=t2 - t1,
                target_loaded=f"{len(loaded_t)}/{sum(1 for _ in target.named_parameters())}",
                mtp_loaded=f"{len(loaded_m)}/{sum(1 for _ in mtp.named_parameters())}")


def _native(path: str) -> dict[str, Any]:
    """The plugin's native engine (``native.load_native``): our plan, then vLLM's classes built and filled from
    it; the timed part is the plan and the two ``load_class`` calls it records."""
    from vllm_deepseek_v4.loader import build_plan
    from vllm_deepseek_v4.native.session import load_native     # its modules imported untimed, as stock's are

    c_plan, t0 = time.process_time(), time.perf_counter()
    plan = build_plan(path)
    t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c_plan
    res = load_native(path, device="cpu", plan=plan)
    rt, rm = res.reports["target"], res.reports["mtp"]
    load_s = res.load_s["target"] + res.load_s["mtp"]
    return dict(seconds=load_s + t_plan, cpu_s=sum(res.load_cpu_s.values()) + c_plan, plan_s=t_plan,
                excl_plan_s=load_s, target_s=res.load_s["target"], mtp_s=res.load_s["mtp"], ok=res.ok,
                target_loaded=f"{rt.covered}/{rt.params}", mtp_loaded=f"{rm.covered}/{rm.params}")


def measure(mode: str, path: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{mode} child failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--keep", help="write (or reuse) the artifact here instead of a temp dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/native_load"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0

    from vllm_deepseek_v4.devtools import records

    with tempfile.TemporaryDirectory(prefix="native_load_") as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "artifact"
        if (path / "config.json").is_file():
            size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
            info = {"bytes": size, "shards": len(list(path.glob("*.safetensors")))}
        else:
            t0 = time.perf_counter()
            info = write_artifact(path)
            print(f"wrote {info['bytes'] / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        for p in path.glob("*.safetensors"):               # warm the page cache
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        runs: dict[str, list[dict[str, Any]]] = {"stock": [], "native": []}
        for i in range(args.rounds):
            for mode in ("stock", "native"):
                runs[mode].append(measure(mode, path))
                print(f"round {i}: {mode} {runs[mode][-1]['seconds']:.2f} s "
                      f"(peak {runs[mode][-1]['peak_rss_mb']} MB)", flush=True)
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    med_excl = statistics.median(r["excl_plan_s"] for r in runs["native"])
    ratio = med["native"] / med["stock"]
    med_cpu = {m: statistics.median(r["cpu_s"] for r in rs) for m, rs in runs.items()}
    ratio_cpu = med_cpu["native"] / med_cpu["stock"]
    rows = []
    for mode, rs in runs.items():
        r0 = rs[0]
        rows.append({"mode": mode, "median_s": round(med[mode], 3), "runs_s": [round(r["seconds"], 3) for r in rs],
                     "cpu_s": round(med_cpu[mode], 3),
                     "target_s": round(statistics.median(r["target_s"] for r in rs), 3),
                     "mtp_s": round(statistics.median(r["mtp_s"] for r in rs), 3),
                     "plan_s": round(statistics.median(r["plan_s"] for r in rs), 3) if mode == "native" else "",
                     "target_loaded": r0["target_loaded"], "mtp_loaded": r0["mtp_loaded"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "ok": r0.get("ok", "")})
    meta = records.meta()
    meta.update(artifact={"format": "upstream BF16", "scale": SCALE, **info}, rounds=args.rounds,
                ratio_native_over_stock=round(ratio, 3), ratio_excl_plan=round(med_excl / med["stock"], 3),
                ratio_cpu=round(ratio_cpu, 3), target_ratio=1.1,
                value_checks=os.environ.get("DSV4_SKIP_VALUE_CHECKS") != "1")
    records.write(args.out, meta, rows, ["mode", "median_s", "runs_s", "cpu_s", "target_s", "mtp_s", "plan_s",
                                         "target_loaded", "mtp_loaded", "peak_rss_mb", "ok"],
                  "Native vs stock load_weights of vLLM's DeepSeek-V4 target + MTP")
    with open(args.out + ".md", "a") as fh:
        fh.write(f"\nArtifact: upstream BF16, {info['bytes'] / 1e9:.2f} GB, {info['shards']} shards "
                 f"(vLLM geometry scaled: {SCALE}). Ratio native / stock (medians of {args.rounds}): "
                 f"**{ratio:.3f}** (plan included; {med_excl / med['stock']:.3f} without the plan); target <= 1.1. "
                 f"CPU time (medians): **{ratio_cpu:.3f}**. The native loader checks values (non-finite, scale "
                 f"codes) while each tensor is in memory{'' if meta['value_checks'] else ' -- OFF in this run'}; "
                 "stock checks none.\n"
                 "Stock's draft `load_weights` iterates every shard again (as vLLM's default loader does for the "
                 "draft); the native draft reads only its own tensors. Stock's draft leaves `embed_tokens` and "
                 "`shared_head.head` unloaded (replaced by the target's at PP = 1); the native draft shares them.\n")
    print(f"native / stock = {ratio:.3f} (excl. plan {med_excl / med['stock']:.3f}, cpu {ratio_cpu:.3f})")
    return 0 if ratio <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
