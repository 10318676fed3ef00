"""Kernels: an op layer (``dispatch``) over torch references (``<op>_ref``) and Triton kernels (``*_triton``)."""
from __future__ import annotations

from .dispatch import (BACKENDS, get_backend, grouped_linear, interpreting, linear, moe, set_backend,
                       sink_attention, sink_attention_indexed, swiglu_expert)

__all__ = ["BACKENDS", "get_backend", "set_backend", "interpreting", "linear", "grouped_linear", "sink_attention",
           "sink_attention_indexed", "moe", "swiglu_expert"]
