"""Lazy tensor reads: one tensor (or one slice of it) at a time, never a whole shard.

Uses ``safetensors.safe_open`` (memory-mapped) with one cached handle per file; torch and safetensors are
imported on first use so that scanning stays torch-free.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from vllm_deepseek_v4.checkpoint.format import DTYPE_SIZES, Checkpoint, TensorInfo
from vllm_deepseek_v4.errors import CheckpointError, TensorDtypeError, TensorShapeError

if TYPE_CHECKING:
    import torch

__all__ = ["TORCH_DTYPE_NAMES", "TensorReader"]

_T = TypeVar("_T")

# safetensors code -> torch dtype attribute (safetensors/bindings/python/py_src/safetensors/torch.py `_TYPES`).
TORCH_DTYPE_NAMES: Final[dict[str, str]] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",   # two e2m1 values per element, so torch's last dim is half the header's
}


class TensorReader:
    """Reads single tensors of one artifact on demand; use as a context manager to close the file handles."""

    def __init__(self, root: str | os.PathLike[str] | Checkpoint) -> None:
        self.root = root.root if isinstance(root, Checkpoint) else os.path.abspath(os.fspath(root))
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop every cached handle (their memory maps go with them)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Return tensor ``info`` (``shape`` as on disk, torch dtype of ``info.dtype``).

        With safetensors >= 0.8 this is a zero-copy view of the file's memory map (the map lives as long as the
        tensor, even after :meth:`close`); copy it before writing to it.
        """
        handle, path = self._slice_of(info)
        tensor: torch.Tensor = self._call(path, info, lambda: handle.get_tensor(info.name))
        return tensor

    def read_slice(self, info: TensorInfo, dim: int, start: int, length: int) -> torch.Tensor:
        """Return ``tensor[..., start:start + length, ...]`` along ``dim``, materialising only that slice."""
        ndim = len(info.shape)
        path = os.path.join(self.root, info.file)
        if DTYPE_SIZES.get(info.dtype) is None:
            raise TensorDtypeError("cannot slice a packed sub-byte dtype; read() it whole", file=path,
                                   tensor=info.name, expected="a whole-byte dtype", found=info.dtype)
        if not -ndim <= dim < ndim:
            raise TensorShapeError(f"slice dim out of range for shape {list(info.shape)}", file=path,
                                   tensor=info.name, expected=f"dim in [{-ndim}, {ndim})", found=dim)
        dim %= ndim
        size = info.shape[dim]
        if start < 0 or length < 0 or start + length > size:
            raise TensorShapeError(f"slice out of range along dim {dim}", file=path, tensor=info.name,
                                   expected=f"[start, start + length) within [0, {size})",
                                   found=f"[{start}, {start + length})")
        handle, path = self._slice_of(info)
        index = (slice(None),) * dim + (slice(start, start + length),)
        part: torch.Tensor = self._call(path, info, lambda: handle.get_slice(info.name)[index])
        return part

    def _slice_of(self, info: TensorInfo) -> tuple[Any, str]:
        """Open (or reuse) the handle for ``info.file`` and check the header still matches the scan."""
        import torch
        from safetensors import safe_open

        path = os.path.join(self.root, info.file)
        if getattr(torch, TORCH_DTYPE_NAMES.get(info.dtype, ""), None) is None:
            raise TensorDtypeError(f"no torch {torch.__version__} dtype for this safetensors code", file=path,
                                   tensor=info.name, expected=f"one of {sorted(TORCH_DTYPE_NAMES)}", found=info.dtype)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._call(path, info, lambda: safe_open(path, framework="pt"))
            self._handles[info.file] = handle
        meta = self._call(path, info, lambda: handle.get_slice(info.name))
        found = (meta.get_dtype(), tuple(meta.get_shape()))
        if found != (info.dtype, info.shape):
            raise CheckpointError("file changed since it was scanned", file=path, tensor=info.name,
                                  expected=(info.dtype, list(info.shape)), found=(found[0], list(found[1])))
        return handle, path

    @staticmethod
    def _call(path: str, info: TensorInfo, fn: Callable[[], _T]) -> _T:
        """Run a safetensors call, turning its errors into ``CheckpointError`` naming file and tensor."""
        from safetensors import SafetensorError

        try:
            return fn()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError("safetensors could not read it", file=path, tensor=info.name,
                                  hint=str(exc)) from exc
