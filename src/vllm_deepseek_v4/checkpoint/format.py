"""The safetensors on-disk format: dtype tables, the per-tensor record, and a header-only parser.

A file is ``u64 little-endian header length`` + JSON header (``name -> {dtype, shape, data_offsets}``, optional
``__metadata__``) + a data region that the tensors tile exactly. Nothing here imports torch or reads tensor data.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, count, repeat
from operator import eq, itemgetter, le, not_, sub
from typing import Any, Callable, Final, Iterable, NamedTuple, NoReturn

from vllm_deepseek_v4.errors import CheckpointError

__all__ = ["DTYPE_BITS", "DTYPE_SIZES", "TORCH_DTYPE_NAMES", "MAX_HEADER_BYTES", "Checkpoint", "TensorInfo",
           "getter", "parse_header", "unprintable"]

# Bits per element for every dtype code safetensors 0.8 writes (safetensors/src/tensor.rs `Dtype::bitsize`).
DTYPE_BITS: Final[dict[str, int]] = {
    "BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
    "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,                 # sub-byte: packed, rows must fill whole bytes
}
# Bytes per element of the whole-byte dtypes (the sub-byte F4/F6 codes have no byte size).
DTYPE_SIZES: Final[dict[str, int]] = {k: b // 8 for k, b in DTYPE_BITS.items() if b % 8 == 0}
# safetensors code -> torch dtype attribute (safetensors/bindings/python/py_src/safetensors/torch.py `_TYPES`);
# names only, so that this module stays torch-free.
TORCH_DTYPE_NAMES: Final[dict[str, str]] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",   # two e2m1 values per element, so torch's last dim is half the header's
}
# safetensors refuses larger headers ("header too large"; MAX_HEADER_SIZE in safetensors/src/tensor.rs).
MAX_HEADER_BYTES: Final[int] = 100_000_000
_KNOWN = ", ".join(sorted(DTYPE_BITS))
_DTYPES = frozenset(DTYPE_BITS)


class TensorInfo(NamedTuple):
    """Where one tensor lives: ``file`` is relative to the artifact root; ``start``/``end`` are data-region offsets.

    A named tuple (immutable, cheap to build: Flash has 69,187). It is also the load source of the whole
    tensor: ``tensor`` and ``ops`` read like ``loader.records.Source`` (a slice).
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
        """As a load source: the tensor read is this one (``Source.tensor``)."""
        return self.name

    @property
    def ops(self) -> tuple[()]:
        """As a load source: read whole, no slicing (``Source.ops``)."""
        return ()


# Builds a TensorInfo from one tuple without the generated ``__new__`` (a Python-level call per record).
_tensor_info = partial(tuple.__new__, TensorInfo)


def getter(record: type[tuple], *names: str) -> Callable[[tuple], Any]:
    """A getter of the named fields of named-tuple type ``record``, by position (``operator.itemgetter``).

    Mapped over 69k records it costs a third of ``operator.attrgetter``, which looks each name up on the type."""
    return itemgetter(*map(record._fields.index, names))  # type: ignore[attr-defined]


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
        return sum(map(sub, map(getter(TensorInfo, "end"), infos), map(getter(TensorInfo, "start"), infos)))

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]


