"""Tests for ``vllm_deepseek_v4.checkpoint``: header scanning, validation errors, reads at the scanned offsets
(through ``loader.stream.PositionalReader``, the reader loading uses), the DSv4-Flash layout."""
from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vllm_deepseek_v4.checkpoint import DTYPE_SIZES, Checkpoint, TensorInfo, scan_checkpoint
from vllm_deepseek_v4.errors import CheckpointError
from vllm_deepseek_v4.loader.records import Source
from vllm_deepseek_v4.loader.stream import PositionalReader

INDEX = "model.safetensors.index.json"

# torch dtype -> safetensors code, for every dtype the reader must round-trip exactly.
CODES = {
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.uint8: "U8", torch.int8: "I8",
    torch.int32: "I32", torch.int64: "I64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
}


# --------------------------------------------------------------------------------------------- fixtures


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs included), so equality is checked on raw bytes."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * DTYPE_SIZES[CODES[dtype]],), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and raw bytes (so NaN payloads compare equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                                                     b.reshape(-1).contiguous().view(torch.uint8))


def small_tensors(prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}w": make_tensor((4, 6), torch.bfloat16, 1), f"{prefix}b": make_tensor((6,), torch.float32, 2)}


def make_checkpoint(tmp_path: Path, shards: dict[str, dict[str, torch.Tensor]], *, index: bool = True) -> Path:
    """Write ``shards`` (file -> tensors) under ``tmp_path``, plus an index listing them when asked."""
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    if index:
        wmap = {t: name for name, tensors in shards.items() for t in tensors}
        (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return tmp_path


def two_shards(tmp_path: Path, *, index: bool = True) -> Path:
    return make_checkpoint(tmp_path, {"m-1.safetensors": small_tensors("a."), "m-2.safetensors": small_tensors("b.")},
                           index=index)


def read_raw(path: Path) -> tuple[dict, bytes]:
    """Split a safetensors file into its header JSON and its data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> Path:
    """Write a safetensors file by hand (for corrupt cases)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def entry(dtype: str, shape: list[int], offsets: list[int]) -> dict:
    """One hand-written header entry."""
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def edit_index(root: Path, fn) -> None:
    index = json.loads((root / INDEX).read_text())
    fn(index["weight_map"])
    (root / INDEX).write_text(json.dumps(index))


def msg(path: Path, tensor: str | None, text: str) -> str:
    """Anchored regex for the whole ``"{file}: {tensor}: {text}"`` message."""
    head = f"{path}: " + (f"{tensor}: " if tensor else "")
    return "^" + re.escape(head + text) + "$"


@pytest.fixture(scope="session")
def flash(flash_dir: Path) -> Path:
    """The published DSv4-Flash layout as a sparse artifact (``devtools.flash``, materialised by conftest)."""
    return flash_dir


# --------------------------------------------------------------------------------------------- scanning


def test_single_file_scan_records_dtype_shape_file_and_offsets(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2, 3, dtype=torch.bfloat16), "s": torch.zeros((), dtype=torch.float32)},
              str(tmp_path / "one.safetensors"), metadata={"format": "pt"})
    ckpt = scan_checkpoint(tmp_path / "one.safetensors")
    header, _ = read_raw(tmp_path / "one.safetensors")
    x0, x1 = header["x"]["data_offsets"]
    assert ckpt["x"] == TensorInfo("x", "BF16", (2, 3), "one.safetensors", x0, x1)
    assert (ckpt["x"].nbytes, ckpt["x"].numel, ckpt["s"].shape, ckpt["s"].numel) == (12, 6, (), 1)
    size = (tmp_path / "one.safetensors").stat().st_size
    assert (ckpt.root, ckpt.index_file, ckpt.files) == (str(tmp_path), None, {"one.safetensors": size})
    assert ckpt.metadata == {"one.safetensors": {"format": "pt"}}
    assert (len(ckpt), "x" in ckpt, "y" in ckpt, ckpt.total_bytes) == (2, True, False, 16)
    assert Checkpoint(root=str(tmp_path), tensors={}, files={}).total_bytes == 0


