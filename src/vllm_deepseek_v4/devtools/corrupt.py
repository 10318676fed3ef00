"""A corpus of broken (and benignly changed) artifacts, derived from two good ones, for ``tests/test_corpus.py``.

The bases are the shipped tiny model (one BF16 ``model.safetensors``) and one quantized zoo layout
(``upstream_fp8_mxfp4``: FP8 block + MXFP4, two shards and an index). Each :class:`Case` names its category,
the base it starts from, a function that breaks a copy of it, and what must follow: ``dsv4 verify`` exits
``exit_code`` with one output line naming every string of ``expect`` (the file and/or tensor at fault). A
benign case instead must verify and load to the same logits as its base. Expectations are read off the base
headers where they depend on the layout (which tensor lies last in a shard), never off the loader's output.

The cases themselves are in ``corrupt_cases``; this module holds the record, the copying and the editors.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Case", "Base", "copy_base", "read_header", "write_shard", "edit_header", "edit_raw", "edit_config",
           "edit_tensors", "edit_index", "edit_element", "write_quant_base", "write_bases", "INDEX"]

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Case:
    """One corpus entry. ``mutate(dir)`` breaks the copy ``dir`` in place and returns the path to check
    (usually ``dir``). ``expect``: strings that one line of the output must all contain (``{dir}`` stands for
    the copy's folder)."""

    category: str
    id: str
    base: str                                   # "tiny" | "quant"
    mutate: Callable[[Path], Path]
    expect: tuple[str, ...] = ()
    exit_code: int = 1
    benign: bool = False                        # verifies clean and loads to the base's logits
    load: bool = False                          # also try the portable load (it must refuse with our error)
    values: bool = False                        # checked by ``dsv4 verify --values`` (headers are fine)

    @property
    def name(self) -> str:
        return f"{self.category}/{self.id}"


@dataclass(frozen=True)
class Base:
    """A good artifact the cases start from: its folder, its shard files and each tensor's header entry."""

    path: Path
    files: tuple[str, ...]                      # shard names, sorted
    entries: dict[str, dict[str, dict[str, Any]]]   # file -> tensor -> {dtype, shape, data_offsets} (file order)

    @classmethod
    def of(cls, path: Path) -> "Base":
        files = tuple(sorted(p.name for p in path.glob("*.safetensors")))
        entries = {}
        for f in files:
            header, _ = read_header(path / f)
            header.pop("__metadata__", None)
            entries[f] = header
        return cls(path, files, entries)

    def file_of(self, tensor: str) -> str:
        return next(f for f, h in self.entries.items() if tensor in h)

    def in_data_order(self, file: str) -> list[str]:
        h = self.entries[file]
        return sorted(h, key=lambda n: h[n]["data_offsets"])


def copy_base(base: Path, dest: Path) -> Path:
    """A copy of ``base`` whose files are hard links (cheap; every editor replaces a file, never writes into
    it, so the base stays intact)."""
    shutil.copytree(base, dest, copy_function=os.link)
    return dest


def _replace(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a new file (unlinking first: the old one may be a hard link to the base)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


# ---- safetensors headers ----
def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(header JSON, data region)`` of a well-formed shard (the bases only)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(path: Path, header: dict[str, Any] | str | bytes, data: bytes) -> None:
    """Write a shard from a header (an object, or its JSON text as given, duplicates and all) and data."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header, separators=(",", ":"))
    body = text.encode() if isinstance(text, str) else text
    _replace(path, struct.pack("<Q", len(body)) + body + data)


def edit_header(file: str, fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    """A mutation: ``fn(header)`` edits the header of ``file`` in place (or returns replacement JSON text)."""
    def mutate(d: Path) -> Path:
        header, data = read_header(d / file)
        out = fn(header)
        write_shard(d / file, header if out is None else out, data)
        return d
    return mutate


def edit_raw(file: str, fn: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A mutation of the whole bytes of ``file``."""
    def mutate(d: Path) -> Path:
        _replace(d / file, fn((d / file).read_bytes()))
        return d
    return mutate


def edit_config(fn: Callable[[dict[str, Any]], Any] | None, *,
                text: str | bytes | None = None) -> Callable[[Path], Path]:
    """A mutation of ``config.json``: ``fn(cfg)`` edits it (or returns a replacement value); ``text`` replaces it
    verbatim."""
    def mutate(d: Path) -> Path:
        if text is not None:
            _replace(d / "config.json", text)
            return d
        cfg = json.loads((d / "config.json").read_text())
        out = fn(cfg)                           # type: ignore[misc]
        _replace(d / "config.json", json.dumps(cfg if out is None else out))
        return d
    return mutate


def edit_index(fn: Callable[[dict[str, Any]], Any] | None, *, text: str | bytes | None = None) -> Callable[[Path], Path]:
    """A mutation of the index: ``fn(index)`` edits it (or returns a replacement value), or ``text`` verbatim."""
    def mutate(d: Path) -> Path:
        if text is not None:
            _replace(d / INDEX, text)
            return d
        index = json.loads((d / INDEX).read_text())
        out = fn(index)                         # type: ignore[misc]
        _replace(d / INDEX, json.dumps(index if out is None else out))
        return d
    return mutate


def edit_element(file: str, tensor: str, index: int, value: bytes) -> Callable[[Path], Path]:
    """A mutation of the data only: element ``index`` (flat, ``len(value)`` bytes each) of ``tensor`` in
    ``file`` becomes ``value``; the header is untouched."""
    def mutate(d: Path) -> Path:
        header, data = read_header(d / file)
        at = header[tensor]["data_offsets"][0] + index * len(value)
        write_shard(d / file, header, data[:at] + value + data[at + len(value):])
        return d
    return mutate


def edit_tensors(fn: Callable[[dict[str, Any]], Any], *, shards: int | None = None,
                 index: bool | None = None) -> Callable[[Path], Path]:
    """A mutation through torch: ``fn(tensors)`` edits the artifact's tensors (name -> tensor) in place, then
    they are written again. Each kept tensor stays in its shard and a new one goes to the first shard, unless
    ``shards`` asks for a new split (names in sorted order); ``index`` (default: as before) writes an index."""
    def mutate(d: Path) -> Path:
        from safetensors.torch import load_file, save_file

        files = sorted(p.name for p in d.glob("*.safetensors"))
        had_index = (d / INDEX).exists()
        tensors, home = {}, {}
        for f in files:
            for name, t in load_file(str(d / f)).items():
                tensors[name], home[name] = t, f
            (d / f).unlink()
        fn(tensors)
        names = list(tensors)
        if shards is not None:
            per = -(-len(names) // shards)
            home = {n: f"model-{i // per + 1:05d}-of-{shards:05d}.safetensors" for i, n in enumerate(sorted(names))}
        groups: dict[str, dict[str, Any]] = {}
        for n in names:
            groups.setdefault(home.get(n, files[0]), {})[n] = tensors[n].contiguous()
        for f, group in groups.items():
            save_file(group, str(d / f), metadata={"format": "pt"})
        if index if index is not None else had_index:
            wmap = {n: f for f, group in groups.items() for n in group}
            _replace(d / INDEX, json.dumps({"metadata": {}, "weight_map": wmap}))
        elif had_index:
            (d / INDEX).unlink()
        return d
    return mutate


# ---- the quantized base ----
def write_quant_base(out: Path, layout: str = "upstream_fp8_mxfp4") -> Path:
    """Write one zoo layout of the shipped tiny model at ``out`` (what ``scripts/build_zoo.py`` writes)."""
    from ..assets import tiny_model_path
    from . import zoo

    src = tiny_model_path()
    floats, raw_cfg, cfg = zoo.read_source(src)
    zoo.write_layout(out, layout, floats, raw_cfg, cfg)
    zoo.copy_tokenizer(src, out)
    return out


def write_bases(root: Path) -> dict[str, Base]:
    """Both bases under ``root``: ``tiny`` (a copy of the shipped model) and ``quant`` (its FP8 + MXFP4 layout)."""
    from ..assets import tiny_model_path

    shutil.copytree(tiny_model_path(), root / "tiny")
    write_quant_base(root / "quant")
    return {"tiny": Base.of(root / "tiny"), "quant": Base.of(root / "quant")}