class _Kind(NamedTuple):
    """A (dtype, shape) pair validated once per artifact: Flash's 69k tensors are ~60 kinds. One ``shape``
    tuple serves every tensor of the kind, so that planning compares equal shapes by identity first."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int | None                 # None: a negative dimension, or elements that do not fill whole bytes


def unprintable(names: Iterable[str]) -> str | None:
    """The first name holding a control or other unprintable character (printed raw, a newline would split the
    one line that names a problem), or None: one C-level pass over the names joined."""
    names = list(names)
    return None if "".join(names).isprintable() else next(n for n in names if not n.isprintable())


def _fail(path: str, what: str, expected: object, found: object, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(what, file=path, tensor=tensor, expected=expected, found=found)


def _read_header(path: str, size: int) -> tuple[dict[str, object], int]:
    """Return ``(header JSON, data-region start)`` reading only the first ``8 + header length`` bytes."""
    if size < 8:
        raise _fail(path, "file too short for a safetensors header", "at least 8 bytes", f"{size} bytes")
    try:
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > size - 8:
                raise _fail(path, "header length beyond end of file", f"at most {size - 8} bytes", f"{hlen} bytes")
            if hlen > MAX_HEADER_BYTES:
                raise _fail(path, "header too large for safetensors", f"at most {MAX_HEADER_BYTES} bytes",
                            f"{hlen} bytes")
            raw = fh.read(hlen)
    except OSError as exc:                     # unreadable (permissions, I/O error); scan stat-ed it already
        raise _fail(path, "cannot read shard", "a readable file", exc.strerror or type(exc).__name__) from None
    if len(raw) < hlen:                        # the file shrank since it was stat-ed
        raise _fail(path, "header cut short", f"{hlen} bytes of header", f"{len(raw)} bytes")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, "malformed header JSON", "a JSON object", f"invalid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, "malformed header JSON", "a JSON object", "nesting too deep") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object", "a JSON object", type(header).__name__)
    # json keeps the last of repeated keys silently, so a tensor listed twice would only show as a gap before
    # the next one. Each entry has one "dtype", "shape" and "data_offsets" key: a count that differs is checked
    # again with the pairs seen (a cost paid only then; the text may also occur inside a string).
    # A name with a control character (a newline would split every report line naming it) is escaped in the
    # JSON text, or non-ASCII (NEL, LINE SEPARATOR): an ASCII header without a backslash has none (fast path).
    if not (raw.isascii() and b"\\" not in raw) and (name := unprintable(header)) is not None:
        raise _fail(path, "tensor name with control characters", "printable characters", ascii(name))
    entries = len(header) - ("__metadata__" in header)
    if any(raw.count(key) != entries for key in (b'"data_offsets"', b'"dtype"', b'"shape"')):
        json.loads(raw, object_pairs_hook=partial(_unique_keys, path))
    return header, 8 + hlen


class _Repeats(dict):
    """An entry that repeats key ``key`` (kept for the header's own hook, which knows the tensor's name)."""

    key = ""


def _unique_keys(path: str, pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook``: refuse a header that lists a tensor twice, or an entry that repeats a field."""
    obj = dict(pairs)
    bad = next(((k, v.key) for k, v in pairs if isinstance(v, _Repeats)), None)
    if bad:
        raise _fail(path, f"header entry repeats the key {bad[1]!r}", "each key once per entry", "it twice", bad[0])
    if len(obj) < len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))   # type: ignore[func-returns-value]
        if not any(isinstance(v, dict) for _, v in pairs):    # an entry (its fields are not objects)
            entry = _Repeats(obj)
            entry.key = dup
            return entry
        raise _fail(path, "tensor listed twice in the header", "each name once", "2 entries", dup)
    return obj


def _is_sizes(value: object, n: int | None = None) -> bool:
    """True if ``value`` is a list of non-negative ints (of length ``n`` if given; bools and floats excluded,
    although they compare equal to ints)."""
    return (type(value) is list and (n is None or len(value) == n) and {int}.issuperset(map(type, value))
            and min(value, default=0) >= 0)


def _is_dtype(value: object) -> bool:
    return isinstance(value, str) and value in DTYPE_BITS


def _known_dtypes(dtypes: list[object]) -> bool:
    try:
        return _DTYPES.issuperset(dtypes)
    except TypeError:                          # an unhashable dtype (a list or an object)
        return False


