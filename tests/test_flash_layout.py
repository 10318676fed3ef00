"""The published DSv4-Flash layout (69,187 tensors, sparse: real headers, zero data) and derived variants."""
from __future__ import annotations

import json
import subprocess
import sys


from vllm_deepseek_v4.cli.main import main
from vllm_deepseek_v4.devtools import flash
from vllm_deepseek_v4.devtools.artifacts import rename_hf

FLASH_TENSORS = 69_187


def inspect_json(path, *extra, capsys) -> tuple[int, dict]:
    rc = main(["inspect", str(path), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def derive(tmp_path, name, transform):
    """Materialise the Flash inventory after ``transform(list of (name, shape, dtype, file)) -> list``."""
    d = tmp_path / name
    flash.materialise(d, transform(flash.inventory()))
    return d


def test_published_flash_layout(flash_dir, capsys):
    rc, rep = inspect_json(flash_dir, capsys=capsys)
    assert rc == 0 and rep["ok"]
    assert rep["tensors"] == FLASH_TENSORS and rep["files"] == 45 and rep["bytes"] == 159_609_485_896
    assert rep["unmapped"] == [] and rep["missing"] == [] and rep["errors"] == []
    assert rep["naming"] == "upstream" and rep["num_hidden_layers"] == 43 and rep["mtp_layers"] == 1
    assert rep["mtp"]["complete"] and rep["mtp"]["shared"] == {"embed": "embed.weight", "head": "head.weight"}
    for part in ("main", "mtp.0"):
        assert rep["quant"][part]["attn"] == "fp8_block" and rep["quant"][part]["experts"] == "mxfp4"
        assert rep["quant"][part]["shared_experts"] == "fp8_block"
    assert rep["quant"]["mtp.0"]["e_proj"] == rep["quant"]["mtp.0"]["h_proj"] == "fp8_block"
    assert rep["quant"]["main"]["indexer"] == "fp8_block" and rep["quant"]["main"]["compressor"] == "bf16"


def _nvfp4_trunk_bf16_mtp(inv):
    out = []
    for n, s, dt, f in inv:
        if n.startswith("layers.") and ".ffn.experts." in n:
            stem = n.rsplit(".", 1)[0]
            if n.endswith(".weight"):
                rows, half = s
                out += [(stem + ".weight_packed", s, "u8", f), (stem + ".weight_scale", [rows, half // 8], "e4m3", f),
                        (stem + ".weight_global_scale", [1], "f32", f), (stem + ".input_global_scale", [1], "f32", f)]
            continue
        if n.startswith("mtp."):
            if n.endswith(".scale"):
                continue
            if dt == "i8":
                s, dt = [s[0], s[1] * 2], "bf16"
            elif dt == "e4m3":
                dt = "bf16"
        out.append((n, s, dt, f))
    return out


def test_nvfp4_trunk_with_bf16_mtp_variant(tmp_path, capsys):
    d = derive(tmp_path, "nvfp4", _nvfp4_trunk_bf16_mtp)
    rc, rep = inspect_json(d, capsys=capsys)
    assert rc == 0 and rep["ok"] and rep["mtp"]["complete"]
    assert rep["quant"]["main"]["experts"] == "nvfp4" and rep["quant"]["main"]["attn"] == "fp8_block"
    assert set(rep["quant"]["mtp.0"].values()) == {"bf16"}
    assert sum(1 for n, *_ in _nvfp4_trunk_bf16_mtp(flash.inventory()) if n.startswith("mtp.")) == 797


def test_hf_named_variant(tmp_path, capsys):
    d = derive(tmp_path, "hf", lambda inv: [(rename_hf(n, 43), s, dt, f) for n, s, dt, f in inv])
    rc, rep = inspect_json(d, capsys=capsys)
    assert rc == 0 and rep["ok"] and rep["tensors"] == FLASH_TENSORS
    assert rep["naming"] == "hf"          # model.mtp.K. is a declared HF-convention MTP scope
    assert rep["mtp"]["shared"] == {"embed": "model.embed_tokens.weight", "head": "lm_head.weight"}
    assert rep["quant"]["mtp.0"]["experts"] == "mxfp4"


def test_no_mtp_variant_fails_unless_no_mtp(tmp_path, capsys):
    d = derive(tmp_path, "nomtp", lambda inv: [r for r in inv if not r[0].startswith("mtp.")])
    rc, rep = inspect_json(d, capsys=capsys)
    assert rc == 1 and not rep["ok"] and not rep["mtp"]["complete"]
    assert rep["missing"][0]["param"] == "mtp.*" and "transformers" in rep["missing"][0]["reason"]
    rc, rep = inspect_json(d, "--no-mtp", capsys=capsys)
    assert rc == 0 and rep["ok"] and rep["tensors"] == FLASH_TENSORS - 1575


def test_inspect_does_not_import_torch(flash_dir):
    code = ("import sys, io, contextlib; from vllm_deepseek_v4.cli.main import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): rc = main(['inspect', {str(flash_dir)!r}, '--json'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'dsv4 inspect imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
