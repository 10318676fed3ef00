"""Safetensors artifacts: header-only scanning and validation (torch-free), and lazy single-tensor reads.

``scan_checkpoint(path)`` returns a ``Checkpoint`` mapping every tensor name to its ``TensorInfo``;
``TensorReader`` reads one tensor or slice at a time. Errors are ``CheckpointError`` naming file and tensor.
"""
from __future__ import annotations

from vllm_deepseek_v4.checkpoint.format import DTYPE_SIZES, Checkpoint, TensorInfo
from vllm_deepseek_v4.checkpoint.reader import TensorReader
from vllm_deepseek_v4.checkpoint.scan import scan_checkpoint

__all__ = ["DTYPE_SIZES", "Checkpoint", "TensorInfo", "TensorReader", "scan_checkpoint"]
