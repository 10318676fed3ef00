"""Triton kernels at DSv4-Flash MTP shapes: time, achieved bandwidth vs this GPU's copy bandwidth, speedup.

Fused MoE (D=4096, I=2048, 256 experts, top-6, plus the shared expert) for each weight format, and sink
attention (64 heads, d=512, one K=V latent; MTP window of 128 keys, and window 128 + 512 compressed picks) for
B in {1, 2, 4, 8, 16, 64} tokens / sequences. Every row first checks the kernel against the torch reference
on the same inputs (bf16 bound 2e-2) and times both with ``triton.testing.do_bench`` (median, p20/p80;
L2 flushed before each run). Bandwidth counts the bytes a kernel must move at least: the weights (+scales)
of every distinct expert touched, or every distinct KV row read, plus activations in and out; it is
compared with a device-to-device copy measured in the same run (bytes read + written). Targets:
MoE >= 70% (mxfp4, nvfp4) / >= 80% (bf16, fp8) of copy bandwidth at B <= 16 and >= 3x the reference;
attention decode >= 60%.

  python benchmarks/kernels.py                       # NVIDIA GPU: writes benchmarks/results/kernels.{json,md}
  python benchmarks/kernels.py --dry-run             # CPU: Triton interpreter, tiny shapes, correctness only
  python benchmarks/kernels.py --compile-only        # CPU: build every launch for sm_90a, registers/spills/loads
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if "--dry-run" in sys.argv:                  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vllm_deepseek_v4.devtools.records import meta, write  # noqa: E402

FLASH = {"D": 4096, "I": 2048, "E": 256, "k": 6, "H": 64, "d": 512, "window": 128, "topk": 512, "compressed": 2048}
TINY = {"D": 256, "I": 128, "E": 8, "k": 2, "H": 4, "d": 64, "window": 8, "topk": 8, "compressed": 24}
FORMATS = {"bf16": ("bf16", None), "fp8_block": ("fp8_block", None), "mxfp4": ("mxfp4", None),
           "nvfp4": ("nvfp4", "compressed-tensors"), "nvfp4-modelopt": ("nvfp4", "modelopt")}
TARGET = {"bf16": 0.8, "fp8_block": 0.8, "mxfp4": 0.7, "nvfp4": 0.7, "nvfp4-modelopt": 0.7, "attention": 0.6}
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
COLUMNS = ["op", "format", "B", "path", "median_us", "p20_us", "p80_us", "MB", "GBps", "of_copy_bw", "target",
           "ref_us", "speedup", "rel_err"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, correctness checks only")
    p.add_argument("--compile-only", action="store_true", help="build every launch for sm_90a, no GPU needed")
    p.add_argument("--formats", default="bf16,fp8_block,mxfp4,nvfp4", help=f"subset of {','.join(FORMATS)}")
    p.add_argument("--batches", default="1,2,4,8,16,64")
    p.add_argument("--no-ref", action="store_true", help="skip timing the torch reference")
    p.add_argument("--sweep", action="store_true", help="also try a few decode GEMV tilings at B=1")
    p.add_argument("--out", default="", help="output prefix (GPU default benchmarks/results/kernels)")


# %% inputs ---------------------------------------------------------------------------------------------------
def _pow2_byte(std: float, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """e8m0 bytes around ``std`` (+-1 octave, random): no zeros, no NaN."""
    centre = 127 + round(math.log2(std))
    return torch.randint(centre - 1, centre + 2, shape, generator=gen, device=gen.device,
                         dtype=torch.int32).to(torch.uint8)


def fill_random(lin: nn.Module, scheme: str, flavor: str | None, gen: torch.Generator) -> None:
    """Random, valid on-disk roles for ``lin`` with weights of std ~ in^-1/2 (never zeros); drawn on the
    generator's device (768 matrices per format: the CPU would take minutes of GPU lease)."""
    o, i, dev = lin.out_features, lin.in_features, gen.device
    std = i ** -0.5
    if scheme == "bf16":
        lin.weight.copy_(torch.randn(o, i, generator=gen, device=dev).mul_(std))
    elif scheme == "fp8_block":
        lin.weight.copy_(torch.randn(o, i, generator=gen, device=dev).mul_(64).to(torch.float8_e4m3fn))
        lin.scale.view(torch.uint8).copy_(_pow2_byte(std / 64, gen, tuple(lin.scale.shape)))
    else:
        codes = torch.randint(0, 256, (o, i // 2), generator=gen, device=dev, dtype=torch.int32).to(torch.uint8)
        lin.weight.view(torch.uint8).copy_(codes)
        if scheme == "mxfp4":
            lin.scale.view(torch.uint8).copy_(_pow2_byte(std / 2.5, gen, tuple(lin.scale.shape)))
        else:
            g = 1.0 / std                                                      # global: local / g ~ std / 2.5
            local = torch.rand(o, i // 16, generator=gen, device=dev).mul_(1.5).add_(0.5).mul_(g * std / 2.5)
            lin.weight_scale.copy_(local.to(torch.float8_e4m3fn))
            if flavor == "modelopt":
                lin.set_role("weight_scale_2", torch.tensor(1.0 / g, device=dev))
            else:
                lin.weight_global_scale.fill_(g)


def make_experts(fmt: str, n: int, D: int, I: int, device: torch.device, seed: int = 0) -> nn.ModuleList:
    from vllm_deepseek_v4.model.moe import Expert
    scheme, flavor = FORMATS[fmt]
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device), torch.no_grad():
        experts = nn.ModuleList(Expert(D, I, scheme, dtype=torch.bfloat16) for _ in range(n))
        for ex in experts:
            for lin in (ex.w1, ex.w2, ex.w3):
                fill_random(lin, scheme, flavor, gen)
    return experts


def expert_bytes(expert: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for lin in (expert.w1, expert.w2, expert.w3) for t in lin.parts().values())


# %% measurement ------------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not bool(torch.isfinite(got).all()):
        return float("nan")
    return float((got.float() - want.float()).norm() / want.float().norm())


def bench(fn, gpu: bool, quick: bool = False) -> dict[str, float] | None:
    """Median and p20/p80 in microseconds (``do_bench``: events, L2 flushed per run); None off the GPU."""
    if not gpu:
        return None
    from triton.testing import do_bench
    p50, p20, p80 = do_bench(fn, warmup=5 if quick else 25, rep=30 if quick else 200, quantiles=[0.5, 0.2, 0.8])
    return {"median_us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(256 * 2**20, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), True)
    return 2 * src.numel() * 4 / (t["median_us"] * 1e-6) / 1e9


def _row(op: str, fmt: str, B: int, path: str, t: dict | None, nbytes: int, copy_bw: float | None,
         t_ref: dict | None, err: float, target: float) -> dict:
    row = {"op": op, "format": fmt, "B": B, "path": path, "MB": nbytes / 1e6, "rel_err": err, "target": target}
    if t is not None:
        gbps = nbytes / (t["median_us"] * 1e-6) / 1e9
        row.update(t, GBps=gbps, of_copy_bw=gbps / copy_bw if copy_bw else float("nan"))
    if t is not None and t_ref is not None:
        row.update(ref_us=t_ref["median_us"], speedup=t_ref["median_us"] / t["median_us"])
    return row


def moe_rows(fmt: str, shapes: dict, batches: list[int], device: torch.device, dtype: torch.dtype,
             copy_bw: float | None, args: argparse.Namespace) -> list[dict]:
    from vllm_deepseek_v4.kernels.moe import moe_ref, swiglu_expert_ref
    from vllm_deepseek_v4.kernels.moe_triton import DECODE_MAX_TOKENS, fused_moe, swiglu_expert
    gpu = device.type == "cuda"
    D, I, E, k = shapes["D"], shapes["I"], shapes["E"], shapes["k"]
    experts = make_experts(fmt, E, D, I, device)
    shared = make_experts(fmt, 1, D, I, device, seed=1)[0]
    per_expert = expert_bytes(experts[0])
    gen = torch.Generator().manual_seed(2)
    rows = []
    for B in batches:
        x = torch.randn(B, D, generator=gen).to(device, dtype)
        ids = torch.rand(B, E, generator=gen).topk(k, dim=-1).indices.to(device)
        w = (torch.rand(B, k, generator=gen) + 0.1).to(device)
        path = "decode" if B <= DECODE_MAX_TOKENS else "sorted"
        act = B * D * (x.element_size() + 4)                                 # x in, fp32 out
        touched = int(torch.unique(ids).numel())
        got, want = fused_moe(x, w, ids, experts, 10.0), moe_ref(x, w, ids, experts, 10.0)
        ok_err = rel_err(got, want)
        t = bench(lambda: fused_moe(x, w, ids, experts, 10.0), gpu)
        t_ref = None if args.no_ref else bench(lambda: moe_ref(x, w, ids, experts, 10.0), gpu, quick=True)
        rows.append(_row(f"moe top-{k}/{E}", fmt, B, path, t, touched * per_expert + act, copy_bw, t_ref, ok_err,
                         TARGET[fmt]))
        got, want = swiglu_expert(x, shared, None, 10.0), swiglu_expert_ref(x, shared, None, 10.0)
        t = bench(lambda: swiglu_expert(x, shared, None, 10.0), gpu)
        t_ref = None if args.no_ref else bench(lambda: swiglu_expert_ref(x, shared, None, 10.0), gpu, quick=True)
        rows.append(_row("shared expert", fmt, B, path, t, per_expert + act, copy_bw, t_ref, rel_err(got, want),
                         TARGET[fmt]))
    if args.sweep and gpu:
        rows += sweep_rows(fmt, experts, per_expert, D, E, k, device, dtype, copy_bw)
    return rows


def sweep_rows(fmt: str, experts: nn.ModuleList, per_expert: int, D: int, E: int, k: int, device: torch.device,
               dtype: torch.dtype, copy_bw: float | None) -> list[dict]:
    """Decode GEMV tilings at B=1 (first-GPU tuning aid; the default config is moe_config's)."""
    from vllm_deepseek_v4.kernels.moe_triton import fused_moe
    x = torch.randn(1, D, device=device, dtype=dtype)
    ids = torch.randperm(E, device=device)[:k][None]
    w = torch.rand(1, k, device=device)
    fp4 = fmt.startswith(("mxfp4", "nvfp4"))
    rows = []
    for bn in (16, 32, 64):
        for chunk in ((128, 256, 512) if fp4 else (64, 128)):
            for warps in (2, 4, 8):
                cfg = {"BN": bn, "CHUNK": chunk, "num_warps": warps, "num_stages": 2}
                t = bench(lambda: fused_moe(x, w, ids, experts, 10.0, path="decode", config=cfg), True, quick=True)
                rows.append(_row("moe sweep", fmt, 1, f"BN{bn} C{chunk} w{warps}", t, k * per_expert + D * 6,
                                 copy_bw, None, float("nan"), TARGET[fmt]))
    return rows


def attention_rows(shapes: dict, batches: list[int], device: torch.device, dtype: torch.dtype,
                   copy_bw: float | None, args: argparse.Namespace) -> list[dict]:
    """Index-list attention (the runtime's form): per sequence a KV buffer of window + compressed rows."""
    from vllm_deepseek_v4.kernels.attention import sink_attention_indexed_ref
    from vllm_deepseek_v4.kernels.attention_triton import sink_attention_indexed
    gpu = device.type == "cuda"
    H, d, win, topk, comp = shapes["H"], shapes["d"], shapes["window"], shapes["topk"], shapes["compressed"]
    gen = torch.Generator().manual_seed(3)
    rows = []
    for label, S, picks in (("mtp window", 1, 0), ("window+topk", 1, topk), ("verify window+topk", 4, topk)):
        for B in batches:
            n_rows = win + (comp if picks else 0)
            kv = torch.randn(B, n_rows, d, generator=gen).to(device, dtype)
            q = torch.randn(B, S, H, d, generator=gen).to(device, dtype)
            sink = torch.randn(H, generator=gen).to(device)
            window = torch.arange(win).expand(B, S, win)
            sel = [window]
            if picks:
                sel.append(win + torch.rand(B, 1, comp, generator=gen).topk(picks, dim=-1).indices.expand(B, S, picks))
            idx = torch.cat(sel, dim=-1).to(device)
            rows_read = B * (win + picks)                                 # the S queries share their rows
            nbytes = rows_read * d * kv.element_size() + 2 * q.numel() * q.element_size() + idx.numel() * 4
            got = sink_attention_indexed(q, kv, idx, sink, d ** -0.5)
            err = rel_err(got, sink_attention_indexed_ref(q, kv, idx, sink, d ** -0.5))
            t = bench(lambda: sink_attention_indexed(q, kv, idx, sink, d ** -0.5), gpu)
            t_ref = None if args.no_ref else bench(lambda: sink_attention_indexed_ref(q, kv, idx, sink, d ** -0.5),
                                                   gpu, quick=True)
            rows.append(_row(f"attention {label}", "bf16" if dtype == torch.bfloat16 else str(dtype)[6:], B,
                             f"S={S}", t, nbytes, copy_bw, t_ref, err, TARGET["attention"]))
    return rows


# %% modes --------------------------------------------------------------------------------------------------------
def compile_rows(args: argparse.Namespace) -> list[dict]:
    """Every launch the benchmark makes on a GPU, built here for sm_90a (experts left uninitialised)."""
    from vllm_deepseek_v4.kernels import attention_triton, moe_triton
    from vllm_deepseek_v4.kernels.moe_layout import build_tables
    from vllm_deepseek_v4.kernels.triton_aot import compile_launch, recording
    from vllm_deepseek_v4.model.moe import Expert
    D, I = FLASH["D"], FLASH["I"]
    rows = []
    for fmt in args.formats.split(","):
        scheme, flavor = FORMATS[fmt]
        experts = nn.ModuleList(Expert(D, I, scheme, dtype=torch.bfloat16) for _ in range(2))
        if flavor == "modelopt":
            for ex in experts:
                for lin in (ex.w1, ex.w2, ex.w3):
                    lin.set_role("weight_scale_2", torch.ones(()))
        code = build_tables(experts, torch.device("cpu")).w13.fmt
        for B, path in ((1, "decode"), (64, "sorted")):
            cfg = moe_triton.moe_config(path, code, B * FLASH["k"] / FLASH["E"], on_gpu=True)
            with recording() as launches:
                moe_triton.fused_moe(torch.randn(B, D, dtype=torch.bfloat16), torch.rand(B, 6),
                                     torch.randint(0, 2, (B, 6)), experts, 10.0, path=path, config=cfg)
            rows += [{"format": fmt, "path": path, **compile_launch(r).row(), **cfg} for r in launches]
    q = torch.randn(2, 1, FLASH["H"], FLASH["d"], dtype=torch.bfloat16)
    kv = torch.randn(2, 640, FLASH["d"], dtype=torch.bfloat16)
    cfg = attention_triton.attention_config(FLASH["H"], FLASH["d"], on_gpu=True)
    with recording() as launches:
        attention_triton.sink_attention_indexed(q, kv, torch.randint(0, 640, (2, 1, 640)), torch.zeros(FLASH["H"]),
                                                0.04, num_splits=4, config=cfg)
    rows += [{"format": "bf16", "path": "attention", **compile_launch(r).row(), **cfg} for r in launches]
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    batches = [int(b) for b in args.batches.split(",")]
    if args.dry_run:
        device, dtype, shapes, batches = torch.device("cpu"), torch.float32, TINY, [1, 20]
        info = {"device": "Triton interpreter on CPU (dry run: correctness only, no timing)"}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --dry-run (interpreter) or --compile-only on this machine")
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, FLASH
        props = torch.cuda.get_device_properties(device)
        info = {"device": f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"}
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    info["copy_GBps"] = copy_bw
    rows = []
    for fmt in args.formats.split(","):
        rows += moe_rows(fmt, shapes, batches, device, dtype, copy_bw, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += attention_rows(shapes, batches, device, dtype, copy_bw, args)
    return rows, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    args = p.parse_args()
    import triton
    m = {**meta(), "torch": torch.__version__, "triton": triton.__version__}
    if args.compile_only:
        rows = compile_rows(args)
        m["machine"] = f"static build for sm_90a on {m['machine']} (no GPU; nothing timed)"
        cols = ["format", "path", "kernel", "registers", "spill_bytes", "shared_bytes", "ldg_128", "ldgsts",
                "ldg_narrow", "mma", "wgmma", "total", "BN", "CHUNK", "BM", "BH", "num_warps", "num_stages"]
        out = args.out or "benchmarks/results/kernels_build_sm90"
        write(out, m, rows, cols, "Triton kernels built for sm_90a (registers, spills, load widths)")
        print(open(out + ".md").read())
        return
    rows, info = run(args)
    bad = [r for r in rows if not r["op"].startswith("moe sweep")
           and not (r["rel_err"] <= TOL[torch.float32 if args.dry_run else torch.bfloat16])]
    m.update(info, machine=f"{info['device']}; host {m['machine']}")
    if info.get("copy_GBps"):
        m["machine"] += f"; measured d2d copy {info['copy_GBps']:.0f} GB/s"
    out = args.out or ("" if args.dry_run else "benchmarks/results/kernels")
    if out:
        write(out, m, rows, COLUMNS, "Triton kernels at DSv4-Flash MTP shapes vs the torch reference")
    for r in rows:
        print("  ".join(f"{c}={r[c]:.4g}" if isinstance(r.get(c), float) else f"{c}={r.get(c, '')}"
                        for c in COLUMNS if c in r))
    if bad:
        raise SystemExit(f"{len(bad)} rows failed the correctness check: {[(r['op'], r['format'], r['B']) for r in bad]}")
    print(f"all {len(rows)} correctness checks passed" + (f"; wrote {out}.json / .md" if out else ""))


if __name__ == "__main__":
    main()
