"""Sink attention in Triton: one shared K=V latent per key, many query heads, a per-head sink
(``docs/dsv4-architecture.md §5.2``).

Same numbers as :func:`kernels.attention.sink_attention_ref`, for decode (``S = 1``) and multi-token verify
(``S = k + 1`` queries per sequence, each with its own key set). A query's keys come either as a boolean mask
over the ``N`` rows of ``kv`` (``sink_attention``: the model's op) or as an index list, ``-1`` = unused
(``sink_attention_indexed``: window positions + indexer top-k, the form a paged runtime hands over).

One program owns ``BH`` heads of one query and a range of its keys: it loads each ``[BN, d]`` key tile once
for all ``BH`` heads (K is V, so the same tile feeds both products) and keeps an online softmax in the
log2 domain. The running max starts at the head's sink logit, which keeps it finite when a block has no
valid key and makes the sink term ``2^(sink - m)`` exact at the end. At small batch the keys are split over
``num_splits`` programs (flash-decoding) so every SM streams KV; a second launch merges the partial
``(m, l, acc)`` and adds the sink once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelUnsupportedError
from .triton_aot import launch

__all__ = ["sink_attention", "sink_attention_indexed", "unsupported_sink_attention",
           "unsupported_sink_attention_indexed", "attention_config"]

LOG2E = 1.4426950408889634
POISON_SCRATCH = False   # tests: NaN-fill the split partials so an unwritten one shows up
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512


@triton.jit
def _sink_attn(Q, KV, SEL, SINK, O, OP, ML,
               stride_qb, stride_qs, stride_qh, stride_kb, stride_kn, stride_sb, stride_ss,
               stride_ob, stride_os, stride_oh,
               S, H, N_SEL, N_KV, D, scale_log2, keys_per_split, n_splits,
               INDEXED: tl.constexpr, SPLIT: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
               BD: tl.constexpr, PREC: tl.constexpr):
    """Program (query ``b*S + s``, head block, key split)."""
    bs = tl.program_id(0).to(tl.int64)   # int64 offsets: B * N * d passes 2^31 for long caches
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    b = bs // S
    s = bs % S
    heads = hb * BH + tl.arange(0, BH)
    h_ok = heads < H
    d = tl.arange(0, BD)
    d_ok = d < D
    q = tl.load(Q + b * stride_qb + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0)
    sink = tl.load(SINK + heads, mask=h_ok, other=0).to(tl.float32) * 1.4426950408889634
    m = sink
    l = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, BD), tl.float32)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N_SEL)
    sel = SEL + b * stride_sb + s * stride_ss
    kv = KV + b * stride_kb
    for n0 in range(lo, hi, BN):
        j = n0 + tl.arange(0, BN)
        if INDEXED:
            pos = tl.load(sel + j, mask=j < hi, other=-1)
            valid = (pos >= 0) & (pos < N_KV)        # out-of-range never reads memory (checked on CPU)
        else:
            valid = tl.load(sel + j, mask=j < hi, other=0) != 0
            pos = j
        k = tl.load(kv + pos[:, None] * stride_kn + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0)
        logit = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        logit = tl.where(valid[None, :], logit, float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(logit - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
        m = m_new
    if SPLIT:
        part = (bs * n_splits + sp) * H + heads
        tl.store(OP + part[:, None] * D + d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])
        tl.store(ML + part * 2, m, mask=h_ok)
        tl.store(ML + part * 2 + 1, l, mask=h_ok)
    else:
        o = acc / (l + tl.exp2(sink - m))[:, None]
        tl.store(O + b * stride_ob + s * stride_os + heads[:, None] * stride_oh + d[None, :],
                 o.to(O.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits(OP, ML, SINK, O, stride_ob, stride_os, stride_oh, S, H, D, n_splits,
                  BSP: tl.constexpr, BD: tl.constexpr):
    """Program (query, head): ``sum_i 2^(m_i - M) acc_i / (sum_i 2^(m_i - M) l_i + 2^(sink - M))``."""
    bs = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BSP)
    i_ok = i < n_splits
    d = tl.arange(0, BD)
    d_ok = d < D
    part = (bs * n_splits + i) * H + h
    m = tl.load(ML + part * 2, mask=i_ok, other=float("-inf"))
    l = tl.load(ML + part * 2 + 1, mask=i_ok, other=0)
    sink = tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
    top = tl.maximum(tl.max(m, 0), sink)
    w = tl.exp2(m - top)
    denom = tl.sum(l * w, 0) + tl.exp2(sink - top)
    acc = tl.load(OP + part[:, None] * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0)
    o = tl.sum(acc * w[:, None], 0) / denom
    tl.store(O + (bs // S) * stride_ob + (bs % S) * stride_os + h * stride_oh + d, o.to(O.dtype.element_ty),
             mask=d_ok)


def attention_config(H: int, D: int, on_gpu: bool) -> dict[str, int]:
    """``BH`` heads per program (``tl.dot`` needs 16+), ``BN`` keys per tile, ``BD`` the padded head dim.

    GPU, d = 512: a ``[32, 512]`` bf16 key tile (32 KB) per stage, ``[BH, 512]`` fp32 accumulator spread over
    8 warps; two head blocks of 32 cover H = 64 and share each key tile through L2.
    """
    bd = max(16, triton.next_power_of_2(D))
    if not on_gpu:
        return {"BH": 16, "BN": 32, "BD": bd, "num_warps": 4, "num_stages": 1}
    bh = 16 if H <= 16 else 32
    return {"BH": bh, "BN": 32 if bd >= 256 else 64, "BD": bd, "num_warps": 8 if bd >= 256 else 4,
            "num_stages": 2}


def _splits(programs: int, n_sel: int, bn: int, device: torch.device, num_splits: int | None) -> int:
    blocks = triton.cdiv(max(n_sel, 1), bn)
    if num_splits is None:
        if device.type != "cuda":
            return 1
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        num_splits = triton.cdiv(target, max(programs, 1))
    return max(1, min(num_splits, blocks, 64))


def _unsupported_qkv(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor) -> str | None:
    if q.dim() != 4 or kv.dim() != 3 or q.dtype not in _FLOATS or kv.dtype != q.dtype:
        return f"q {q.dtype} {list(q.shape)}, kv {kv.dtype} {list(kv.shape)} (expected [B,S,H,d] and [B,N,d], one float dtype)"
    if kv.shape[0] != q.shape[0] or kv.shape[2] != q.shape[3]:
        return f"kv {list(kv.shape)} for q {list(q.shape)}"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} > {MAX_HEAD_DIM}"
    if sink.shape != (q.shape[2],):
        return f"sink {list(sink.shape)} for {q.shape[2]} heads"
    return None


def unsupported_sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                               scale: float) -> str | None:
    """Why :func:`sink_attention` cannot take these inputs (None when it can)."""
    B, S = q.shape[:2] if q.dim() == 4 else (0, 0)
    if mask.dim() != 3 or mask.dtype != torch.bool or mask.shape[0] not in (1, B) or mask.shape[1:] != (S, kv.shape[1]):
        return f"mask {mask.dtype} {list(mask.shape)} (expected bool [B|1, S, N])"
    return _unsupported_qkv(q, kv, sink)


def unsupported_sink_attention_indexed(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                                       scale: float) -> str | None:
    """Why :func:`sink_attention_indexed` cannot take these inputs (None when it can)."""
    B, S = q.shape[:2] if q.dim() == 4 else (0, 0)
    if idx.dim() != 3 or idx.is_floating_point() or idx.shape[0] not in (1, B) or idx.shape[1] != S:
        return f"idx {idx.dtype} {list(idx.shape)} (expected integer [B|1, S, K])"
    return _unsupported_qkv(q, kv, sink)


def _run(q: torch.Tensor, kv: torch.Tensor, sel: torch.Tensor, sink: torch.Tensor, scale: float, indexed: bool,
         num_splits: int | None, out: torch.Tensor | None, config: dict[str, int] | None) -> torch.Tensor:
    B, S, H, D = q.shape
    q = q if q.stride(3) == 1 else q.contiguous()
    kv = kv if kv.stride(2) == 1 else kv.contiguous()
    sel = sel if sel.stride(2) == 1 else sel.contiguous()
    sink = sink.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(3) != 1:
        raise KernelUnsupportedError(tensor="out", expected=f"{q.dtype} {list(q.shape)} on {q.device}",
                                     found=f"{out.dtype} {list(out.shape)} on {out.device}")
    n_sel = sel.shape[2]
    cfg = {**attention_config(H, D, q.is_cuda), **(config or {})}
    bh, bn, bd = cfg["BH"], cfg["BN"], cfg["BD"]
    splits = _splits(B * S * triton.cdiv(H, bh), n_sel, bn, q.device, num_splits)
    per_split = triton.cdiv(triton.cdiv(max(n_sel, 1), splits), bn) * bn
    splits = triton.cdiv(max(n_sel, 1), per_split)
    fill = torch.full if POISON_SCRATCH else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    part = fill((B * S * splits * H * D,) if splits > 1 else (1,), float("nan"), dtype=torch.float32, device=q.device)
    ml = fill((B * S * splits * H * 2,) if splits > 1 else (1,), float("nan"), dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    meta = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
    launch(_sink_attn, (B * S, triton.cdiv(H, bh), splits),
           q, kv, sel, sink, out, part, ml, q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
           sel.stride(0) if sel.shape[0] > 1 else 0, sel.stride(1), out.stride(0), out.stride(1), out.stride(2),
           S, H, n_sel, kv.shape[1], D, float(scale) * LOG2E, per_split, splits,
           INDEXED=indexed, SPLIT=splits > 1, BH=bh, BN=bn, BD=bd, PREC=prec, **meta)
    if splits > 1:
        launch(_merge_splits, (B * S, H), part, ml, sink, out, out.stride(0), out.stride(1), out.stride(2),
               S, H, D, splits, BSP=max(2, triton.next_power_of_2(splits)), BD=bd, num_warps=4, num_stages=1,
               enable_fp_fusion=True)
    return out


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float, *,
                   num_splits: int | None = None, out: torch.Tensor | None = None,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """``q [B, S, H, d]``, ``kv [B, N, d]``, ``mask [B|1, S, N]`` bool, ``sink [H]`` -> ``[B, S, H, d]``.

    ``num_splits`` fixes the key split (default: enough programs for two per SM); ``config`` overrides
    :func:`attention_config` (benchmark sweeps, compile checks).
    """
    reason = unsupported_sink_attention(q, kv, mask, sink, scale)
    if reason is not None:
        raise KernelUnsupportedError(tensor="sink_attention", expected="inputs the Triton kernel handles", found=reason)
    return _run(q, kv, mask.view(torch.uint8), sink, scale, False, num_splits, out, config)


def sink_attention_indexed(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                           *, num_splits: int | None = None, out: torch.Tensor | None = None,
                           config: dict[str, int] | None = None) -> torch.Tensor:
    """``idx [B|1, S, K]`` rows of ``kv [B, N, d]`` per query (``-1`` = none; no repeats) -> ``[B, S, H, d]``.

    Indices are checked on CPU; on CUDA an index ``>= N`` is skipped by the kernel (it never reads out of
    bounds) rather than checked, which would need a host sync.
    """
    reason = unsupported_sink_attention_indexed(q, kv, idx, sink, scale)
    if reason is not None:
        raise KernelUnsupportedError(tensor="sink_attention_indexed", expected="inputs the Triton kernel handles",
                                     found=reason)
    idx32 = idx.to(torch.int32)
    if not q.is_cuda and idx32.numel() and bool(((idx32 < -1) | (idx32 >= kv.shape[1])).any()):
        raise KernelUnsupportedError(tensor="idx", expected=f"key rows in [-1, {kv.shape[1]})",
                                     found=f"[{int(idx32.min())}, {int(idx32.max())}]")
    return _run(q, kv, idx32, sink, scale, True, num_splits, out, config)

