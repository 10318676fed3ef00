"""The safetensors on-disk format: dtype sizes, the per-tensor record, and a header-only parser.

A file is ``u64 little-endian header length`` + JSON header (``name -> {dtype, shape, data_offsets}``, optional
``__metadata__``) + a data region that the tensors tile exactly. Nothing here imports torch or reads tensor data.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, repeat
from operator import is_, itemgetter, sub
from typing import Final, NamedTuple

from vllm_deepseek_v4.errors import CheckpointError

__all__ = ["DTYPE_BITS", "DTYPE_SIZES", "MAX_HEADER_BYTES", "Checkpoint", "TensorInfo", "parse_header"]

# Bits per element for every dtype code safetensors 0.8 writes (safetensors/src/tensor.rs `Dtype::bitsize`).
DTYPE_BITS: Final[dict[str, int]] = {
    "BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
    "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,                 # sub-byte: packed, rows must fill whole bytes
}
# Bytes per element of the whole-byte dtypes (the sub-byte F4/F6 codes have no byte size).
DTYPE_SIZES: Final[dict[str, int]] = {k: b // 8 for k, b in DTYPE_BITS.items() if b % 8 == 0}
# safetensors refuses larger headers ("header too large"; MAX_HEADER_SIZE in safetensors/src/tensor.rs).
MAX_HEADER_BYTES: Final[int] = 100_000_000
_KNOWN = ", ".join(sorted(DTYPE_BITS))


class TensorInfo(NamedTuple):
    """Where one tensor lives: ``file`` is relative to the artifact root; ``start``/``end`` are data-region offsets.

    A named tuple (immutable, no per-field ``__init__``) so that 69,187 of them are built in C, in bulk. It is
    also the load source of the whole tensor: ``tensor`` and ``ops`` read like ``loader.Source`` (a slice).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes on disk (``end - start``; validated against shape and dtype at scan time)."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def tensor(self) -> str:
        """As a load source: the tensor read is this one (``loader.Source.tensor``)."""
        return self.name

    @property
    def ops(self) -> tuple[()]:
        """As a load source: read whole, no slicing (``loader.Source.ops``)."""
        return ()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A scanned artifact: every tensor's location, the files' sizes and the index (if sharded)."""

    root: str
    tensors: dict[str, TensorInfo]           # files sorted, then data order within a file
    files: dict[str, int]                    # file (relative to root) -> size in bytes
    index_file: str | None = None            # relative to root
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)   # file -> its "__metadata__"

    @property
    def total_bytes(self) -> int:
        """Sum of tensor ``nbytes`` (headers excluded)."""
        infos = self.tensors.values()
        return sum(map(sub, map(itemgetter(5), infos), map(itemgetter(4), infos)))

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]


def _fail(path: str, what: str, expected: object, found: object, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(what, file=path, tensor=tensor, expected=expected, found=found)


def _read_header(path: str, size: int) -> tuple[dict[str, object], int]:
    """Return ``(header JSON, data-region start)`` reading only the first ``8 + header length`` bytes."""
    if size < 8:
        raise _fail(path, "file too short for a safetensors header", "at least 8 bytes", f"{size} bytes")
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        if hlen > size - 8:
            raise _fail(path, "header length beyond end of file", f"at most {size - 8} bytes", f"{hlen} bytes")
        if hlen > MAX_HEADER_BYTES:
            raise _fail(path, "header too large for safetensors", f"at most {MAX_HEADER_BYTES} bytes", f"{hlen} bytes")
        raw = fh.read(hlen)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, "malformed header JSON", "a JSON object", f"invalid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object", "a JSON object", type(header).__name__)
    return header, 8 + hlen


def _all_sizes(values: list[object]) -> bool:
    """True if every value is a non-negative int (bools excluded)."""
    for v in values:
        if type(v) is not int or v < 0:
            return False
    return True


def _entry(path: str, rel: str, name: str, entry: object, data_len: int) -> TensorInfo:
    """Validate one header entry against its dtype, shape and the data region's real length."""
    if not isinstance(entry, dict):
        raise _fail(path, "header entry", "an object {dtype, shape, data_offsets}", type(entry).__name__, name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(path, "unknown dtype", f"one of {_KNOWN}", repr(dtype), name)
    bits = DTYPE_BITS[dtype]
    if type(shape) is not list or not _all_sizes(shape):
        raise _fail(path, "bad shape", "a list of non-negative ints", repr(shape), name)
    if type(offsets) is not list or len(offsets) != 2 or not _all_sizes(offsets):
        raise _fail(path, "bad data_offsets", "a list [start, end] of non-negative ints", repr(offsets), name)
    start, end = offsets
    if end < start:
        raise _fail(path, "data_offsets end before start", f"end >= {start}", f"end {end}", name)
    numel = math.prod(shape)
    if numel * bits % 8:
        raise _fail(path, f"{dtype} shape {shape} does not fill whole bytes", "a multiple of 8 bits",
                    f"{numel * bits} bits", name)
    need = numel * bits // 8
    if end - start != need:
        raise _fail(path, f"data_offsets [{start}, {end}] disagree with {dtype} shape {shape}",
                    f"{need} bytes", f"{end - start} bytes", name)
    if end > data_len:
        raise _fail(path, "tensor data beyond end of file (truncated shard?)",
                    f"data end <= {data_len} bytes", f"data end {end} bytes", name)
    return TensorInfo(name, dtype, tuple(shape), rel, start, end)


_DTYPE, _SHAPE, _OFFSETS = itemgetter("dtype"), itemgetter("shape"), itemgetter("data_offsets")
_SPAN = itemgetter(4, 5)                       # (start, end) of a TensorInfo: the data order
_KNOWN_DTYPES = frozenset(DTYPE_BITS)
_NBYTES, _KIND_DTYPE, _KIND_SHAPE = itemgetter(0), itemgetter(1), itemgetter(2)
_new_info = partial(tuple.__new__, TensorInfo)


_Kind = tuple[str, tuple[int, ...]]            # (dtype, shape)


def _bulk_entries(rel: str, header: dict[str, object], data_len: int,
                  shared: dict[_Kind, tuple[int, str, tuple[int, ...]]]) -> list[TensorInfo] | None:
    """All of ``_entry`` and ``_check_tiling`` in whole-header passes that run in C; None if anything is off.

    Only an accelerator: None hands the header to the per-entry checks, which name the first bad tensor.
    Accepting here implies they accept: the same conditions, tested over all entries at once. ``shared``
    maps each valid (dtype, shape) seen so far to its size in bytes and one copy of each, so that equal
    shapes are one tuple (planning compares them by the thousand).
    """
    entries = header.values()
    if not entries:
        return None
    try:                                        # JSON values: only an object takes a string subscript
        dtypes, shapes = list(map(_DTYPE, entries)), list(map(_SHAPE, entries))
        offsets = list(map(_OFFSETS, entries))
        if not _KNOWN_DTYPES.issuperset(dtypes) or set(map(type, shapes)) != {list} or set(map(len, offsets)) != {2}:
            return None
    except (KeyError, TypeError):               # not an object, a missing field, an unhashable dtype, no len
        return None
    offs = list(chain.from_iterable(offsets))                 # s0 e0 s1 e1 ...
    # every number an exact ``int`` (bools and floats excluded), so equal shapes below are identical shapes
    if set(map(type, offs)) != {int} or not {int}.issuperset(map(type, chain.from_iterable(shapes))):
        return None
    starts, ends = offs[0::2], offs[1::2]
    rows = list(map(shared.get, zip(dtypes, map(tuple, shapes))))     # (bytes, dtype, shape) per kind
    if None in rows:                            # kinds not seen yet (first file, mostly): few
        kinds = list(zip(dtypes, map(tuple, shapes)))
        for kind in set(compress(kinds, map(is_, rows, repeat(None)))):
            if min(kind[1], default=0) < 0 or math.prod(kind[1]) * DTYPE_BITS[kind[0]] % 8:
                return None
            shared[kind] = (math.prod(kind[1]) * DTYPE_BITS[kind[0]] // 8,) + kind
        rows = list(map(shared.__getitem__, kinds))
    if list(map(sub, ends, starts)) != list(map(_NBYTES, rows)) or max(ends) > data_len:
        return None
    infos = list(map(_new_info, zip(header, map(_KIND_DTYPE, rows), map(_KIND_SHAPE, rows), repeat(rel), starts, ends)))
    # tiled from 0 in header order (e_i == s_(i+1), sizes >= 0): offsets are >= 0, and header order is
    # the data order too
    if offs[0] == 0 and offs[-1] == data_len and offs[1:-1:2] == offs[2::2]:
        return infos
    infos.sort(key=_SPAN)
    spans = list(chain.from_iterable(map(_SPAN, infos)))
    if spans[0] != 0 or spans[-1] != data_len or spans[1:-1:2] != spans[2::2]:
        return None
    return infos


def _check_tiling(path: str, infos: list[TensorInfo], data_len: int) -> None:
    """Tensors must cover the data region exactly, as safetensors requires ("file not fully covered")."""
    pos, prev = 0, None
    for info in infos:
        if info.start != pos:
            what = "gap before tensor" if info.start > pos else f"tensor overlaps {prev}"
            raise _fail(path, what, f"data_offsets start {pos}", f"start {info.start}", info.name)
        pos, prev = info.end, info.name
    if pos != data_len:
        raise _fail(path, "trailing bytes after the last tensor", f"data region of {pos} bytes",
                    f"{data_len} bytes", prev)


def parse_header(path: str, rel: str, size: int, shared: dict | None = None) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate one file's header; returns its tensors in data order and its ``__metadata__``.

    ``shared``: a dict kept across the files of one artifact (see ``_bulk_entries``)."""
    header, data_start = _read_header(path, size)
    data_len = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "bad __metadata__", "an object of strings", repr(meta)[:80], "__metadata__")
    infos = _bulk_entries(rel, header, data_len, {} if shared is None else shared)
    if infos is None:
        infos = [_entry(path, rel, name, entry, data_len) for name, entry in header.items()]
        infos.sort(key=_SPAN)
        _check_tiling(path, infos, data_len)
    return infos, meta
