"""Fused MoE in Triton: clamped SwiGLU experts over weights in their on-disk format (``docs/dsv4-architecture.md §8``).

``fused_moe`` computes what :func:`kernels.moe.moe_ref` computes, in two launches, reading every weight byte
of a touched expert once per launch and dequantising it in registers (``dequant_triton.wtile``):

1. gate/up: ``h[p] = w_p * silu(min(w1 x_t, limit)) * clamp(w3 x_t, +-limit)`` for every pair ``p = (t, slot)``
   (``w1`` and ``w3`` rows stream side by side; ``h`` is stored in the activation dtype, as the reference
   casts it before ``w2``);
2. down: ``y[p] = w2_e h[p]`` per pair in fp32, then ``y_t = sum_slot y[p]``.

Two paths:

- **decode** (``T <= DECODE_MAX_TOKENS``): one program per (pair, row block) in both launches, no sorting
  (a weight tile two tokens share is read twice, mostly from L2). Products are fp32 FMAs into a register
  accumulator reduced once at the end (GEMV: the tensor cores would idle at M = 1). At ``T = 1`` that is
  ``6 * I / BN`` gate/up and ``6 * D / BN`` down programs (384 and 768 for Flash fp4): enough bytes in flight
  to fill an H100/H200 without split-K. One ``sum`` adds a token's ``k`` down rows (deterministic, unlike
  atomics).
- **sorted** (prefill, multi-token verify): pairs are sorted by expert and padded to ``BM``
  (``moe_layout.align_pairs``, on device); a program multiplies one expert tile with ``BM`` tokens on the
  tensor cores (``tl.dot``) and writes per-pair rows that one ``sum`` over the slots reduces.

Expert weights are found through per-expert offset tables (``moe_layout``); nothing is stacked or copied.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from ..errors import KernelUnsupportedError
from .dequant_triton import FMT_MXFP4, dot_chunk, expert_ptrs, gemv_chunk, swiglu
from .moe_layout import ExpertTables, ProjTable, align_pairs, expert_tables, unsupported_experts
from .triton_aot import launch

__all__ = ["fused_moe", "swiglu_expert", "unsupported_moe", "unsupported_swiglu_expert", "moe_config",
           "DECODE_MAX_TOKENS"]

DECODE_MAX_TOKENS = 16          # above this, sorting by expert saves more weight reads than it costs
POISON_SCRATCH = False          # tests: fill intermediates with NaN so an unwritten element shows up
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# %% kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _gate_up_gemv(X, stride_x, IDS, WTS, H, stride_h, TOPK, N_OUT, K_IN, E,
                  W, W_OFF, S, S_OFF, G, G_OFF, stride_w, stride_s, limit,
                  HAS_LIMIT: tl.constexpr, FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr,
                  ALIGN: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, ACC_W: tl.constexpr,
                  EVEN_K: tl.constexpr, H_ROUND: tl.constexpr):
    """One pair ``p`` (program 0) x ``BN`` intermediate rows (program 1): ``h[p, rows]``.

    ``X`` and ``H`` are fp32 (no conversion per load); ``h`` is rounded through ``H_ROUND`` (the activation
    dtype) first, as the reference casts it before ``w2``.
    """
    p = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < N_OUT
    e = tl.load(IDS + p)
    w1, s1, g1 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, e, FMT, ALIGN)
    w3, s3, g3 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, E + e, FMT, ALIGN)
    x_row = X + (p // TOPK) * stride_x
    acc_g = tl.zeros((BN, ACC_W), tl.float32)
    acc_u = tl.zeros((BN, ACC_W), tl.float32)
    for k0 in range(0, K_IN, CHUNK):
        acc_g += gemv_chunk(w1, s1, g1, rows, row_ok, k0, K_IN, x_row, stride_w, stride_s, FMT, SKIND, GROUP, BN,
                            CHUNK, EVEN_K)
        acc_u += gemv_chunk(w3, s3, g3, rows, row_ok, k0, K_IN, x_row, stride_w, stride_s, FMT, SKIND, GROUP, BN,
                            CHUNK, EVEN_K)
    h = swiglu(tl.sum(acc_g, 1), tl.sum(acc_u, 1), tl.load(WTS + p), limit, HAS_LIMIT)
    tl.store(H + p * stride_h + rows, h.to(H_ROUND).to(tl.float32), mask=row_ok)   # fp32 holding x-dtype values


@triton.jit
def _down_gemv(H, stride_h, IDS, OUT, stride_o, N_OUT, K_IN,
               W, W_OFF, S, S_OFF, G, G_OFF, stride_w, stride_s,
               FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, ALIGN: tl.constexpr,
               BN: tl.constexpr, CHUNK: tl.constexpr, ACC_W: tl.constexpr, EVEN_K: tl.constexpr):
    """One pair ``p`` (program 0) x ``BN`` output rows (program 1) -> fp32 ``OUT[p, rows]``.

    Pair-parallel rather than token-parallel: at ``T = 1`` that is ``k * D / BN`` programs (768 for Flash),
    enough bytes in flight per SM; the caller sums the ``k`` rows of a token.
    """
    p = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < N_OUT
    w2, s2, g2 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, tl.load(IDS + p), FMT, ALIGN)
    h_row = H + p * stride_h
    acc = tl.zeros((BN, ACC_W), tl.float32)
    for k0 in range(0, K_IN, CHUNK):
        acc += gemv_chunk(w2, s2, g2, rows, row_ok, k0, K_IN, h_row, stride_w, stride_s, FMT, SKIND, GROUP, BN,
                          CHUNK, EVEN_K)
    tl.store(OUT + p * stride_o + rows, tl.sum(acc, 1), mask=row_ok)


@triton.jit
def _gate_up_sorted(X, stride_x, SORTED, BLOCK_E, WTS, H, stride_h, TOPK, P, N_OUT, K_IN, E,
                    W, W_OFF, S, S_OFF, G, G_OFF, stride_w, stride_s, limit,
                    HAS_LIMIT: tl.constexpr, FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr,
                    ALIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr,
                    EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """``BM`` sorted pairs of one expert (program 0) x ``BN`` intermediate rows (program 1)."""
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_E + pid_m)
    if e < 0:
        return
    pairs = tl.load(SORTED + pid_m * BM + tl.arange(0, BM))
    pair_ok = pairs < P
    x_rows = X + (pairs // TOPK)[:, None] * stride_x
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < N_OUT
    w1, s1, g1 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, e, FMT, ALIGN)
    w3, s3, g3 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, E + e, FMT, ALIGN)
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K_IN, CHUNK):
        acc_g = dot_chunk(acc_g, w1, s1, g1, rows, row_ok, k0, K_IN, x_rows, pair_ok, stride_w, stride_s, FMT,
                          SKIND, GROUP, BN, CHUNK, EVEN_K, PREC)
        acc_u = dot_chunk(acc_u, w3, s3, g3, rows, row_ok, k0, K_IN, x_rows, pair_ok, stride_w, stride_s, FMT,
                          SKIND, GROUP, BN, CHUNK, EVEN_K, PREC)
    route = tl.load(WTS + pairs, mask=pair_ok, other=0)[:, None]
    h = swiglu(acc_g, acc_u, route, limit, HAS_LIMIT)
    tl.store(H + pairs[:, None] * stride_h + rows[None, :], h.to(H.dtype.element_ty),
             mask=pair_ok[:, None] & row_ok[None, :])


@triton.jit
def _down_sorted(H, stride_h, SORTED, BLOCK_E, OUT, stride_o, P, N_OUT, K_IN,
                 W, W_OFF, S, S_OFF, G, G_OFF, stride_w, stride_s,
                 FMT: tl.constexpr, SKIND: tl.constexpr, GROUP: tl.constexpr, ALIGN: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, EVEN_K: tl.constexpr,
                 PREC: tl.constexpr):
    """``BM`` sorted pairs of one expert x ``BN`` output rows -> per-pair fp32 rows ``OUT[pair]``."""
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_E + pid_m)
    if e < 0:
        return
    pairs = tl.load(SORTED + pid_m * BM + tl.arange(0, BM))
    pair_ok = pairs < P
    h_rows = H + pairs[:, None] * stride_h
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = rows < N_OUT
    w2, s2, g2 = expert_ptrs(W, W_OFF, S, S_OFF, G, G_OFF, e, FMT, ALIGN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K_IN, CHUNK):
        acc = dot_chunk(acc, w2, s2, g2, rows, row_ok, k0, K_IN, h_rows, pair_ok, stride_w, stride_s, FMT, SKIND,
                        GROUP, BN, CHUNK, EVEN_K, PREC)
    tl.store(OUT + pairs[:, None] * stride_o + rows[None, :], acc, mask=pair_ok[:, None] & row_ok[None, :])


# %% launch -------------------------------------------------------------------------------------------------
def _table_args(t: ProjTable) -> tuple[Any, ...]:
    return (t.weight, t.weight_off, t.scale, t.scale_off, t.glob, t.glob_off, t.weight_stride, t.scale_stride)


def _table_meta(t: ProjTable) -> dict[str, int]:
    return {"FMT": t.fmt, "SKIND": t.skind, "GROUP": max(t.group, 1), "ALIGN": t.align}


def moe_config(path: str, fmt: int, tokens_per_expert: float, on_gpu: bool, fp32: bool = False) -> dict[str, int]:
    """Tile sizes per path. ``CHUNK`` input columns per loop step: fp8 needs it to divide 128 (one block scale
    per row per step), fp4 a multiple of 128 (16+ words per row for the dot's K). The interpreter pays per
    program more than per element: few, small-K programs."""
    fp4 = fmt >= FMT_MXFP4
    if not on_gpu:
        return {"BM": 16, "BN": 32, "CHUNK": 128 if fp4 else 32, "num_warps": 4, "num_stages": 1}
    if path == "decode":   # GEMV: one 16-byte load per thread per tile per step (128 B .. 256 B per row)
        return {"BN": 32 if fp4 else 16, "CHUNK": 256 if fp4 else 128, "num_warps": 4, "num_stages": 2}
    if fp32:   # ieee fp32 dots run on the FMA units: small tiles or the fp4 decode spills
        return {"BM": 16, "BN": 32, "CHUNK": 128, "num_warps": 4, "num_stages": 2}
    bm = 16 if tokens_per_expert <= 16 else (32 if tokens_per_expert <= 32 else 64)
    return {"BM": bm, "BN": 64, "CHUNK": 128, "num_warps": 4, "num_stages": 3}


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _unsupported_x(x: torch.Tensor, experts: Sequence[Any]) -> str | None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        return f"x {x.dtype} {list(x.shape)} (expected 2-D float32 | float16 | bfloat16)"
    reason = unsupported_experts(experts)
    if reason is None and experts[0].w1.in_features != x.shape[1]:
        reason = f"experts take {experts[0].w1.in_features} inputs, x has {x.shape[1]}"
    return reason


def unsupported_moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[Any],
                    limit: float) -> str | None:
    """Why :func:`fused_moe` cannot take these inputs (None when it can); no device work."""
    if indices.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        return f"indices {list(indices.shape)} / weights {list(weights.shape)} for x {list(x.shape)}"
    if indices.is_floating_point() or indices.is_complex():
        return f"indices of dtype {indices.dtype}"
    return _unsupported_x(x, experts)


def unsupported_swiglu_expert(x: torch.Tensor, expert: Any, weight: torch.Tensor | None, limit: float) -> str | None:
    """Why :func:`swiglu_expert` cannot take these inputs (None when it can)."""
    if weight is not None and weight.numel() != x.shape[0]:
        return f"weight {list(weight.shape)} for x {list(x.shape)}"
    return _unsupported_x(x, [expert])


def _run(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, tables: ExpertTables, limit: float,
            out: torch.Tensor, path: str | None, config: dict[str, int] | None) -> torch.Tensor:
    T, K = ids.shape
    D, I, E = x.shape[1], tables.w13.out_features, tables.n_experts
    if T == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    ids32 = ids.to(torch.int32).contiguous()
    wts = weights.to(torch.float32).contiguous()
    if not x.is_cuda and bool(((ids32 < 0) | (ids32 >= E)).any()):   # on CUDA this would cost a sync
        raise KernelUnsupportedError(tensor="indices", expected=f"expert ids in [0, {E})",
                                     found=f"[{int(ids32.min())}, {int(ids32.max())}]")
    # fp32 activations with fp4 weights: the sorted path's FMA-unit dot spills to local memory on sm_90
    # (kernels_build_sm90.md); fp32 is a debugging dtype on GPU, so it takes the GEMV path at any T there.
    fp32_fp4_gpu = x.is_cuda and x.dtype == torch.float32 and tables.w13.fmt >= FMT_MXFP4
    path = path or ("decode" if T <= DECODE_MAX_TOKENS or fp32_fp4_gpu else "sorted")
    if path not in ("decode", "sorted"):
        raise KernelUnsupportedError(tensor="path", expected="decode | sorted", found=repr(path))
    cfg = {**moe_config(path, tables.w13.fmt, T * K / E, x.is_cuda, x.dtype == torch.float32), **(config or {})}
    # fp fusion is explicit: Triton 3.10 turns the default off, and the GEMV counts on one FFMA per weight
    meta = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
    lim = {"limit": float(limit), "HAS_LIMIT": limit > 0}
    w13, w2 = tables.w13, tables.w2
    if path == "decode":   # GEMV on fp32 activations: a 16-bit load costs a conversion per weight column
        bn, chunk = cfg["BN"], cfg["CHUNK"]
        x32 = x if x.dtype == torch.float32 else x.float()
        h32 = _scratch((T * K, I), torch.float32, x.device)
        acc13 = chunk // w13.group if w13.fmt >= FMT_MXFP4 else chunk // 2
        acc2 = chunk // w2.group if w2.fmt >= FMT_MXFP4 else chunk // 2
        launch(_gate_up_gemv, (T * K, triton.cdiv(I, bn)),
               x32, x32.stride(0), ids32, wts, h32, h32.stride(0), K, I, D, E, *_table_args(w13), **lim,
               **_table_meta(w13), BN=bn, CHUNK=chunk, ACC_W=acc13, EVEN_K=D % chunk == 0,
               H_ROUND=_TL_DTYPE[x.dtype], **meta)
        per_pair = out if K == 1 else _scratch((T * K, D), torch.float32, x.device)
        launch(_down_gemv, (T * K, triton.cdiv(D, bn)),
               h32, h32.stride(0), ids32, per_pair, per_pair.stride(0), D, I, *_table_args(w2), **_table_meta(w2),
               BN=bn, CHUNK=chunk, ACC_W=acc2, EVEN_K=I % chunk == 0, **meta)
        return out if K == 1 else torch.sum(per_pair.view(T, K, D), dim=1, out=out)
    bm, bn, chunk = cfg["BM"], cfg["BN"], cfg["CHUNK"]
    prec = "ieee" if x.dtype == torch.float32 else "tf32"   # fp32 stays fp32 (tf32 would cost 3e-4)
    sorted_pairs, block_e = align_pairs(ids32, E, bm)
    h = _scratch((T * K, I), x.dtype, x.device)
    n_blocks = block_e.numel()
    launch(_gate_up_sorted, (n_blocks, triton.cdiv(I, bn)),
           x, x.stride(0), sorted_pairs, block_e, wts, h, h.stride(0), K, T * K, I, D, E, *_table_args(w13), **lim,
           **_table_meta(w13), BM=bm, BN=bn, CHUNK=chunk, EVEN_K=D % chunk == 0, PREC=prec, **meta)
    per_pair = _scratch((T * K, D), torch.float32, x.device)
    launch(_down_sorted, (n_blocks, triton.cdiv(D, bn)),
           h, h.stride(0), sorted_pairs, block_e, per_pair, per_pair.stride(0), T * K, D, I, *_table_args(w2),
           **_table_meta(w2), BM=bm, BN=bn, CHUNK=chunk, EVEN_K=I % chunk == 0, PREC=prec, **meta)
    return torch.sum(per_pair.view(T, K, D), dim=1, out=out)


def _out(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if out.shape != x.shape or out.dtype != torch.float32 or out.device != x.device or out.stride(1) != 1:
        raise KernelUnsupportedError(tensor="out", expected=f"float32 {list(x.shape)} on {x.device}, rows contiguous",
                                     found=f"{out.dtype} {list(out.shape)} on {out.device}")
    return out


def fused_moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[Any], limit: float,
              *, path: str | None = None, out: torch.Tensor | None = None,
              config: dict[str, int] | None = None) -> torch.Tensor:
    """:func:`kernels.moe.moe_ref` in Triton: ``x [T, D]``, ``weights / indices [T, k]`` -> fp32 ``[T, D]``.

    ``path`` forces ``"decode"`` or ``"sorted"`` (default: by ``T``); ``config`` overrides block sizes
    (benchmark sweeps). Expert ids are checked on CPU; on CUDA an id outside ``[0, E)`` is undefined
    behaviour, as for any gather kernel (the router cannot produce one).
    """
    reason = unsupported_moe(x, weights, indices, experts, limit)
    if reason is not None:
        raise KernelUnsupportedError(tensor="moe", expected="inputs the fused MoE kernel handles", found=reason)
    tables = expert_tables(experts, x.device)
    return _run(x, weights, indices, tables, limit, _out(out, x), path, config)


def swiglu_expert(x: torch.Tensor, expert: Any, weight: torch.Tensor | None, limit: float, *,
                  path: str | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """:func:`kernels.moe.swiglu_expert_ref` (the shared expert) through the fused kernel: one expert, one slot.

    Returns ``[T, D]`` in ``x.dtype`` like the reference.
    """
    reason = unsupported_swiglu_expert(x, expert, weight, limit)
    if reason is not None:
        raise KernelUnsupportedError(tensor="swiglu_expert", expected="inputs the fused MoE kernel handles",
                                     found=reason)
    tables = expert_tables([expert], x.device, key=expert)
    T = x.shape[0]
    w = (weight.reshape(T, 1) if weight is not None else torch.ones((T, 1), device=x.device))
    ids = torch.zeros((T, 1), dtype=torch.int32, device=x.device)
    return _run(x, w, ids, tables, limit, _out(None, x), path, config).to(x.dtype)
