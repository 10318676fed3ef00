"""Kernels: an op layer (``dispatch``) over torch references (``<op>_ref``) and, later, Triton kernels."""
from __future__ import annotations

from .dispatch import (BACKENDS, get_backend, grouped_linear, linear, moe, set_backend, sink_attention,
                       swiglu_expert)

__all__ = ["BACKENDS", "get_backend", "set_backend", "linear", "grouped_linear", "sink_attention", "moe",
           "swiglu_expert"]
