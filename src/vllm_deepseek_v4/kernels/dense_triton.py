"""A dense copy of an fp4 weight (MXFP4 / NVFP4), decoded in Triton by the device functions the fused MoE
kernels multiply with (``dequant_triton._fp4_words_scales`` / ``_fp4_pair``), so the numbers are the kernels'.

For a consumer that needs the matrix itself rather than a product: vLLM's DeepSeek-V4 output projection reads
``wo_a.weight`` and multiplies it with its own ``fp8_einsum`` (FP8) or ``torch.bmm`` (16-bit), and has no path
for a packed 4-bit ``wo_a`` (``native/draft_kernels.py``). Torch reference: ``quant.numerics.dequantize``.
Imports ``triton``; callers import this module lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import KernelUnsupportedError
from ..quant import SCHEMES
from .dequant_triton import FMT_NVFP4, _fp4_pair, _fp4_words_scales
from .moe_layout import FORMATS, _as_kernel_view, _kinds
from .triton_aot import launch

__all__ = ["dense_fp4", "unsupported_dense_fp4"]

_BN, _NW = 16, 32          # rows x 32-bit words (8 codes each) per program


@triton.jit
def _fp4_dense(W, S, G, OUT, N, K, stride_w, stride_s, stride_o, FMT: tl.constexpr, SKIND: tl.constexpr,
               GROUP: tl.constexpr, BN: tl.constexpr, NW: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    k0 = tl.program_id(1) * NW * 8
    if FMT == FMT_NVFP4:
        gsc = tl.load(G).to(tl.float32)
    else:
        gsc = 1.0
    words, sf = _fp4_words_scales(W, S, gsc, rows, row_ok, k0, K, stride_w, stride_s, FMT, SKIND, GROUP, NW, False)
    WPG: tl.constexpr = GROUP // 8
    sfw = tl.reshape(tl.broadcast_to(sf[:, :, None], (BN, NW // WPG, WPG)), (BN, NW))   # one scale per word
    col = k0 + 8 * tl.arange(0, NW)
    base = OUT + rows[:, None] * stride_o
    for j in tl.static_range(4):
        lo, hi = _fp4_pair(words, j)          # codes j and j + 4 of every word
        tl.store(base + (col + j)[None, :], lo * sfw, mask=row_ok[:, None] & (col + j < K)[None, :])
        tl.store(base + (col + j + 4)[None, :], hi * sfw, mask=row_ok[:, None] & (col + j + 4 < K)[None, :])


def unsupported_dense_fp4(scheme: str, parts: dict[str, torch.Tensor]) -> str | None:
    """Why :func:`dense_fp4` cannot decode these parts (None when it can)."""
    if scheme not in ("mxfp4", "nvfp4"):
        return f"scheme {scheme!r} (the dense decode takes mxfp4 | nvfp4)"
    w = parts.get("weight")
    if w is None or w.dim() != 2 or w.shape[-1] % 4:
        return f"weight {None if w is None else list(w.shape)}: rows of whole 32-bit words (in % 8 == 0)"
    dev = {t.device for t in parts.values()}
    if len(dev) != 1:
        return f"parts on several devices {sorted(map(str, dev))}"
    d = dev.pop()
    if d.type != "cuda":
        from .dispatch import interpreting

        if not interpreting():
            return f"inputs on {d} (Triton needs CUDA, or TRITON_INTERPRET=1 for its CPU interpreter)"
    return None


def dense_fp4(scheme: str, parts: dict[str, torch.Tensor], out_features: int, in_features: int,
              dtype: torch.dtype, *, name: str = "weight") -> torch.Tensor:
    """``[out, in]`` in ``dtype`` from the canonical roles of an ``mxfp4`` / ``nvfp4`` weight (``weight`` codes,
    ``weight_scale`` / ``scale``, the NVFP4 global scale): equals ``quant.numerics.dequantize`` up to the
    output dtype's rounding."""
    reason = unsupported_dense_fp4(scheme, parts)
    if reason is not None:
        raise KernelUnsupportedError(tensor=name, expected="a weight the dense fp4 decode handles", found=reason)
    skind, srole, grole = _kinds(scheme, parts, name)
    w = _as_kernel_view(parts["weight"]).contiguous().view(torch.int32)
    if w.shape[0] != out_features or w.shape[1] * 8 != in_features:
        raise KernelUnsupportedError(tensor=f"{name}.weight", expected=f"codes for [{out_features}, {in_features}]",
                                     found=list(parts["weight"].shape))
    s = _as_kernel_view(parts[srole]).contiguous()
    g = parts[grole].reshape(1).to(torch.float32).contiguous() if grole is not None else w
    # fp32 out, cast by torch: round-to-nearest on every device (the interpreter truncates a Triton bf16 cast)
    out = torch.empty((out_features, in_features), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(out_features, _BN), triton.cdiv(in_features, _NW * 8))
    launch(_fp4_dense, grid, w, s, g, out, out_features, in_features, w.stride(0), s.stride(0), out.stride(0),
           FMT=FORMATS[scheme], SKIND=skind, GROUP=SCHEMES[scheme].block_in, BN=_BN, NW=_NW)
    return out if dtype == torch.float32 else out.to(dtype)