def test_sharded_dir_with_index_scans_every_listed_shard(tmp_path: Path) -> None:
    ckpt = scan_checkpoint(two_shards(tmp_path))
    assert ckpt.index_file == INDEX
    assert list(ckpt.files) == ["m-1.safetensors", "m-2.safetensors"]
    assert {n: t.file for n, t in ckpt.tensors.items()} == {
        "a.b": "m-1.safetensors", "a.w": "m-1.safetensors", "b.b": "m-2.safetensors", "b.w": "m-2.safetensors"}
    assert ckpt.total_bytes == 2 * (4 * 6 * 2 + 6 * 4)


def test_dir_with_index_ignores_safetensors_files_it_does_not_list(tmp_path: Path) -> None:
    two_shards(tmp_path)
    save_file({"other": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))
    assert "other" not in scan_checkpoint(tmp_path)


def test_index_json_path_scans_like_its_folder(tmp_path: Path) -> None:
    two_shards(tmp_path)
    assert scan_checkpoint(tmp_path / INDEX).tensors == scan_checkpoint(tmp_path).tensors


def test_dir_without_index_scans_every_safetensors_file(tmp_path: Path) -> None:
    ckpt = scan_checkpoint(two_shards(tmp_path, index=False))
    assert ckpt.index_file is None
    assert sorted(ckpt.tensors) == ["a.b", "a.w", "b.b", "b.w"]
    assert list(ckpt.files) == ["m-1.safetensors", "m-2.safetensors"]


def test_dir_without_safetensors_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=msg(
            tmp_path, None, f"no safetensors files: expected {INDEX} or *.safetensors files, found neither")):
        scan_checkpoint(tmp_path)


def test_nonexistent_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such file or directory$"):
        scan_checkpoint(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- index errors


def test_malformed_index_json_error_names_index(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / INDEX))}: malformed index JSON: "
                                              r"expected a JSON object, found invalid JSON \(.*\)$"):
        scan_checkpoint(tmp_path)


def test_index_without_weight_map_error_names_index(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=msg(
            tmp_path / INDEX, None,
            """index without weight_map: expected an object with "weight_map", found keys ['metadata']""")):
        scan_checkpoint(tmp_path)


def test_missing_shard_error_names_shard_and_index(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "m-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=msg(
            tmp_path / "m-2.safetensors", None,
            f"missing shard: expected a shard file (listed in {INDEX}), found no such file")):
        scan_checkpoint(tmp_path)


@pytest.mark.parametrize("file", ["\r", "m-\n2.safetensors", "a\x00b", "\x1b[31mm-2.safetensors"])
def test_shard_name_with_control_characters_is_refused_on_one_line(tmp_path: Path, file: str) -> None:
    """Printed raw, the name would split the message (newline), hide its start (carriage return) or drive the
    terminal (escape): the index entry is refused, the name shown as its repr (found by test_fuzz's index
    mutations)."""
    two_shards(tmp_path)
    edit_index(tmp_path, lambda wmap: wmap.update({"b.w": file}))
    with pytest.raises(CheckpointError, match=msg(
            tmp_path / INDEX, "b.w",
            f"bad weight_map entry: expected a printable file name inside the artifact folder, found {file!r}")):
        scan_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["a.\nw", "\ra.w", "a.\x1b[2Kw", "a.\x85w"])
def test_tensor_name_with_control_characters_is_refused_on_one_line(tmp_path: Path, name: str) -> None:
    """A header may name a tensor with any JSON string; printed raw, a newline would split every report line
    that names it. The shard is refused, the name shown escaped (``ascii``)."""
    f = write_raw(tmp_path / "model.safetensors", {"a.ok": entry("F32", [1], [0, 4]), name: entry("F32", [1], [4, 8])},
                  b"\0" * 8)
    with pytest.raises(CheckpointError) as e:
        scan_checkpoint(tmp_path)
    assert str(e.value) == (f"{f}: tensor name with control characters: expected printable characters, "
                            f"found {ascii(name)}")
    assert str(e.value).isprintable()


