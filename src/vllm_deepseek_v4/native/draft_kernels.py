"""Where vLLM's DeepSeek-V4 forward has no kernel for a module's detected on-disk format, and what runs instead.

Read in vLLM 0.32's ``models/deepseek_v4`` (``docs/upstream.md``, "Kernels per draft format"): with the draft's
own quant config every linear and routed-expert format of the zoo gets a vLLM quant method with a GPU kernel,
*except* the attention output projection ``wo_a``. DeepSeek-V4's forward does not call ``wo_a``'s quant
method: ``nvidia/ops/o_proj.py`` (``deep_gemm_fp8_o_proj``, both the FlashMLA and the FlashInfer backend)
reads ``wo_a.weight`` and runs ``fp8_einsum`` when it is e4m3, else ``torch.bmm`` on it as a 16-bit matrix. A
4-bit ``wo_a`` (compressed-tensors NVFP4: packed e2m1 bytes there after vLLM's processing) is
multiplied as raw bytes. For those modules :func:`install` swaps in :class:`DenseFp4WeightMethod`'s class:
vLLM's method still creates and loads the parameters (same names, same ``weight_loader``s: the load plan and
TP slicing are untouched); after loading, our Triton kernel (``kernels.dense_triton.dense_fp4``) decodes the
codes into a 16-bit ``weight`` that vLLM's ``bmm`` path multiplies, and the packed parameters are dropped.
On CPU without Triton's interpreter the decode is the torch reference (``quant.numerics.dequantize``), the
same rule as ``kernels.dispatch``'s ``auto``; ``layer.dsv4_decoder`` records which ran.

A W4A16 ``wo_a`` has no decoder of ours in Triton: :func:`install` refuses it, naming the module.
Imports vLLM and torch inside functions only.
"""
from __future__ import annotations

import functools
from typing import Any

from .tables import ROLE_NAMES

__all__ = ["GAPS", "install", "dense_method_class", "DENSE_METHOD"]

DENSE_METHOD = "DenseFp4WeightMethod"
# (module suffix, detected scheme) -> why vLLM's DSv4 forward has no kernel for it; what runs instead
GAPS: dict[tuple[str, str], tuple[str, str]] = {
    ("attn.wo_a", "nvfp4"): ("o_proj reads wo_a.weight: fp8_einsum for e4m3, else torch.bmm on packed fp4 bytes",
                             "ours: Triton dense_fp4 decode at load, then vLLM's bmm on the 16-bit weight"),
    ("attn.wo_a", "w4a16"): ("o_proj reads wo_a.weight: torch.bmm on packed int4 words",
                             "refused: no Triton decoder of ours for w4a16"),
}


def _scheme_of(module: Any) -> str | None:
    """The 4-bit scheme of a vLLM linear's quant method (None: not a packed 4-bit method)."""
    qm = type(getattr(module, "quant_method", None)).__name__
    inner = type(getattr(module, "scheme", None)).__name__
    if qm == "CompressedTensorsLinearMethod" and "Fp4" in inner:
        return "nvfp4"
    if qm == "CompressedTensorsLinearMethod" and "WNA16" in inner:
        return "w4a16"
    return None


@functools.cache
def dense_method_class() -> type:
    """The quant method (a vLLM ``LinearMethodBase``) that wraps vLLM's own for a packed-fp4 module."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.linear import LinearMethodBase

    class DenseFp4WeightMethod(LinearMethodBase):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, family: str, dtype: Any) -> None:
            self.inner, self.family, self.dtype = inner, family, dtype

        def create_weights(self, *args: Any, **kwargs: Any) -> None:   # vLLM's own parameters and loaders
            self.inner.create_weights(*args, **kwargs)

        def process_weights_after_loading(self, layer: Any) -> None:
            names = ROLE_NAMES[self.family]["nvfp4"]
            parts = {role: getattr(layer, vname).data for role, vname in names.items()
                     if getattr(layer, vname, None) is not None and role != "input_global_scale"
                     and role != "input_scale"}
            out_f, in_f = parts["weight"].shape[0], parts["weight"].shape[1] * 2
            for role in ("weight_global_scale", "weight_scale_2"):       # one value per module (no merged shards)
                if role in parts:
                    parts[role] = parts[role].reshape(-1)[:1].reshape(())
            from ..kernels.dispatch import interpreting

            if parts["weight"].is_cuda or interpreting():
                from ..kernels.dense_triton import dense_fp4

                dense, layer.dsv4_decoder = dense_fp4("nvfp4", parts, out_f, in_f, self.dtype), "triton"
            else:
                from ..quant.numerics import dequantize

                dense = dequantize("nvfp4", parts, out_f, in_f, dtype=self.dtype)
                layer.dsv4_decoder = "torch"
            for vname in set(names.values()):
                if vname in layer._parameters:
                    del layer._parameters[vname]
            layer.register_parameter("weight", torch.nn.Parameter(dense, requires_grad=False))

        def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
            return F.linear(x, layer.weight.to(x.dtype), bias)

    DenseFp4WeightMethod.__name__ = DenseFp4WeightMethod.__qualname__ = DENSE_METHOD
    return DenseFp4WeightMethod


def install(model: Any, dtype: Any) -> dict[str, str]:
    """Swap the quant method of every module of ``model`` listed in :data:`GAPS` whose vLLM method holds a
    packed 4-bit format; returns module -> what runs it. Raises ``NotImplementedError`` naming a module whose
    format nothing of ours runs (W4A16 ``wo_a``)."""
    done: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name.endswith(".attn.wo_a"):
            continue
        scheme = _scheme_of(module)
        if scheme is None:
            continue
        if scheme != "nvfp4":
            raise NotImplementedError(f"{name}: a {scheme} wo_a: {GAPS[('attn.wo_a', scheme)][0]}; "
                                      f"{GAPS[('attn.wo_a', scheme)][1]}")
        module.quant_method = dense_method_class()(module.quant_method, "compressed_tensors", dtype)
        done[name] = GAPS[("attn.wo_a", scheme)][1]
    return done
