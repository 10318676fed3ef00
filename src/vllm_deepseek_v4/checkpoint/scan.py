"""Find an artifact's safetensors files and scan their headers into one validated ``Checkpoint``.

Header-only and torch-free, so ``dsv4 inspect`` starts fast; the 69,187-tensor DSv4-Flash layout scans in a
fraction of a second. Fails at the first problem, visiting files in sorted order.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, NoReturn

from vllm_deepseek_v4.checkpoint.format import Checkpoint, TensorInfo, getter, parse_header, unprintable
from vllm_deepseek_v4.errors import CheckpointError

__all__ = ["INDEX_NAME", "scan_checkpoint", "gc_paused"]

# transformers' SAFE_WEIGHTS_INDEX_NAME: {"metadata": {...}, "weight_map": {tensor: shard file}}.
INDEX_NAME: Final[str] = "model.safetensors.index.json"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building tens of thousands of records that all stay alive.

    Every collection it would start walks all of them and frees nothing; for the Flash layout that was a
    third of planning time. Nests; restores the collector only if it was on.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _read_index(path: str) -> tuple[dict[str, str], set[str]]:
    """Return the index's ``weight_map`` (tensor -> shard file relative to the index's folder) and its files."""
    _regular_size(path, "index file")
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError("malformed index JSON", file=path, expected="a JSON object",
                              found=f"invalid JSON ({exc})") from None
    except OSError as exc:
        raise _unreadable(path, "index file", exc) from None
    if not isinstance(index, dict) or "weight_map" not in index:
        found = f"keys {sorted(index)}" if isinstance(index, dict) else type(index).__name__
        raise CheckpointError("index without weight_map", file=path, expected='an object with "weight_map"',
                              found=found)
    wmap = index["weight_map"]
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError("bad weight_map", file=path, expected="a non-empty object {tensor: file}",
                              found=repr(wmap)[:80])
    try:
        files = set(wmap.values())              # a few shard names
    except TypeError:                           # an unhashable file value (a list or an object)
        files = None
    if files is None or not all(map(_inside, files)):
        name, rel = next((name, rel) for name, rel in wmap.items() if not _inside(rel))
        raise CheckpointError("bad weight_map entry", file=path, tensor=name,
                              expected="a printable file name inside the artifact folder", found=repr(rel))
    if (name := unprintable(wmap)) is not None:
        raise CheckpointError("bad weight_map entry", file=path, expected="printable tensor names", found=ascii(name))
    return wmap, files


def _inside(rel: object) -> bool:
    """True for a relative file name that stays inside the artifact folder (and is not the folder itself).
    Control characters are refused: printed in a message, a newline or carriage return would split or hide
    the one line that names the problem."""
    return (isinstance(rel, str) and rel.isprintable() and not os.path.isabs(rel) and os.path.normpath(rel) != "."
            and not os.path.normpath(rel).startswith(".."))


# What a path that is not a regular file is, for the message (``stat.S_IFMT`` -> words).
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _unreadable(path: str, what: str, exc: OSError) -> CheckpointError:
    """The one-line error for an ``OSError`` met while stat-ing or opening ``path`` (a shard or the index)."""
    if exc.errno == errno.ELOOP:
        return CheckpointError(f"{what} is a symlink loop", file=path, expected="a symlink that ends at a file",
                               found="too many levels of symbolic links")
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return CheckpointError(f"{what} is a dangling symlink", file=path, expected="a symlink to an existing file",
                               found=f"a link to {os.readlink(path)!r}, which does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{what} is not readable", file=path, expected="read permission",
                               found=exc.strerror or "permission denied")
    return CheckpointError(f"cannot read {what}", file=path, expected="a readable file",
                           found=exc.strerror or type(exc).__name__)


def _regular_size(path: str, what: str) -> int:
    """The size of ``path`` if it is (or links to) a regular file; else a one-line error saying what it is.

    Stat before any open: opening a FIFO for reading would block until a writer comes."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, what, exc) from None
    if not stat.S_ISREG(st.st_mode):
        found = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise CheckpointError(f"{what} is not a regular file", file=path, expected="a regular file", found=found)
    return st.st_size


def _locate(path: str) -> tuple[str, list[str], str | None]:
    """Resolve ``path`` to ``(root, sorted files relative to root, index file or None)``.

    In a folder, every ``*.safetensors`` entry is a shard whatever it is (a directory, a FIFO, a dangling
    link): ``_sizes`` refuses the ones that are not files rather than leaving them out silently."""
    if os.path.isdir(path):
        if os.path.lexists(os.path.join(path, INDEX_NAME)):
            return path, [], INDEX_NAME
        files = sorted(e.name for e in os.scandir(path) if e.name.endswith(".safetensors"))
        if not files:
            raise CheckpointError("no safetensors files", file=path,
                                  expected=f"{INDEX_NAME} or *.safetensors files", found="neither")
        return path, files, None
    root, base = os.path.split(path)
    if base.endswith(".index.json") and os.path.lexists(path):
        return root, [], base
    if base.endswith(".safetensors") and os.path.lexists(path):
        return root, [base], None
    found = "a file of another kind" if os.path.exists(path) else "no such file or directory"
    raise CheckpointError("not a checkpoint", file=path,
                          expected="a .safetensors file, an index .json or a folder of them", found=found)


