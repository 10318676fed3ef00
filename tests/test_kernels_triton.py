"""Triton kernels against their torch references, the backend switch, and builds for Hopper.

The kernels (``kernels/moe_triton.py``, ``kernels/attention_triton.py``) must compute what ``moe_ref``,
``swiglu_expert_ref``, ``sink_attention_ref`` and ``sink_attention_indexed_ref`` compute, for every weight
format and both MoE paths. Inputs are random (never zeros), outputs and kernel scratch are NaN-poisoned before
each run, and the error is ``||out - ref|| / ||ref||`` against a per-dtype bound (``TOL``).

Where they run: on a CUDA machine in this process (bf16 added). On CPU they need Triton's interpreter, which
must be switched on before ``triton`` is imported; so :func:`test_kernels_under_the_interpreter` re-runs this
module in a subprocess with ``TRITON_INTERPRET=1`` and no other test module ever sees the interpreter. The
interpreter mishandles bf16 arithmetic (``docs/vllm-cpu.md`` §8), so CPU runs use fp32 and fp16 activations.
Shapes are tiny but uneven (cropped fp8 blocks, partial K chunks, partial head blocks) because the
interpreter pays per element.

Parent-process tests (no kernel execution here): tile layout helpers, the backend switch, compiling each kernel
for sm_90a with Triton's bundled ptxas (no spills; 16-byte weight loads in the decode GEMV), and the GPU
benchmark's ``--dry-run`` (its own subprocess in the interpreter).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vllm_deepseek_v4.errors import KernelUnsupportedError
from vllm_deepseek_v4.kernels import dispatch
from vllm_deepseek_v4.kernels.attention import sink_attention_indexed_ref, sink_attention_ref
from vllm_deepseek_v4.kernels.moe import moe_ref, swiglu_expert_ref
from vllm_deepseek_v4.kernels.moe_layout import align_pairs, build_tables, expert_tables
from vllm_deepseek_v4.model.moe import Expert
from vllm_deepseek_v4.quant.numerics import quantize

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
INTERPRET = dispatch.interpreting()
RUN_HERE = ON_GPU or INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
kernel_test = pytest.mark.skipif(not RUN_HERE, reason="runs in test_kernels_under_the_interpreter's subprocess")
parent_only = pytest.mark.skipif(INTERPRET, reason="needs a process without the interpreter")

# ||out - ref|| / ||ref|| bounds. fp32: both sides fp32, only summation order differs (seen ~3e-7).
# fp16: the reference rounds g, u, h and each expert's output to fp16 (2^-11 each), the kernel keeps fp32
# accumulators (seen <= 6e-4). bf16 (GPU only): the same roundings with 8-bit mantissas.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (scheme, quantize options): every on-disk variant the kernels decode
FORMATS = {
    "bf16": ("bf16", {}),
    "fp8-e8m0": ("fp8_block", {"scale_dtype": "e8m0"}),
    "fp8-f32": ("fp8_block", {"scale_dtype": "f32"}),
    "fp8-bf16": ("fp8_block", {"scale_dtype": "bf16"}),
    "mxfp4-deepseek": ("mxfp4", {"flavor": "deepseek"}),
    "mxfp4-ct": ("mxfp4", {"flavor": "compressed-tensors"}),
    "nvfp4-ct": ("nvfp4", {"flavor": "compressed-tensors"}),
    "nvfp4-modelopt": ("nvfp4", {"flavor": "modelopt"}),
}
FP16_FORMATS = ("bf16", "fp8-e8m0", "mxfp4-deepseek", "nvfp4-ct")   # fp16 only per scheme: interpreter time


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert bool(torch.isfinite(got).all()), "non-finite output: an element was not written (NaN poison) or blew up"
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.fixture
def poisoned_scratch():
    from vllm_deepseek_v4.kernels import attention_triton, moe_triton
    saved = moe_triton.POISON_SCRATCH, attention_triton.POISON_SCRATCH
    moe_triton.POISON_SCRATCH = attention_triton.POISON_SCRATCH = True
    yield
    moe_triton.POISON_SCRATCH, attention_triton.POISON_SCRATCH = saved


@pytest.fixture
def forced_triton():
    previous = dispatch.set_backend("triton")
    yield
    dispatch.set_backend(previous)


def set_weight(lin: nn.Module, w: torch.Tensor, scheme: str, opts: dict, dtype: torch.dtype) -> None:
    parts = quantize(scheme, w, dtype=dtype) if scheme == "bf16" else quantize(scheme, w, **opts)
    for role in [r for r in lin._roles if r not in parts]:
        lin._roles.remove(role)
        delattr(lin, role)
    for role, t in parts.items():
        lin.set_role(role, t.to(DEVICE))


def make_experts(fmt: str, n: int, dim: int, inter: int, dtype: torch.dtype, seed: int = 0) -> nn.ModuleList:
    """``n`` experts with random ``N(0, 1/in)`` weights stored in ``fmt`` (bf16 scheme: in ``dtype``)."""
    scheme, opts = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    experts = nn.ModuleList()
    for _ in range(n):
        ex = Expert(dim, inter, scheme, dtype=dtype)
        for name in ("w1", "w2", "w3"):
            lin = getattr(ex, name)
            w = torch.randn(lin.out_features, lin.in_features, generator=g) * lin.in_features ** -0.5
            set_weight(lin, w, scheme, opts, dtype)
        experts.append(ex)
    return experts


def routing(T: int, k: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.1
    return w.to(DEVICE), idx.to(DEVICE)


def _moe_cases() -> list:
    cases = []
    for fmt in FORMATS:
        for dtype in DTYPES:
            if dtype == torch.float16 and fmt not in FP16_FORMATS and not ON_GPU:
                continue
            for path in ("decode", "sorted"):
                cases.append(pytest.param(fmt, dtype, path, id=f"{fmt}-{str(dtype)[6:]}-{path}"))
    return cases


# ------------------------------------------------------------------------------------------------ fused MoE
@kernel_test
@pytest.mark.parametrize("fmt,dtype,path", _moe_cases())
def test_fused_moe_matches_reference(fmt: str, dtype: torch.dtype, path: str, poisoned_scratch) -> None:
    """Every format and path; shapes leave partial K chunks and cropped fp8 blocks (dense: D=176, I=48)."""
    from vllm_deepseek_v4.kernels.moe_triton import fused_moe
    dim, inter = (192, 64) if FORMATS[fmt][0] in ("mxfp4", "nvfp4") else (176, 48)
    experts = make_experts(fmt, 5, dim, inter, dtype)
    weights, indices = routing(4, 2, 5, seed=1)
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    want = moe_ref(x, weights, indices, experts, 0.7)               # limit 0.7: the clamps bind (|g|, |u| ~ 1)
    out = torch.full((4, dim), float("nan"), device=DEVICE)
    got = fused_moe(x, weights, indices, experts, 0.7, path=path, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(got, want) <= TOL[dtype]


@kernel_test
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4-deepseek"])
@pytest.mark.parametrize("path", ["decode", "sorted"])
def test_fused_moe_whole_chunks_and_no_clamp(fmt: str, path: str, poisoned_scratch) -> None:
    """K a multiple of the chunk (the mask-free loads the GPU configs use), limit 0 (no clamp), top-3."""
    from vllm_deepseek_v4.kernels.moe_triton import fused_moe
    dim, inter = (256, 128) if fmt.startswith("mxfp4") else (128, 64)
    experts = make_experts(fmt, 4, dim, inter, torch.float32, seed=3)
    weights, indices = routing(3, 3, 4, seed=4)
    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = fused_moe(x, weights, indices, experts, 0.0, path=path)
    assert rel_err(got, moe_ref(x, weights, indices, experts, 0.0)) <= TOL[torch.float32]


@kernel_test
@pytest.mark.parametrize("with_weight", [False, True])
def test_shared_expert_matches_reference(with_weight: bool, poisoned_scratch) -> None:
    from vllm_deepseek_v4.kernels.moe_triton import swiglu_expert
    expert = make_experts("fp8-e8m0", 1, 176, 48, torch.float32, seed=6)[0]
    x = torch.randn(3, 176, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    w = (torch.rand(3) + 0.5).to(DEVICE) if with_weight else None
    got = swiglu_expert(x, expert, w, 0.7)
    assert got.dtype == x.dtype
    assert rel_err(got, swiglu_expert_ref(x, expert, w, 0.7)) <= TOL[torch.float32]


@kernel_test
def test_dispatch_routes_forced_triton_and_refuses_w4a16(forced_triton, poisoned_scratch) -> None:
    experts = make_experts("mxfp4-deepseek", 3, 64, 32, torch.float32, seed=8)
    weights, indices = routing(2, 2, 3, seed=9)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    from vllm_deepseek_v4.kernels.moe_triton import fused_moe
    torch.testing.assert_close(dispatch.moe(x, weights, indices, experts, 1.0),
                               fused_moe(x, weights, indices, experts, 1.0), rtol=0, atol=0)
    w4 = nn.ModuleList([Expert(64, 32, "w4a16", dtype=torch.float32)])
    with pytest.raises(KernelUnsupportedError, match=r"^moe: expected inputs the Triton kernel handles, found expert "
                                                     r"scheme 'w4a16' .*set DSV4_KERNELS=auto"):
        dispatch.moe(x, weights[:, :1], torch.zeros_like(indices[:, :1]), w4, 1.0)


# ------------------------------------------------------------------------------------------------ attention
def _queries(B: int, S: int, H: int, d: int, N: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, d, generator=g).to(DEVICE, dtype)
    kv = torch.randn(B, N, d, generator=g).to(DEVICE, dtype)
    sink = (torch.randn(H, generator=g) * 2).to(DEVICE)
    return q, kv, sink


# (B, S, H, d, N, num_splits, mask batch): decode; verify (S = k + 1) with a batch-shared mask, a partial head
# block (H = 20 over blocks of 16), d not a power of two and split keys; split keys at d = 64
ATTN_CASES = {"decode": (2, 1, 4, 64, 40, None, 2), "verify-split": (1, 3, 20, 48, 50, 3, 1),
              "split": (2, 2, 4, 64, 70, 2, 2)}


@kernel_test
@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_sink_attention_matches_reference(case: str, dtype: torch.dtype, poisoned_scratch) -> None:
    from vllm_deepseek_v4.kernels.attention_triton import sink_attention, sink_attention_indexed
    B, S, H, d, N, splits, mb = ATTN_CASES[case]
    q, kv, sink = _queries(B, S, H, d, N, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(mb, S, N, generator=g) > 0.4
    mask[..., 0] = False                                          # a masked first key must not leak in
    mask = mask.to(DEVICE)
    want = sink_attention_ref(q, kv, mask, sink, d ** -0.5)
    out = torch.full_like(q, float("nan"))
    assert rel_err(sink_attention(q, kv, mask, sink, d ** -0.5, num_splits=splits, out=out), want) <= TOL[dtype]
    # the same key sets as shuffled index lists padded with -1
    K = int(mask.sum(-1).max()) + 5
    idx = torch.full((mb, S, K), -1, dtype=torch.int64)
    for b in range(mb):
        for s in range(S):
            pos = mask[b, s].nonzero().flatten().cpu()
            idx[b, s, torch.randperm(K, generator=g)[:pos.numel()]] = pos
    idx = idx.to(DEVICE)
    torch.testing.assert_close(sink_attention_indexed_ref(q, kv, idx, sink, d ** -0.5), want)
    got = sink_attention_indexed(q, kv, idx, sink, d ** -0.5, num_splits=splits)
    assert rel_err(got, want) <= TOL[dtype]


@kernel_test
def test_sink_attention_with_no_visible_key_is_zero(poisoned_scratch) -> None:
    """All keys masked: the sink takes the whole softmax mass and the output is 0 (no NaN from empty splits)."""
    from vllm_deepseek_v4.kernels.attention_triton import sink_attention
    q, kv, sink = _queries(1, 1, 4, 32, 40, torch.float32, seed=13)
    mask = torch.zeros(1, 1, 40, dtype=torch.bool, device=DEVICE)
    got = sink_attention(q, kv, mask, sink, 0.2, num_splits=2)
    assert bool(torch.isfinite(got).all()) and float(got.abs().max()) == 0.0


@kernel_test
def test_sink_attention_indexed_rejects_rows_past_the_cache() -> None:
    from vllm_deepseek_v4.kernels.attention_triton import sink_attention_indexed
    if ON_GPU:
        pytest.skip("on CUDA out-of-range rows are skipped in-kernel (a check would need a host sync)")
    q, kv, sink = _queries(1, 1, 4, 32, 10, torch.float32, seed=14)
    with pytest.raises(KernelUnsupportedError, match=r"^idx: expected key rows in \[-1, 10\), found \[-1, 10\]"):
        sink_attention_indexed(q, kv, torch.tensor([[[3, -1, 10]]]), sink, 0.2)


# ------------------------------------------------------------------------------------------------ the model
@kernel_test
def test_tiny_model_logits_match_with_triton_forced(forced_triton, poisoned_scratch, monkeypatch) -> None:
    """The tiny model (sliding, CSA and compressed layers, MTP) through the dispatch ops: Triton == torch.

    ``linear`` / ``grouped_linear`` have no Triton kernel (forcing them raises), so they stay on the reference.
    """
    from tiny import make_model
    from vllm_deepseek_v4.kernels.linear import grouped_linear_ref, linear_ref
    monkeypatch.setattr(dispatch, "linear", linear_ref)
    monkeypatch.setattr(dispatch, "grouped_linear", grouped_linear_ref)
    model = make_model(seed=0).to(DEVICE)
    g = torch.Generator().manual_seed(15)
    ids = torch.randint(0, 512, (1, 6), generator=g).to(DEVICE)
    nxt = torch.randint(0, 512, (1, 6), generator=g).to(DEVICE)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = model(ids)
        return logits, model.forward_mtp(hidden, nxt)[0]

    got = run()
    dispatch.set_backend("torch")
    want = run()
    for g_, w_ in zip(got, want):
        assert rel_err(g_, w_) <= 1e-4       # fp32 model; summation order differs in every layer


# ------------------------------------------------------------------------------------------------ no kernels run
def test_align_pairs_groups_every_pair_once_by_expert() -> None:
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3], [0, 1]])
    sorted_pairs, block_e = align_pairs(idx, 5, 4)
    P = idx.numel()
    assert sorted_pairs.shape[0] == block_e.shape[0] * 4
    real = sorted_pairs[sorted_pairs < P]
    assert sorted(real.tolist()) == list(range(P))
    for b, e in enumerate(block_e.tolist()):
        block = sorted_pairs[4 * b:4 * b + 4]
        members = block[block < P]
        if e < 0:
            assert members.numel() == 0
        else:
            assert members.numel() > 0 and bool((idx.flatten()[members.long()] == e).all())
    assert block_e.tolist()[:4] == [0, 1, 2, 3] and set(block_e.tolist()[4:]) == {-1}   # expert 4 unused


def test_expert_tables_are_cached_and_rebuilt_when_storage_moves() -> None:
    experts = make_experts("mxfp4-deepseek", 3, 64, 32, torch.float32)
    t1 = expert_tables(experts, DEVICE)
    assert expert_tables(experts, DEVICE) is t1
    assert t1.w13.weight_off.numel() == 6 and t1.w13.weight.dtype == torch.int32   # fp4 read as 32-bit words
    experts[0].w1.set_role("weight", experts[0].w1.weight.clone())
    t2 = expert_tables(experts, DEVICE)
    assert t2 is not t1 and t2.w13.weight.data_ptr() == experts[0].w1.weight.view(torch.int32).data_ptr()


def test_expert_tables_refuse_mixed_layouts() -> None:
    experts = make_experts("fp8-e8m0", 2, 176, 48, torch.float32)
    experts[1].w2.set_role("scale", experts[1].w2.scale.view(torch.uint8).float().div(2**7))   # f32 scales
    with pytest.raises(KernelUnsupportedError, match=r"^w2.scale of expert slot 1: expected torch.uint8 "):
        build_tables(experts, DEVICE)


@parent_only
def test_forcing_triton_on_cpu_needs_the_interpreter(forced_triton, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 64)
    experts = make_experts("bf16", 2, 64, 32, torch.float32)
    with pytest.raises(KernelUnsupportedError, match=r"^moe: expected CUDA inputs for the Triton backend, found cpu\. "
                                                     r"set DSV4_KERNELS=torch or auto on this device, or "
                                                     r"TRITON_INTERPRET=1"):
        dispatch.moe(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), experts, 1.0)


def test_auto_backend_keeps_cpu_tensors_on_the_reference() -> None:
    previous = dispatch.set_backend("auto")
    try:
        x = torch.randn(1, 1, 4, 16)
        args = (x, x[:, 0], torch.ones(1, 1, 1, dtype=torch.bool), torch.zeros(4), 0.25)
        assert dispatch._pick("sink_attention", sink_attention_ref, x, args) is sink_attention_ref
    finally:
        dispatch.set_backend(previous)


@parent_only
@pytest.mark.parametrize("fmt", ["bf16", "fp8-e8m0", "mxfp4-deepseek", "nvfp4-modelopt"])
def test_kernels_build_for_hopper(fmt: str) -> None:
    """Each launch the wrappers make at DSv4-Flash shapes, compiled for sm_90a (no GPU needed): no register
    spills, and the decode GEMV streams weights with 16-byte loads."""
    triton = pytest.importorskip("triton")   # the test extra installs it; skipping keeps a bare install honest
    if not triton.__version__.startswith("3.9."):
        pytest.skip(f"triton_aot.compile_launch follows triton 3.9's launch internals, found {triton.__version__}")
    from vllm_deepseek_v4.kernels import attention_triton, moe_triton
    from vllm_deepseek_v4.kernels.triton_aot import compile_launch, recording
    scheme = FORMATS[fmt][0]
    experts = nn.ModuleList(Expert(4096, 2048, scheme, dtype=torch.bfloat16) for _ in range(2))
    fmt_code = build_tables(experts, torch.device("cpu")).w13.fmt
    with recording() as launches:
        for T, path in ((1, "decode"), (64, "sorted")):
            x = torch.randn(T, 4096, dtype=torch.bfloat16)
            cfg = moe_triton.moe_config(path, fmt_code, T * 6 / 256, on_gpu=True)
            moe_triton.fused_moe(x, torch.rand(T, 6), torch.randint(0, 2, (T, 6)), experts, 10.0, path=path,
                                 config=cfg)
        if fmt == "bf16":
            q = torch.randn(2, 2, 64, 512, dtype=torch.bfloat16)
            kv = torch.randn(2, 640, 512, dtype=torch.bfloat16)
            attention_triton.sink_attention_indexed(q, kv, torch.randint(0, 640, (2, 2, 640)), torch.zeros(64),
                                                    0.04, num_splits=4,
                                                    config=attention_triton.attention_config(64, 512, True))
    assert len(launches) == (6 if fmt == "bf16" else 4)
    for rec in launches:
        report = compile_launch(rec, arch=90)
        assert report.spill_bytes == 0 and report.stack_bytes == 0, report.row()
        if rec.name in ("_gate_up_gemv", "_down_gemv"):
            assert report.sass["ldg_128"] > 0, report.row()


@parent_only
def test_benchmark_dry_run_checks_every_format() -> None:
    """``benchmarks/kernels.py --dry-run``: the GPU benchmark's own input builders and correctness pre-checks,
    in the interpreter at tiny shapes, so the script cannot rot while no GPU is around."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV4_KERNELS")}
    proc = subprocess.run([sys.executable, "benchmarks/kernels.py", "--dry-run",
                           "--formats", "bf16,fp8_block,mxfp4,nvfp4,nvfp4-modelopt"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all 26 correctness checks passed" in proc.stdout, proc.stdout[-4000:]


# ------------------------------------------------------------------------------------------------ driver
@pytest.mark.skipif(RUN_HERE, reason="the kernels run in this process")
def test_kernels_under_the_interpreter() -> None:
    """Run this module's kernel tests in Triton's CPU interpreter (a subprocess, so nothing else sees it)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("DSV4_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 40, tail     # the kernel tests really ran
    assert re.search(r"\d+ (failed|error)", proc.stdout) is None, tail
