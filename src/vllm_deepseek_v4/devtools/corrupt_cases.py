"""The corrupt-artifact corpus: every case, by category (``corrupt`` holds the record and the editors).

``build_cases(tiny, quant)`` derives them from the two bases' headers: the tiny model (``model.safetensors``,
BF16, 5 layers + 1 MTP layer, 8 experts, hidden 128, vocab 4096) and the FP8 + MXFP4 zoo layout (two shards
and an index). Categories: ``fs`` (files), ``header``, ``index``, ``config``, ``tensors`` (names, shapes,
dtypes), ``mtp``, ``quant`` (companions), ``values`` (one bad element: ``verify --values``), ``benign`` (must
load to the base's logits).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .corrupt import (INDEX, Base, Case, edit_config, edit_header, edit_index, edit_raw, edit_tensors,
                      read_header, write_shard)

__all__ = ["build_cases", "CATEGORIES"]

CATEGORIES = ("fs", "header", "index", "config", "tensors", "mtp", "quant", "values", "benign")
TINY = "model.safetensors"
T = "layers.1.attn.wq_a.weight"             # BF16 [64, 128] in the tiny model, F8_E4M3 in the quant layout


# ---- file-system oddities ----
def _swap(file: str, make: Callable[[Path], None]) -> Callable[[Path], Path]:
    """Replace ``file`` by what ``make(path)`` creates there (a directory, a FIFO, a link)."""
    def mutate(d: Path) -> Path:
        p = d / file
        p.unlink()
        make(p)
        return d
    return mutate


def _link(target: str) -> Callable[[Path], None]:
    return lambda p: os.symlink(target, p)


def _fs_cases(tiny: Base, quant: Base) -> list[Case]:
    q1, q2 = quant.files
    cases = []
    for base, file in (("tiny", TINY), ("quant", q1), ("quant", q2)):
        tag = f"{base}-{file[:11]}"
        cases += [
            Case("fs", f"{tag}-directory", base, _swap(file, Path.mkdir), (file, "a directory")),
            Case("fs", f"{tag}-fifo", base, _swap(file, lambda p: os.mkfifo(p)), (file, "FIFO")),
            Case("fs", f"{tag}-dangling-link", base, _swap(file, _link("gone.safetensors")),
                 (file, "dangling symlink", "gone.safetensors")),
            Case("fs", f"{tag}-self-loop", base, _swap(file, _link(file)), (file, "symlink loop")),
            Case("fs", f"{tag}-empty", base, edit_raw(file, lambda b: b""), (file, "found 0 bytes")),
        ]
    cases += [
        Case("fs", "tiny-missing-shard", "tiny", _swap(TINY, lambda p: None), ("{dir}: no safetensors files",)),
        Case("fs", "quant-missing-shard", "quant", _swap(q2, lambda p: None), (q2, "missing shard", INDEX)),
        Case("fs", "tiny-two-link-loop", "tiny", _two_link_loop, ("loop-a.safetensors", "symlink loop")),
        Case("fs", "tiny-stray-directory", "tiny", lambda d: (d / "extra.safetensors").mkdir() or d,
             ("extra.safetensors", "a directory")),
        Case("fs", "quant-index-directory", "quant", _swap(INDEX, Path.mkdir), (INDEX, "a directory")),
        Case("fs", "quant-index-dangling", "quant", _swap(INDEX, _link("gone.json")), (INDEX, "dangling symlink")),
        Case("fs", "quant-index-fifo", "quant", _swap(INDEX, lambda p: os.mkfifo(p)), (INDEX, "FIFO")),
        Case("fs", "quant-index-loop", "quant", _swap(INDEX, _link(INDEX)), (INDEX, "symlink loop")),
        Case("fs", "no-such-path", "tiny", lambda d: d / "nowhere", ("{dir}/nowhere", "no such file or directory"), exit_code=3),
        Case("fs", "artifact-dangling-link", "tiny", _artifact_link,
             ("{dir}/dangling", "dangling or looping symlink"), exit_code=3),
        Case("fs", "artifact-link-loop", "tiny", _artifact_loop, ("{dir}/loop", "dangling or looping symlink"),
             exit_code=3),
    ]
    return cases


def _two_link_loop(d: Path) -> Path:
    (d / TINY).unlink()
    os.symlink("loop-b.safetensors", d / "loop-a.safetensors")
    os.symlink("loop-a.safetensors", d / "loop-b.safetensors")
    return d


def _artifact_loop(d: Path) -> Path:
    os.symlink(d / "loop", d / "loop")
    return d / "loop"


def _artifact_link(d: Path) -> Path:
    os.symlink(d / "gone", d / "dangling")
    return d / "dangling"


# ---- headers ----
def _set(tensor: str, key: str, value: Any) -> Callable[[dict], None]:
    def fn(h: dict) -> None:
        h[tensor][key] = value
    return fn


def _drop_field(tensor: str, key: str) -> Callable[[dict], None]:
    return lambda h: h[tensor].pop(key) and None


def _repeat_tensor(tensor: str) -> Callable[[dict], str]:
    """The header text with ``tensor``'s entry written twice (json.dumps cannot write a repeated key)."""
    def fn(h: dict) -> str:
        entry = json.dumps(h[tensor], separators=(",", ":"))
        text = json.dumps(h, separators=(",", ":"))
        return text.replace(f'"{tensor}":{entry}', f'"{tensor}":{entry},"{tensor}":{entry}', 1)
    return fn