def test_index_tensor_name_with_control_characters_is_refused_on_one_line(tmp_path: Path) -> None:
    two_shards(tmp_path)
    edit_index(tmp_path, lambda wmap: wmap.update({"b.\nw": "m-2.safetensors"}))
    with pytest.raises(CheckpointError, match=msg(tmp_path / INDEX, None, "bad weight_map entry: expected "
                                                  "printable tensor names, found 'b.\\nw'")):
        scan_checkpoint(tmp_path)


# (edit of the index's weight_map, shard the error names, tensor it names, reason)
INDEX_EDITS = {
    "listed in index, missing from shard": (
        lambda wmap: wmap.update({"a.ghost": "m-1.safetensors"}), "m-1.safetensors", "a.ghost",
        f"tensor listed in index but missing from shard header: expected it in m-1.safetensors ({INDEX}), "
        "found no such tensor"),
    "in shard, not in index": (
        lambda wmap: wmap.pop("b.w"), "m-2.safetensors", "b.w",
        f"tensor not in index: expected it listed in {INDEX}, found no entry"),
    "in another shard than the index says": (
        lambda wmap: wmap.update({"b.w": "m-1.safetensors"}), "m-2.safetensors", "b.w",
        f"tensor in another shard than the index says: expected it in m-1.safetensors ({INDEX}), "
        "found it in m-2.safetensors"),
}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_index_disagreeing_with_shards_error_names_file_and_tensor(tmp_path: Path, case: str) -> None:
    edit, shard, tensor, reason = INDEX_EDITS[case]
    two_shards(tmp_path)
    edit_index(tmp_path, edit)
    with pytest.raises(CheckpointError, match=msg(tmp_path / shard, tensor, reason)):
        scan_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards_error_names_both_files(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, {"m-1.safetensors": small_tensors("a."), "m-2.safetensors": {"a.w": torch.zeros(1)}},
                    index=False)
    with pytest.raises(CheckpointError, match=msg(
            tmp_path / "m-2.safetensors", "a.w",
            "duplicate tensor: expected one file, found m-1.safetensors and m-2.safetensors")):
        scan_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------- header errors


def test_truncated_shard_error_names_file_and_tensor(tmp_path: Path) -> None:
    two_shards(tmp_path)
    path = tmp_path / "m-2.safetensors"
    header, _ = read_raw(path)
    last = max(header, key=lambda n: header[n]["data_offsets"][1] if n != "__metadata__" else -1)
    end = header[last]["data_offsets"][1]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=msg(
            path, last, f"tensor data beyond end of file (truncated shard?): expected data end <= {end - 10} bytes, "
                        f"found data end {end} bytes")):
        scan_checkpoint(tmp_path)


def test_corrupt_header_json_error_names_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bad.safetensors", b'{"x": {"dtype": "F32",', b"")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: malformed header JSON: "
                                              r"expected a JSON object, found invalid JSON \(.*\)$"):
        scan_checkpoint(path)


def test_header_that_is_not_an_object_error_names_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bad.safetensors", b"[1, 2]", b"")
    with pytest.raises(CheckpointError, match=msg(
            path, None, "header is not a JSON object: expected a JSON object, found list")):
        scan_checkpoint(path)


def test_header_length_beyond_eof_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=msg(
            path, None, "header length beyond end of file: expected at most 2 bytes, found 1000 bytes")):
        scan_checkpoint(path)


def test_unknown_dtype_error_names_file_and_tensor(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bad.safetensors", {"x": entry("F12", [2], [0, 3])}, b"\0" * 3)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: x: unknown dtype: "
                                              r"expected one of BF16, BOOL, .*F8_E8M0.*, found 'F12'$"):
        scan_checkpoint(path)