def _kinds(dtypes: list[str], shapes: list[list[int]], kinds: dict[tuple, _Kind]) -> list[_Kind]:
    """The kind of every entry; kinds not seen in an earlier file of the artifact are added to ``kinds``."""
    found = list(map(kinds.get, zip(dtypes, map(tuple, shapes))))
    if None in found:
        keys = list(zip(dtypes, map(tuple, shapes)))
        for dtype, shape in set(keys).difference(kinds):
            bits = math.prod(shape) * DTYPE_BITS[dtype]
            whole = bits % 8 == 0 and min(shape, default=0) >= 0
            kinds[dtype, shape] = _Kind(dtype, shape, bits // 8 if whole else None)
        found = list(map(kinds.__getitem__, keys))
    return found


def _tiles(spans: list[int], data_len: int) -> bool:
    """True if ``[start0, end0, start1, end1, ...]`` covers ``[0, data_len)`` exactly, in this order."""
    if not spans:
        return data_len == 0
    return spans[0] == 0 and spans[-1] == data_len and spans[1:-1:2] == spans[2::2]


def _refuse(path: str, header: dict[str, object], ok: Iterable[bool],
            error: Callable[[int], tuple[str, object, object]]) -> NoReturn:
    """Raise for the first entry whose ``ok`` is false; ``error(i)`` says (what, expected, found)."""
    i = next(compress(count(), map(not_, ok)))
    raise _fail(path, *error(i), list(header)[i])


def _fields(path: str, header: dict[str, object]) -> tuple[list[str], list[list[int]], list[list[int]], list[int]]:
    """Every entry's dtype, shape and data_offsets, checked for their JSON types, and the offsets flattened
    (``start0 end0 start1 end1 ...``). Numbers are exact ints; their signs are checked with the sizes."""
    entries = header.values()
    try:
        dtypes = list(map(itemgetter("dtype"), entries))
        shapes = list(map(itemgetter("shape"), entries))
        offsets = list(map(itemgetter("data_offsets"), entries))
    except (KeyError, TypeError):               # an entry that is not an object, or lacks a field
        if not all(map(isinstance, entries, repeat(dict))):
            _refuse(path, header, map(isinstance, entries, repeat(dict)), lambda i: (
                "header entry", "an object {dtype, shape, data_offsets}", type(list(entries)[i]).__name__))
        dtypes, shapes, offsets = (list(map(dict.get, entries, repeat(field)))     # a missing field is None
                                   for field in ("dtype", "shape", "data_offsets"))
    if not _known_dtypes(dtypes):
        _refuse(path, header, map(_is_dtype, dtypes), lambda i: ("unknown dtype", f"one of {_KNOWN}", repr(dtypes[i])))
    if not ({list}.issuperset(map(type, shapes)) and {int}.issuperset(map(type, chain.from_iterable(shapes)))):
        _refuse(path, header, map(_is_sizes, shapes),
                lambda i: ("bad shape", "a list of non-negative ints", repr(shapes[i])))
    if not ({list}.issuperset(map(type, offsets)) and {2}.issuperset(map(len, offsets))
            and {int}.issuperset(map(type, spans := list(chain.from_iterable(offsets))))):
        _refuse(path, header, map(_is_sizes, offsets, repeat(2)), lambda i: _offsets_error(offsets[i]))
    return dtypes, shapes, offsets, spans


def _tensor_infos(path: str, rel: str, header: dict[str, object], data_len: int,
                  kinds: dict[tuple, _Kind]) -> list[TensorInfo]:
    """Validate every header entry and return the tensors in data order.

    Each condition is checked over all entries at once (so that 69k entries cost a few C-level passes, not
    69k function calls); when one fails, the first entry that fails it is named. ``kinds`` is shared by the
    files of one artifact.
    """
    dtypes, shapes, offsets, spans = _fields(path, header)
    starts, ends = spans[0::2], spans[1::2]
    found = _kinds(dtypes, shapes, kinds)
    nbytes = list(map(getter(_Kind, "nbytes"), found))
    sizes = list(map(sub, ends, starts))
    if sizes != nbytes:                         # (a kind's None nbytes equals no size)
        _refuse(path, header, map(eq, sizes, nbytes),
                lambda i: _size_error(dtypes[i], shapes[i], starts[i], ends[i], nbytes[i]))
    if max(ends, default=0) > data_len:
        _refuse(path, header, map(le, ends, repeat(data_len)), lambda i: (
            "tensor data beyond end of file (truncated shard?)", f"data end <= {data_len} bytes",
            f"data end {ends[i]} bytes"))
    # the kind's dtype and shape: one object each for all tensors of a kind (hashed and compared once)
    infos = list(map(_tensor_info, zip(header, map(getter(_Kind, "dtype"), found), map(getter(_Kind, "shape"), found),
                                       repeat(rel), starts, ends)))
    if not _tiles(spans, data_len):            # header order is not the data order, or the data is not tiled
        if min(spans) < 0:
            _refuse(path, header, map(_is_sizes, offsets, repeat(2)), lambda i: _offsets_error(offsets[i]))
        infos.sort(key=getter(TensorInfo, "start", "end"))
        if not _tiles(list(chain.from_iterable(map(getter(TensorInfo, "start", "end"), infos))), data_len):
            _refuse_tiling(path, infos, data_len)
    return infos


def _offsets_error(offsets: object) -> tuple[str, str, str]:
    return "bad data_offsets", "a list [start, end] of non-negative ints", repr(offsets)


def _size_error(dtype: str, shape: list[int], start: int, end: int, nbytes: int | None) -> tuple[str, str, str]:
    """Why ``data_offsets`` do not hold a tensor of ``dtype`` and ``shape``: (what, expected, found)."""
    if min(shape, default=0) < 0:
        return "bad shape", "a list of non-negative ints", repr(shape)
    if end < start:
        return "data_offsets end before start", f"end >= {start}", f"end {end}"
    if nbytes is None:
        return (f"{dtype} shape {shape} does not fill whole bytes", "a multiple of 8 bits",
                f"{math.prod(shape) * DTYPE_BITS[dtype]} bits")
    return (f"data_offsets [{start}, {end}] disagree with {dtype} shape {shape}", f"{nbytes} bytes",
            f"{end - start} bytes")


def _refuse_tiling(path: str, infos: list[TensorInfo], data_len: int) -> NoReturn:
    """Name where sorted tensors fail to cover the data region exactly, as safetensors requires ("file not
    fully covered")."""
    pos, prev = 0, None
    for info in infos:
        if info.start != pos:
            what = "gap before tensor" if info.start > pos else f"tensor overlaps {prev}"
            raise _fail(path, what, f"data_offsets start {pos}", f"start {info.start}", info.name)
        pos, prev = info.end, info.name
    raise _fail(path, "trailing bytes after the last tensor", f"data region of {pos} bytes", f"{data_len} bytes", prev)


def parse_header(path: str, rel: str, size: int,
                 kinds: dict | None = None) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and validate one file's header; returns its tensors in data order and its ``__metadata__``.

    ``kinds``: a dict kept across the files of one artifact (each (dtype, shape) is validated once)."""
    header, data_start = _read_header(path, size)
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "bad __metadata__", "an object of strings", repr(meta)[:80], "__metadata__")
    return _tensor_infos(path, rel, header, size - data_start, {} if kinds is None else kinds), meta