def _repeat_key(tensor: str) -> Callable[[dict], str]:
    def fn(h: dict) -> str:
        dtype = h[tensor]["dtype"]
        text = json.dumps(h, separators=(",", ":"))
        return text.replace(f'"{tensor}":{{"dtype":"{dtype}"', f'"{tensor}":{{"dtype":"{dtype}","dtype":"{dtype}"', 1)
    return fn


def _overlap(base: Base, file: str, tensor: str) -> tuple[Callable[[dict], None], str]:
    """Move ``tensor``'s bytes onto the tensor before it in the data (same size): they overlap."""
    order = base.in_data_order(file)
    prev = order[order.index(tensor) - 1]
    start, end = base.entries[file][tensor]["data_offsets"]
    p0 = base.entries[file][prev]["data_offsets"][0]
    return _set(tensor, "data_offsets", [p0, p0 + end - start]), prev


def _header_cases(base_name: str, base: Base, file: str, tensor: str, tag: str = "") -> list[Case]:
    """Every header defect on ``tensor`` of ``file``."""
    entry = base.entries[file][tensor]
    start, end = entry["data_offsets"]
    order = base.in_data_order(file)
    last, after = order[-1], order[order.index(tensor) + 1]
    _, data = read_header(base.path / file)
    overlap, prev = _overlap(base, file, tensor)
    other = "BF16" if entry["dtype"] != "BF16" else "F32"

    def c(id: str, fn: Callable, *expect: str) -> Case:
        """A case editing the header JSON of ``file`` with ``fn``."""
        return Case("header", f"{tag or base_name}-{id}", base_name, edit_header(file, fn), (file, *expect))

    def r(id: str, fn: Callable[[bytes], bytes], *expect: str) -> Case:
        """A case editing the raw bytes of ``file`` with ``fn``."""
        return Case("header", f"{tag or base_name}-raw-{id}", base_name, edit_raw(file, fn), (file, *expect))
    return [
        r("length-beyond-eof", lambda b: (len(b) * 2).to_bytes(8, "little") + b[8:],
          "header length beyond end of file"),
        r("length-zero", lambda b: bytes(8) + b[8:], "malformed header JSON"),
        r("length-cut", lambda b: (int.from_bytes(b[:8], "little") - 9).to_bytes(8, "little") + b[8:],
          "malformed header JSON"),
        r("length-over", lambda b: (int.from_bytes(b[:8], "little") + 3).to_bytes(8, "little") + b[8:],
          "malformed header JSON"),
        r("file-7-bytes", lambda b: b[:7], "too short"),
        r("not-utf8", lambda b: b[:9] + b"\xff" + b[10:], "malformed header JSON"),
        r("not-json", lambda b: b[:8] + b"[" + b[9:], "malformed header JSON"),
        r("truncated-data", lambda b: b[:-1], last, "beyond end of file"),
        r("trailing-bytes", lambda b: b + bytes(16), last, "trailing bytes"),
        c("header-is-list", lambda h: json.dumps(list(h)), "not a JSON object"),
        c("tensor-twice", _repeat_tensor(tensor), tensor, "listed twice"),
        c("key-twice", _repeat_key(tensor), tensor, "repeats the key 'dtype'"),
        c("entry-not-object", lambda h: h.__setitem__(tensor, [start, end]), tensor, "header entry"),
        c("no-dtype", _drop_field(tensor, "dtype"), tensor, "unknown dtype"),
        c("no-shape", _drop_field(tensor, "shape"), tensor, "bad shape"),
        c("no-offsets", _drop_field(tensor, "data_offsets"), tensor, "bad data_offsets"),
        c("dtype-unknown", _set(tensor, "dtype", "F9"), tensor, "unknown dtype", "'F9'"),
        c("dtype-list", _set(tensor, "dtype", [entry["dtype"]]), tensor, "unknown dtype"),
        c("dtype-lowercase", _set(tensor, "dtype", entry["dtype"].lower()), tensor, "unknown dtype"),
        c("dtype-other-size", _set(tensor, "dtype", other), tensor, f"disagree with {other}"),
        c("shape-floats", _set(tensor, "shape", [float(x) for x in entry["shape"]]), tensor, "bad shape"),
        c("shape-string", _set(tensor, "shape", "x".join(map(str, entry["shape"]))), tensor, "bad shape"),
        c("shape-negative", _set(tensor, "shape", [-x for x in entry["shape"]]), tensor, "bad shape"),
        c("shape-nested", _set(tensor, "shape", [entry["shape"]]), tensor, "bad shape"),
        c("shape-other-size", _set(tensor, "shape", [entry["shape"][0] // 2, *entry["shape"][1:]]), tensor,
          "disagree with"),
        c("shape-scalar", _set(tensor, "shape", []), tensor, "disagree with"),
        c("shape-huge", _set(tensor, "shape", [2 ** 40, 2 ** 40]), tensor, "disagree with"),
        c("offsets-floats", _set(tensor, "data_offsets", [float(start), float(end)]), tensor, "bad data_offsets"),
        c("offsets-strings", _set(tensor, "data_offsets", [str(start), str(end)]), tensor, "bad data_offsets"),
        c("offsets-three", _set(tensor, "data_offsets", [start, end, end]), tensor, "bad data_offsets"),
        c("offsets-negative", _set(tensor, "data_offsets", [start - len(data), end - len(data)]), tensor,
          "bad data_offsets"),
        c("offsets-reversed", _set(tensor, "data_offsets", [end, start]), tensor, "end before start"),
        c("offsets-past-eof", _set(tensor, "data_offsets", [len(data) + 64, len(data) + 64 + end - start]), tensor,
          "beyond end of file"),
        c("offsets-overlap", overlap, tensor, prev, "overlaps"),
        c("entry-dropped-gap", lambda h: h.pop(tensor) and None, after, "gap before tensor"),
        c("metadata-not-strings", lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
    ]


# ---- index ----
def _index_cases(quant: Base) -> list[Case]:
    q1, q2 = quant.files
    t2 = next(iter(quant.entries[q2]))

    def c(id: str, mutate: Callable, *expect: str) -> Case:
        return Case("index", id, "quant", mutate, (*expect,))
    return [
        c("not-json", edit_index(None, text="{"), INDEX, "malformed index JSON"),
        c("not-utf8", edit_index(None, text=b"\xff\xfe{}"), INDEX, "malformed index JSON"),
        c("a-list", edit_index(lambda i: [i]), INDEX, "index without weight_map"),
        c("no-weight-map", edit_index(lambda i: i.pop("weight_map") and None), INDEX, "index without weight_map"),
        c("empty-weight-map", edit_index(lambda i: i.__setitem__("weight_map", {})), INDEX, "bad weight_map"),
        c("weight-map-list", edit_index(lambda i: i.__setitem__("weight_map", list(i["weight_map"]))), INDEX,
          "bad weight_map"),
        c("file-not-string", edit_index(lambda i: i["weight_map"].__setitem__(T, [q1])), INDEX, T,
          "bad weight_map entry"),
        c("file-outside", edit_index(lambda i: i["weight_map"].__setitem__(T, "../" + q1)), INDEX, T,
          "bad weight_map entry"),
        c("file-absolute", edit_index(lambda i: i["weight_map"].__setitem__(T, "/" + q1)), INDEX, T,
          "bad weight_map entry"),
        c("file-empty", edit_index(lambda i: i["weight_map"].__setitem__(T, "")), INDEX, T, "bad weight_map entry"),
        c("tensor-unlisted", edit_index(lambda i: i["weight_map"].pop(T) and None), q1, T, "tensor not in index"),
        c("tensor-not-in-shard", edit_index(lambda i: i["weight_map"].__setitem__("layers.1.attn.ghost.weight", q1)),
          q1, "layers.1.attn.ghost.weight", "missing from shard header"),
        c("tensor-in-other-shard", edit_index(lambda i: i["weight_map"].__setitem__(T, q2)), q1, T,
          "another shard than the index says"),
        c("tensor-of-shard2-in-shard1", edit_index(lambda i: i["weight_map"].__setitem__(t2, q1)), q2, t2,
          "another shard than the index says"),
        c("shard-not-there", edit_index(lambda i: i["weight_map"].__setitem__(T, "model-00003-of-00003.safetensors")),
          "model-00003-of-00003.safetensors", "missing shard"),
        c("tensor-in-two-shards", _in_both(quant, T), T, q1, q2, "duplicate tensor"),
    ]


def _in_both(quant: Base, tensor: str) -> Callable[[Path], Path]:
    """Copy ``tensor``'s entry and bytes into the second shard as well (the index keeps one file)."""
    q1, q2 = quant.files

    def mutate(d: Path) -> Path:
        h1, data1 = read_header(d / q1)
        h2, data2 = read_header(d / q2)
        s, e = h1[tensor]["data_offsets"]
        h2[tensor] = {**h1[tensor], "data_offsets": [len(data2), len(data2) + e - s]}
        write_shard(d / q2, h2, data2 + data1[s:e])
        return d
    return mutate


# ---- all of them ----
def build_cases(tiny: Base, quant: Base) -> list[Case]:
    """Every case of the corpus, derived from the two bases (``Base.of`` their folders)."""
    from .corrupt_model import benign_cases, config_cases, mtp_cases, quant_cases, tensor_cases, value_cases

    q1, q2 = quant.files
    q2_tensor = next(n for n in quant.in_data_order(q2)[1:-1] if quant.entries[q2][n]["dtype"] != "F8_E8M0")
    cases = (_fs_cases(tiny, quant) + _header_cases("tiny", tiny, TINY, T) + _header_cases("quant", quant, q1, T)
             + _header_cases("quant", quant, q2, q2_tensor, "quant2") + _index_cases(quant) + config_cases()
             + tensor_cases() + mtp_cases() + quant_cases(quant) + value_cases(quant) + benign_cases(quant))
    ids = [c.name for c in cases]
    assert len(ids) == len(set(ids)), "case ids repeat"
    return cases
