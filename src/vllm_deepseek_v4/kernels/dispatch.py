"""The model's op layer: Triton on CUDA, torch elsewhere, one switch to force either.

Every compute-heavy step of the model goes through one function here (``linear``, ``grouped_linear``,
``sink_attention``, ``sink_attention_indexed``, ``moe``, ``swiglu_expert``). Each picks a backend per call:

- ``torch``: always the ``<op>_ref`` reference in ``kernels/<op>.py``;
- ``triton``: always the Triton kernel; :class:`KernelUnsupportedError` where none exists (yet), where Triton
  cannot be imported, where the kernel does not handle the inputs (e.g. w4a16 experts), or where the inputs
  are not on CUDA -- except under ``TRITON_INTERPRET=1``, where CPU tensors run in Triton's interpreter
  (tests). Forcing never falls back silently;
- ``auto`` (default): the Triton kernel when the inputs are on CUDA, Triton imports and the kernel handles
  the inputs; else the reference.

Select with the environment variable ``DSV4_KERNELS=torch|triton|auto`` (read at import) or
:func:`set_backend`. Triton kernels live in ``kernels/<op>_triton.py`` and are imported on first use, so
CPU installs never import ``triton``. Kernels exist for ``moe``, ``swiglu_expert`` (bf16, fp8_block, mxfp4,
nvfp4 experts) and both attention ops; ``linear`` and ``grouped_linear`` have none yet.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import KernelUnsupportedError
from .attention import sink_attention_indexed_ref, sink_attention_ref
from .linear import QuantWeight, grouped_linear_ref, linear_ref
from .moe import ExpertWeights, moe_ref, swiglu_expert_ref

__all__ = ["BACKENDS", "get_backend", "set_backend", "interpreting", "linear", "grouped_linear", "sink_attention",
           "sink_attention_indexed", "moe", "swiglu_expert"]

BACKENDS = ("auto", "torch", "triton")
_ENV = "DSV4_KERNELS"

# op name -> (module under kernels/, wrapper, "why not" check with the wrapper's signature); imported lazily.
_TRITON: dict[str, tuple[str, str, str]] = {
    "moe": ("moe_triton", "fused_moe", "unsupported_moe"),
    "swiglu_expert": ("moe_triton", "swiglu_expert", "unsupported_swiglu_expert"),
    "sink_attention": ("attention_triton", "sink_attention", "unsupported_sink_attention"),
    "sink_attention_indexed": ("attention_triton", "sink_attention_indexed", "unsupported_sink_attention_indexed"),
}


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise KernelUnsupportedError(tensor=_ENV, expected=" | ".join(BACKENDS), found=repr(name),
                                     hint="pick a kernel backend")
    return name


_backend = _checked(os.environ.get(_ENV, "auto").strip().lower() or "auto")


def set_backend(name: str) -> str:
    """Select the backend for all later calls; returns the previous one (so tests can restore it)."""
    global _backend
    previous, _backend = _backend, _checked(name)
    return previous


def get_backend() -> str:
    return _backend


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _load(op: str) -> tuple[Callable[..., torch.Tensor], Callable[..., str | None]]:
    module, kernel, check = _TRITON[op]
    mod = importlib.import_module(f"{__package__}.{module}")   # imports triton
    return getattr(mod, kernel), getattr(mod, check)


def _pick(op: str, ref: Callable[..., torch.Tensor], x: torch.Tensor, args: tuple[Any, ...]
          ) -> Callable[..., torch.Tensor]:
    if _backend == "torch":
        return ref
    if _backend == "auto":
        if not x.is_cuda or op not in _TRITON:
            return ref
        try:
            kernel, check = _load(op)
        except ImportError:          # no triton on this CUDA install: the reference is the documented choice
            return ref
        return kernel if check(*args) is None else ref
    if op not in _TRITON:
        raise KernelUnsupportedError(tensor=op, expected="a Triton kernel", found="none registered yet",
                                     hint=f"set {_ENV}=torch or auto to use the torch reference")
    if not x.is_cuda and not interpreting():
        raise KernelUnsupportedError(tensor=op, expected="CUDA inputs for the Triton backend", found=str(x.device),
                                     hint=f"set {_ENV}=torch or auto on this device, or TRITON_INTERPRET=1 "
                                          "(before triton is imported) to run the kernels in Triton's interpreter")
    try:
        kernel, check = _load(op)
    except ImportError as e:
        raise KernelUnsupportedError(tensor=op, expected="an importable triton", found=repr(e),
                                     hint="pip install 'vllm-deepseek-v4[kernels]'") from e
    reason = check(*args)
    if reason is not None:
        raise KernelUnsupportedError(tensor=op, expected="inputs the Triton kernel handles", found=reason,
                                     hint=f"set {_ENV}=auto to use the torch reference for these")
    return kernel


def linear(x: torch.Tensor, module: QuantWeight) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` in ``x.dtype`` for a module holding on-disk weight roles."""
    return _pick("linear", linear_ref, x, (x, module))(x, module)


def grouped_linear(x: torch.Tensor, module: QuantWeight, groups: int) -> torch.Tensor:
    """``x [..., G, in] -> [..., G, out/G]`` (attention ``wo_a``)."""
    return _pick("grouped_linear", grouped_linear_ref, x, (x, module, groups))(x, module, groups)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``q [B, S, H, d]``, ``kv [B, N, d]``, ``mask [B|1, S, N]``, ``sink [H]`` -> ``[B, S, H, d]``."""
    args = (q, kv, mask, sink, scale)
    return _pick("sink_attention", sink_attention_ref, q, args)(*args)


def sink_attention_indexed(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """``idx [B|1, S, K]`` rows of ``kv [B, N, d]`` per query (``-1`` = none) -> ``[B, S, H, d]``."""
    args = (q, kv, idx, sink, scale)
    return _pick("sink_attention_indexed", sink_attention_indexed_ref, q, args)(*args)


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[ExpertWeights],
        limit: float) -> torch.Tensor:
    """Routed experts for ``x [T, D]`` with picks ``indices / weights [T, k]`` -> fp32 ``[T, D]``."""
    args = (x, weights, indices, experts, limit)
    return _pick("moe", moe_ref, x, args)(*args)


def swiglu_expert(x: torch.Tensor, expert: ExpertWeights, weight: torch.Tensor | None,
                  limit: float) -> torch.Tensor:
    """One clamped SwiGLU expert (the shared expert) for ``x [T, D]``."""
    args = (x, expert, weight, limit)
    return _pick("swiglu_expert", swiglu_expert_ref, x, args)(*args)
