"""Where the fused MoE kernels find their weights and tokens (plain torch, no Triton).

**Weights.** The model keeps every expert's roles as separate tensors in checkpoint layout
(``experts.E.w1.weight``, ``experts.E.w1.scale``, ...), so nothing is stacked or copied: for each role the kernel
gets one *base* tensor (expert 0's) and an int64 table with every expert's element offset from that base.
``w1`` and ``w3`` share one table of ``2E`` entries (gate rows at ``e``, up rows at ``E + e``), so the gate/up
kernel streams both from one base. A stacked ``[E, out, in]`` layout (vLLM's) fits the same table
(``offset = e * stride``).

Tables are cached per expert container (an ``nn.ModuleList`` or an ``Expert``) and hold strong references to
every tensor they point at, so a stale table can never read freed memory. They are rebuilt when the container's
length, device or the storage of its first or last expert changes (``.to()``, reloading). Loaders replace
expert tensors before the first forward (or copy into them in place), so no table needs dropping by hand;
replacing one middle expert's tensor after a forward would not be noticed.

**Tokens.** The prefill/verify path sorts the ``T * k`` (token, slot) pairs by expert and pads each expert's
run to a multiple of ``block_m`` (:func:`align_pairs`), so one program multiplies one expert tile with up to
``block_m`` tokens. Everything stays on the device: no host synchronisation.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KernelUnsupportedError
from ..quant import SCHEMES, cdiv

__all__ = ["FORMATS", "ProjTable", "ExpertTables", "expert_tables", "align_pairs", "unsupported_experts"]

# scheme -> kernel format code (the ``FMT`` constexpr); w4a16 has no kernel yet.
FORMATS = {"bf16": 0, "fp8_block": 1, "mxfp4": 2, "nvfp4": 3}
# scale kinds (the ``SKIND`` constexpr)
SK_NONE, SK_E8M0, SK_F32, SK_BF16, SK_NV_DIV, SK_NV_MUL = range(6)
# fp8 scales are read by their dtype (the record's "dtype" encoding); the kernels decode these three
_BY_DTYPE = {torch.float8_e8m0fnu: SK_E8M0, torch.float32: SK_F32, torch.bfloat16: SK_BF16}
_NV_KIND = {"divide": SK_NV_DIV, "multiply": SK_NV_MUL}
_ALIGN = 16  # element offsets divisible by this let the kernel promise aligned (vectorised) weight loads


@dataclass(frozen=True)
class ProjTable:
    """One projection (``w13`` or ``w2``) of every expert: base tensors + per-expert element offsets."""

    scheme: str
    fmt: int
    skind: int
    group: int
    out_features: int
    in_features: int
    weight: torch.Tensor          # expert 0's weight (bytes for fp4), the base of ``weight_off``
    weight_off: torch.Tensor      # int64 [n]
    weight_stride: int            # elements between rows
    align: int                    # 16 when every offset and the row stride are multiples of 16, else 1
    scale: torch.Tensor           # base of ``scale_off`` (the weight itself where there is no scale)
    scale_off: torch.Tensor
    scale_stride: int
    glob: torch.Tensor            # nvfp4 global scale base (else the weight)
    glob_off: torch.Tensor


@dataclass(frozen=True)
class ExpertTables:
    w13: ProjTable                # 2E entries: w1 (gate) of expert e at e, w3 (up) at E + e
    w2: ProjTable                 # E entries
    n_experts: int
    keep: tuple[torch.Tensor, ...]  # every tensor the offsets point into


def _role_tensors(lin: Any) -> dict[str, torch.Tensor]:
    return dict(lin.parts())


def unsupported_experts(experts: Sequence[Any]) -> str | None:
    """Why the fused kernel cannot take these experts (None when it can); checks schemes only (cheap)."""
    if len(experts) == 0:
        return "no experts"
    schemes = {getattr(e, w).scheme for e in (experts[0], experts[-1]) for w in ("w1", "w2", "w3")}
    if len(schemes) != 1:
        return f"mixed expert schemes {sorted(schemes)}"
    scheme = schemes.pop()
    if scheme not in FORMATS:
        return f"expert scheme {scheme!r} (kernels exist for {' | '.join(FORMATS)})"
    return None


def _kinds(scheme: str, parts: dict[str, torch.Tensor], name: str) -> tuple[int, str | None, str | None]:
    """(scale kind, scale role, global role) of one module's parts, from its scheme's scale encoding."""
    record = SCHEMES[scheme]
    srole = record.scale
    if srole is None:
        return SK_NONE, None, None
    if record.scale_encoding == "dtype":
        dt = parts[srole].dtype
        if dt not in _BY_DTYPE:
            kernel_dtypes = " | ".join(str(d).removeprefix("torch.") for d in _BY_DTYPE)
            raise KernelUnsupportedError(tensor=f"{name}.{srole}", expected=kernel_dtypes, found=dt)
        return _BY_DTYPE[dt], srole, None
    if record.scale_encoding == "e8m0":
        return SK_E8M0, srole, None
    for grole, op in record.globals:
        if grole in parts:
            return _NV_KIND[op], srole, grole
    raise KernelUnsupportedError(tensor=f"{name}.{record.globals[0][0]}",
                                 expected=" or ".join(g for g, _ in record.globals), found=sorted(parts))


def _as_kernel_view(t: torch.Tensor) -> torch.Tensor:
    """Byte formats as uint8 (int8 fp4 codes, e8m0 scales, and e4m3, which the kernels bitcast after a masked
    load); wider dtypes keep theirs."""
    if t.dtype in (torch.int8, torch.float8_e8m0fnu, torch.float8_e4m3fn):
        return t.view(torch.uint8)
    return t


def _offsets(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    base = tensors[0]
    size = base.element_size()
    offs = []
    for i, t in enumerate(tensors):
        if t.dtype != base.dtype or t.shape != base.shape or t.stride() != base.stride():
            raise KernelUnsupportedError(tensor=f"{name} of expert slot {i}",
                                         expected=f"{base.dtype} {list(base.shape)} strides {base.stride()}",
                                         found=f"{t.dtype} {list(t.shape)} strides {t.stride()}",
                                         hint="every expert must share one layout")
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:
            raise KernelUnsupportedError(tensor=f"{name} of expert slot {i}",
                                         expected=f"an address aligned to its {size}-byte elements", found=delta)
        offs.append(delta // size)
    return torch.tensor(offs, dtype=torch.int64)


def _proj(mods: list[Any], name: str, device: torch.device) -> tuple[ProjTable, list[torch.Tensor]]:
    first = mods[0]
    scheme = first.scheme
    parts = [_role_tensors(m) for m in mods]
    skind, srole, grole = _kinds(scheme, parts[0], name)
    for i, (m, p) in enumerate(zip(mods, parts)):
        if m.scheme != scheme or set(p) != set(parts[0]):
            raise KernelUnsupportedError(tensor=f"{name} of expert slot {i}", expected=f"{scheme} {sorted(parts[0])}",
                                         found=f"{m.scheme} {sorted(p)}", hint="every expert must share one scheme")
        if (m.out_features, m.in_features) != (first.out_features, first.in_features):
            raise KernelUnsupportedError(tensor=f"{name} of expert slot {i}",
                                         expected=[first.out_features, first.in_features],
                                         found=[m.out_features, m.in_features])
        for t in p.values():
            if t.device != device:
                raise KernelUnsupportedError(tensor=f"{name} of expert slot {i}", expected=f"weights on {device}",
                                             found=str(t.device), hint="move the model to the activations' device")
    weights = [_as_kernel_view(p["weight"]) for p in parts]
    if SCHEMES[scheme].pack == 2:   # fp4: the kernels read the codes as 32-bit words of 8
        if weights[0].shape[-1] % 4 or weights[0].stride(-1) != 1:
            raise KernelUnsupportedError(tensor=f"{name}.weight", expected="rows of whole 32-bit words (in % 8 == 0)",
                                         found=list(weights[0].shape))
        weights = [w.view(torch.int32) for w in weights]
    if weights[0].dim() != 2 or weights[0].stride(1) != 1:
        raise KernelUnsupportedError(tensor=f"{name}.weight", expected="a 2-D weight with contiguous rows",
                                     found=f"shape {list(weights[0].shape)} strides {weights[0].stride()}")
    w_off = _offsets(weights, f"{name}.weight")
    stride = weights[0].stride(0)
    align = _ALIGN if bool((w_off % _ALIGN == 0).all()) and stride % _ALIGN == 0 else 1
    keep = list(weights)
    scale, s_off, s_stride = weights[0], w_off, 0
    if srole is not None:
        scales = [_as_kernel_view(p[srole]) for p in parts]
        if scales[0].dim() != 2 or scales[0].stride(1) != 1:
            raise KernelUnsupportedError(tensor=f"{name}.{srole}", expected="a 2-D scale with contiguous rows",
                                         found=f"shape {list(scales[0].shape)} strides {scales[0].stride()}")
        scale, s_off, s_stride = scales[0], _offsets(scales, f"{name}.{srole}"), scales[0].stride(0)
        keep += scales
    glob, g_off = weights[0], w_off
    if grole is not None:
        globs = [p[grole] for p in parts]
        if globs[0].numel() != 1 or globs[0].dtype != torch.float32:
            raise KernelUnsupportedError(tensor=f"{name}.{grole}", expected="one float32 element",
                                         found=f"{globs[0].dtype} {list(globs[0].shape)}")
        glob, g_off = globs[0], _offsets(globs, f"{name}.{grole}")
        keep += globs
    record = SCHEMES[scheme]
    group = record.block_in if record.scale is not None else 0     # fp8: the (square) block edge
    table = ProjTable(scheme, FORMATS[scheme], skind, group, first.out_features, first.in_features,
                      weights[0], w_off.to(device), stride, align, scale, s_off.to(device), s_stride,
                      glob, g_off.to(device))
    return table, keep


def build_tables(experts: Sequence[Any], device: torch.device) -> ExpertTables:
    """Tables for ``experts`` (each with ``w1``, ``w2``, ``w3``); raises on mixed layouts or devices."""
    reason = unsupported_experts(experts)
    if reason is not None:
        raise KernelUnsupportedError(tensor="experts", expected="experts the fused MoE kernel handles", found=reason)
    w13, keep13 = _proj([e.w1 for e in experts] + [e.w3 for e in experts], "w1|w3", device)
    w2, keep2 = _proj([e.w2 for e in experts], "w2", device)
    if (w2.out_features, w2.in_features) != (w13.in_features, w13.out_features):
        raise KernelUnsupportedError(tensor="w2", expected=[w13.in_features, w13.out_features],
                                     found=[w2.out_features, w2.in_features], hint="w2 maps the intermediate back")
    return ExpertTables(w13, w2, len(experts), tuple(keep13 + keep2))


def _signature(experts: Sequence[Any], device: torch.device) -> tuple[Any, ...]:
    ends = (experts[0], experts[-1])
    ptrs = tuple(t.data_ptr() for e in ends for w in ("w1", "w2", "w3") for t in _role_tensors(getattr(e, w)).values())
    return (len(experts), str(device)) + ptrs


_CACHE: dict[int, tuple[weakref.ref[Any], tuple[Any, ...], ExpertTables]] = {}


def expert_tables(experts: Sequence[Any], device: torch.device, *, key: Any = None) -> ExpertTables:
    """Cached :func:`build_tables`; the cache entry lives as long as ``key`` (default: ``experts`` itself, e.g.
    the ``nn.ModuleList``; the shared expert passes ``[expert]`` with ``key=expert``)."""
    owner = experts if key is None else key
    sig = _signature(experts, device)
    hit = _CACHE.get(id(owner))
    if hit is not None and hit[0]() is owner and hit[1] == sig:
        return hit[2]
    tables = build_tables(experts, device)
    try:
        ref = weakref.ref(owner, lambda _r, k=id(owner): _CACHE.pop(k, None))
    except TypeError:  # plain lists cannot be weakly referenced: build every call
        return tables
    _CACHE[id(owner)] = (ref, sig, tables)
    return tables


def align_pairs(indices: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, slot) pairs of ``indices [T, k]`` by expert, each run padded to ``block_m``.

    Returns ``sorted_pairs [n_blocks * block_m]`` int32 (pair ``t * k + slot``; padding holds ``T * k``) and
    ``block_expert [n_blocks]`` int32 (-1 for blocks past the last run). ``n_blocks`` is the bound
    ``ceil((P + min(E, P) * (block_m - 1)) / block_m)``, so no host sync is needed to size the launch.
    """
    flat = indices.reshape(-1).long()
    P = flat.numel()
    dev = flat.device
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(P, device=dev) - (counts.cumsum(0) - counts)[sorted_e]
    n_blocks = cdiv(P + min(n_experts, P) * (block_m - 1), block_m)
    sorted_pairs = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs[starts[sorted_e] + rank] = order.to(torch.int32)
    first = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, first, right=True)
    block_expert = torch.where(first < ends[-1], block_expert, torch.full_like(block_expert, -1)).to(torch.int32)
    return sorted_pairs, block_expert