BAD_ENTRIES = {   # case -> (header, data bytes, tensor named, message after "{file}: {tensor}: ")
    "offsets_disagree_with_shape": ({"x": entry("BF16", [2, 3], [0, 10])}, 10, "x",
                                    "data_offsets [0, 10] disagree with BF16 shape [2, 3]: "
                                    "expected 12 bytes, found 10 bytes"),
    "offsets_end_before_start": ({"x": entry("U8", [0], [4, 2])}, 4, "x",
                                 "data_offsets end before start: expected end >= 4, found end 2"),
    "offsets_not_a_pair": ({"x": entry("U8", [2], [0, 1, 2])}, 2, "x",
                           "bad data_offsets: expected a list [start, end] of non-negative ints, found [0, 1, 2]"),
    "trailing_bytes": ({"x": entry("U8", [2], [0, 2])}, 6, "x",
                       "trailing bytes after the last tensor: expected data region of 2 bytes, found 6 bytes"),
    "overlapping_tensors": ({"x": entry("U8", [4], [0, 4]), "y": entry("U8", [2], [2, 4])}, 4, "y",
                            "tensor overlaps x: expected data_offsets start 4, found start 2"),
    "gap_between_tensors": ({"x": entry("U8", [2], [0, 2]), "y": entry("U8", [2], [3, 5])}, 5, "y",
                            "gap before tensor: expected data_offsets start 2, found start 3"),
    "entry_not_an_object": ({"x": entry("U8", [2], [0, 2]), "y": [1]}, 2, "y",
                            "header entry: expected an object {dtype, shape, data_offsets}, found list"),
    "offsets_missing": ({"x": {"dtype": "U8", "shape": [2]}}, 2, "x",
                        "bad data_offsets: expected a list [start, end] of non-negative ints, found None"),
    # JSON true and 2.0 compare equal to ints, but safetensors reads only unsigned integers
    "bool_in_shape": ({"x": entry("U8", [True], [0, 1])}, 1, "x",
                      "bad shape: expected a list of non-negative ints, found [True]"),
    "float_offset": ({"x": entry("U8", [2], [0, 2.0])}, 2, "x",
                     "bad data_offsets: expected a list [start, end] of non-negative ints, found [0, 2.0]"),
    "negative_offsets": ({"x": entry("U8", [2], [-2, 0])}, 0, "x",
                         "bad data_offsets: expected a list [start, end] of non-negative ints, found [-2, 0]"),
    "negative_dimension": ({"x": entry("U8", [-1], [0, 0])}, 0, "x",
                           "bad shape: expected a list of non-negative ints, found [-1]"),
    "sub_byte_rows": ({"x": entry("F4", [3], [0, 1])}, 1, "x",
                      "F4 shape [3] does not fill whole bytes: expected a multiple of 8 bits, found 12 bits"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_inconsistent_offsets_error_names_file_and_tensor(tmp_path: Path, case: str) -> None:
    header, nbytes, tensor, text = BAD_ENTRIES[case]
    path = write_raw(tmp_path / "bad.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=msg(path, tensor, text)):
        scan_checkpoint(path)


def test_unhashable_dtype_is_an_unknown_dtype(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bad.safetensors", {"x": entry(["U8"], [2], [0, 2])}, b"\0" * 2)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r": x: unknown dtype: expected one of .*, found \['U8'\]$"):
        scan_checkpoint(path)


def test_header_order_need_not_be_data_order(tmp_path: Path) -> None:
    header = {"b": entry("U8", [3], [2, 5]), "a": entry("BF16", [1], [0, 2]), "c": entry("F4", [2, 2], [5, 7])}
    ckpt = scan_checkpoint(write_raw(tmp_path / "m.safetensors", header, b"\0" * 7))
    assert [(i.name, i.start, i.end) for i in ckpt.tensors.values()] == [("a", 0, 2), ("b", 2, 5), ("c", 5, 7)]
    assert ckpt["c"].shape == (2, 2) and ckpt.total_bytes == 7


@settings(deadline=None, derandomize=True, max_examples=30)
@given(st.lists(st.tuples(st.sampled_from(sorted(CODES, key=str)), st.lists(st.integers(0, 5), max_size=3)),
                min_size=1, max_size=6))
def test_scan_matches_what_save_file_wrote(specs: list[tuple[torch.dtype, list[int]]]) -> None:
    tensors = {f"t.{i}": make_tensor(tuple(shape), dtype, i) for i, (dtype, shape) in enumerate(specs)}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/x.safetensors")
        ckpt = scan_checkpoint(f"{tmp}/x.safetensors")
        assert {n: (i.dtype, i.shape) for n, i in ckpt.tensors.items()} == {
            n: (CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()}
        with PositionalReader(ckpt) as reader:
            assert all(same_bits(reader.read_source(ckpt[n]), t) for n, t in tensors.items())


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dtype", list(CODES), ids=str)
def test_read_returns_exact_values_written(tmp_path: Path, dtype: torch.dtype) -> None:
    written = {"x": make_tensor((3, 5), dtype, 7), "y": make_tensor((2,), dtype, 8)}
    save_file(written, str(tmp_path / "m.safetensors"))
    ckpt = scan_checkpoint(tmp_path / "m.safetensors")
    assert ckpt["x"].dtype == CODES[dtype]
    with PositionalReader(ckpt) as reader:
        assert same_bits(reader.read_source(ckpt["x"]), written["x"])
        assert same_bits(reader.read_source(ckpt["y"]), written["y"])


def narrowed(info: TensorInfo, dim: int, start: int, length: int) -> Source:
    """``info`` as a load source that reads ``[start, start + length)`` along ``dim``."""
    shape = list(info.shape)
    shape[dim] = length
    return Source(tensor=info.name, dtype=info.dtype, shape=tuple(shape), file=info.file,
                  ops=(("narrow", dim, start, length),))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("dim", "start", "length"), [(0, 1, 2), (1, 2, 3), (-1, 0, 5), (2, 3, 1), (0, 4, 0)])
def test_read_of_a_slice_returns_that_slice(tmp_path: Path, dtype: torch.dtype, dim: int, start: int,
                                            length: int) -> None:
    full = make_tensor((4, 6, 5), dtype, 3)
    save_file({"x": full}, str(tmp_path / "m.safetensors"))
    ckpt = scan_checkpoint(tmp_path)
    with PositionalReader(ckpt) as reader:
        got = reader.read_source(narrowed(ckpt["x"], dim, start, length))
    assert same_bits(got, full.narrow(dim, start, length))


def test_read_of_dtype_without_torch_equivalent_is_an_error(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"x": entry("F6_E2M3", [4], [0, 3])}, b"\0" * 3)
    ckpt = scan_checkpoint(path)
    with PositionalReader(ckpt) as reader, pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: x: "
                                                         r"no torch .* dtype for this safetensors code: .*found F6_E2M3$"):
        reader.read_source(ckpt["x"])


def test_read_of_file_changed_since_scan_is_an_error(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(4, dtype=torch.float32)}, str(tmp_path / "m.safetensors"))
    ckpt = scan_checkpoint(tmp_path)
    size = (tmp_path / "m.safetensors").stat().st_size
    save_file({"x": torch.zeros(2, dtype=torch.float64), "y": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    with PositionalReader(ckpt) as reader, pytest.raises(CheckpointError, match=msg(
            tmp_path / "m.safetensors", "x",
            f"file changed since it was scanned: expected {size} bytes, found "
            f"{(tmp_path / 'm.safetensors').stat().st_size} bytes")):
        reader.read_source(ckpt["x"])


# --------------------------------------------------------------------------------------------- DSv4-Flash layout

FLASH_TENSORS = 69_187
# The tool names 46 shards (-of-00046) but places no tensor in shard 00044, so 45 files exist.
FLASH_FILES = 45
FLASH_BYTES = 159_609_485_896   # 148.65 GiB: sum over the inventory of numel * itemsize


def test_flash_layout_scans_every_tensor_and_byte(flash: Path) -> None:
    ckpt = scan_checkpoint(flash)
    assert (len(ckpt), len(ckpt.files), ckpt.total_bytes) == (FLASH_TENSORS, FLASH_FILES, FLASH_BYTES)
    embed = TensorInfo("embed.weight", "BF16", (129280, 4096), "model-00001-of-00046.safetensors", 0, 129280 * 4096 * 2)
    assert ckpt["embed.weight"] == embed
    assert ckpt["layers.0.ffn.experts.255.w2.weight"].dtype == "I8"
    assert ckpt["mtp.0.e_proj.scale"].file == "model-00046-of-00046.safetensors"


def test_flash_layout_reads_single_tensors_and_slices_of_huge_ones(flash: Path) -> None:
    ckpt = scan_checkpoint(flash)
    with PositionalReader(ckpt) as reader:
        scale = reader.read_source(ckpt["layers.0.attn.wq_a.scale"])
        rows = reader.read_source(narrowed(ckpt["embed.weight"], 0, 129278, 2))
    assert (scale.dtype, tuple(scale.shape)) == (torch.float8_e8m0fnu, (8, 32))
    assert (rows.dtype, tuple(rows.shape), bool(rows.eq(0).all())) == (torch.bfloat16, (2, 4096), True)


def test_flash_scan_does_not_import_torch(flash: Path) -> None:
    code = ("import sys; from vllm_deepseek_v4.checkpoint import scan_checkpoint; "
            "c = scan_checkpoint(sys.argv[1]); assert 'torch' not in sys.modules, 'torch imported'; print(len(c))")
    out = subprocess.run([sys.executable, "-c", code, str(flash)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(FLASH_TENSORS)


# --------------------------------------------------------------------------------------------- unreadable files


def test_unreadable_shard_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard we may not read (mode 000 for a non-root user; simulated, as the tests may run as root) is one
    error naming the file, never a PermissionError traceback."""
    import vllm_deepseek_v4.checkpoint.format as fmt

    make_checkpoint(tmp_path, {"model.safetensors": small_tensors()}, index=False)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fmt, "open", denied, raising=False)
    with pytest.raises(CheckpointError) as e:
        scan_checkpoint(tmp_path)
    assert str(e.value) == f"{tmp_path / 'model.safetensors'}: cannot read shard: expected a readable file, " \
                           "found Permission denied"


def test_unstattable_shard_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard whose stat fails with EACCES (a folder on the way we may not search) names the file."""
    import errno
    import os

    import vllm_deepseek_v4.checkpoint.scan as scan

    make_checkpoint(tmp_path, {"model.safetensors": small_tensors()}, index=False)
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(scan.os, "stat", stat)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shard is not readable: expected read "
                                              r"permission, found Permission denied"):
        scan_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------- repeated keys


def test_tensor_listed_twice_is_named_not_reported_as_a_gap(tmp_path: Path) -> None:
    """json keeps the last of two equal keys: the first entry's bytes would show as a gap before the *next*
    tensor. The duplicate itself is named."""
    a = '"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}'
    header = ('{' + a + ',"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},' + a.replace("[0,4]", "[8,12]")
              + ',"c":{"dtype":"U8","shape":[4],"data_offsets":[12,16]}}').encode()
    write_raw(tmp_path / "model.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError) as e:
        scan_checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'model.safetensors'}: a: tensor listed twice in the header: "
                            "expected each name once, found 2 entries")


def test_entry_repeating_a_field_is_named(tmp_path: Path) -> None:
    header = b'{"a":{"dtype":"U8","shape":[4],"dtype":"I8","data_offsets":[0,4]}}'
    write_raw(tmp_path / "model.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a: header entry repeats the key 'dtype'"):
        scan_checkpoint(tmp_path)
