"""Safetensors artifacts: header-only scanning and validation (torch-free).

``scan_checkpoint(path)`` returns a ``Checkpoint`` mapping every tensor name to its ``TensorInfo``. Errors are
``CheckpointError`` naming file and tensor. Tensors are read through a load plan (``loader.stream``).
"""
from __future__ import annotations

from vllm_deepseek_v4.checkpoint.format import DTYPE_SIZES, Checkpoint, TensorInfo
from vllm_deepseek_v4.checkpoint.scan import scan_checkpoint

__all__ = ["DTYPE_SIZES", "Checkpoint", "TensorInfo", "scan_checkpoint"]
