"""Linear layers over on-disk weight formats: dequantise, then matmul (torch reference).

A quantised module holds its weight as canonical *roles* (``quant/__init__.py``); the reference decodes them
to a dense ``[out, in]`` matrix in the compute dtype and calls ``F.linear``. Real kernels (later) keep the
packed form and must match these numbers up to their per-dtype tolerance.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["QuantWeight", "dequantized_weight", "linear_ref", "grouped_linear_ref"]


class QuantWeight(Protocol):
    """What the linear ops need from a module (``model.linear.QLinear`` satisfies it)."""

    scheme: str
    in_features: int
    out_features: int

    def parts(self) -> dict[str, torch.Tensor]: ...


def dequantized_weight(module: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[out, in]`` weight in ``dtype``; bf16-scheme weights are only cast."""
    parts = module.parts()
    if module.scheme == "bf16":
        return parts["weight"].to(dtype)
    from ..quant.numerics import dequantize  # lazy: quant numerics are optional for bf16 models

    return dequantize(module.scheme, parts, module.out_features, module.in_features, dtype=dtype)


def linear_ref(x: torch.Tensor, module: QuantWeight) -> torch.Tensor:
    """``x @ W.T`` computed in ``x.dtype`` (callers pass fp32 inputs where the reference runs in fp32)."""
    return F.linear(x, dequantized_weight(module, x.dtype))


def grouped_linear_ref(x: torch.Tensor, module: QuantWeight, groups: int) -> torch.Tensor:
    """Block-diagonal linear: ``x [..., G, in]`` times ``W`` viewed as ``[G, out/G, in]`` -> ``[..., G, out/G]``.

    Used by the attention output ``wo_a`` (``[G*o_lora, H*d/G]``, ``docs/dsv4-architecture.md §5.2``): group ``g`` of
    heads only meets rows ``g*o_lora .. (g+1)*o_lora`` of the weight.
    """
    w = dequantized_weight(module, x.dtype).view(groups, module.out_features // groups, module.in_features)
    return torch.einsum("...gi,goi->...go", x, w)