def _sizes(root: str, files: list[str], index_file: str | None) -> dict[str, int]:
    """Stat every file; with an index, a missing one is a missing shard."""
    sizes: dict[str, int] = {}
    for rel in files:
        path = os.path.join(root, rel)
        if not os.path.lexists(path):
            where = f"listed in {index_file}" if index_file else "found by listing the folder"
            raise CheckpointError("missing shard", file=path,
                                  expected=f"a shard file ({where})", found="no such file")
        sizes[rel] = _regular_size(path, "shard")
    return sizes


def _merge(root: str, per_file: dict[str, list[TensorInfo]]) -> dict[str, TensorInfo]:
    """Join the files' tensors; a name in two files is an error naming both."""
    tensors: dict[str, TensorInfo] = {}
    for infos in per_file.values():
        tensors.update(zip(map(getter(TensorInfo, "name"), infos), infos))
    if len(tensors) < sum(map(len, per_file.values())):
        _refuse_duplicate(root, per_file)
    return tensors


def _refuse_duplicate(root: str, per_file: dict[str, list[TensorInfo]]) -> NoReturn:
    """Name the first tensor, in file order, that an earlier file holds too."""
    first: dict[str, str] = {}
    for rel, infos in per_file.items():
        for info in infos:
            other = first.setdefault(info.name, rel)
            if other != rel:
                raise CheckpointError("duplicate tensor", file=os.path.join(root, rel), tensor=info.name,
                                      expected="one file", found=f"{other} and {rel}")
    raise AssertionError("no tensor is in two files")


def _check_index(root: str, index_file: str, wmap: dict[str, str], per_file: dict[str, list[TensorInfo]],
                 tensors: dict[str, TensorInfo]) -> None:
    """Every header tensor must be in the index, and every indexed tensor in the file the index names."""
    # As many names as the index lists, each listed under its own file: then the two agree exactly.
    if len(wmap) != len(tensors) or not all(
            list(map(wmap.get, map(getter(TensorInfo, "name"), infos))).count(rel) == len(infos)
            for rel, infos in per_file.items()):
        _refuse_index(root, index_file, wmap, per_file, tensors)


def _refuse_index(root: str, index_file: str, wmap: dict[str, str], per_file: dict[str, list[TensorInfo]],
                  tensors: dict[str, TensorInfo]) -> NoReturn:
    """Name the first disagreement between the index and the headers, file by file."""
    listed: dict[str, list[str]] = {}
    for name, rel in wmap.items():
        listed.setdefault(rel, []).append(name)
    for rel, infos in per_file.items():
        path = os.path.join(root, rel)
        for info in infos:
            if info.name not in wmap:
                raise CheckpointError("tensor not in index", file=path, tensor=info.name,
                                      expected=f"it listed in {index_file}", found="no entry")
        for name in sorted(listed.get(rel, ())):
            where = tensors.get(name)
            if where is None:
                raise CheckpointError("tensor listed in index but missing from shard header", file=path,
                                      tensor=name, expected=f"it in {rel} ({index_file})", found="no such tensor")
            if where.file != rel:
                raise CheckpointError("tensor in another shard than the index says",
                                      file=os.path.join(root, where.file), tensor=name,
                                      expected=f"it in {rel} ({index_file})", found=f"it in {where.file}")
    raise AssertionError("the index and the headers agree")


def scan_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Scan a ``.safetensors`` file, an index, or a folder (index if present, else every ``*.safetensors``).

    Reads only headers (never tensor data) and raises ``CheckpointError`` at the first inconsistency.
    """
    with gc_paused():
        return _scan(path)


def _scan(path: str | os.PathLike[str]) -> Checkpoint:
    root, files, index_file = _locate(os.path.abspath(os.fspath(path)))
    wmap = None
    if index_file is not None:
        wmap, rels = _read_index(os.path.join(root, index_file))
        files = sorted(rels)
    sizes = _sizes(root, files, index_file)
    per_file: dict[str, list[TensorInfo]] = {}
    metadata: dict[str, dict[str, str]] = {}
    kinds: dict = {}                            # (dtype, shape) pairs, validated once per artifact
    for rel in files:
        per_file[rel], metadata[rel] = parse_header(os.path.join(root, rel), rel, sizes[rel], kinds)
    tensors = _merge(root, per_file)
    if wmap is not None:
        assert index_file is not None
        _check_index(root, index_file, wmap, per_file, tensors)
    return Checkpoint(root=root, tensors=tensors, files=sizes, index_file=index_file, metadata=metadata)
