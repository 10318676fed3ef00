"""``dsv4 inspect`` / ``dsv4 verify``: human text, JSON, and exit codes (0 ok, 1 problems, 2 usage, 3 env)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from vllm_deepseek_v4.devtools.artifacts import make_checkpoint

from vllm_deepseek_v4.cli.main import main


def test_verify_ok_prints_one_line(tmp_path, capsys):
    d = make_checkpoint(tmp_path)
    assert main(["verify", str(d)]) == 0
    assert capsys.readouterr().out.strip() == (f"{d}: OK (160 tensors, naming upstream, MTP complete; "
                                                "headers checked; values not read -- use --values)")


def test_verify_of_an_index_or_a_single_file_reads_the_config_beside_it(tmp_path, capsys):
    """The scan accepts a folder, its index .json or one .safetensors file; the config is the folder's
    (read as the config itself, a shard was "not valid JSON" and an index lacked num_hidden_layers)."""
    from vllm_deepseek_v4.assets import tiny_model_path

    d = make_checkpoint(tmp_path)
    single = os.path.join(tiny_model_path(), "model.safetensors")
    for path, tensors in ((d / "model.safetensors.index.json", 160), (single, 308)):
        assert main(["verify", str(path)]) == 0, capsys.readouterr().out
        assert capsys.readouterr().out.startswith(f"{path}: OK ({tensors} tensors, naming upstream, MTP complete;")


def test_verify_lists_each_problem_on_one_line(tmp_path, capsys):
    def damage(t):
        t["layers.0.attn.mystery"] = torch.zeros(1)
        del t["mtp.0.enorm.weight"]
    d = make_checkpoint(tmp_path, edit=damage)
    assert main(["verify", str(d)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(l.endswith("layers.0.attn.mystery: unmapped: matches no naming rule") and l.startswith("model-")
               for l in lines)
    assert "mtp.0.enorm.weight: missing: MTP parameter not found under any known spelling" in lines


def test_verify_no_mtp_accepts_an_artifact_without_mtp(tmp_path, capsys):
    d = make_checkpoint(tmp_path, include_mtp=False)
    assert main(["verify", str(d)]) == 1
    assert "mtp.*: missing: the artifact has no mtp.* tensors" in capsys.readouterr().out
    assert main(["verify", str(d), "--no-mtp"]) == 0


def test_inspect_human_summary(tmp_path, capsys):
    d = make_checkpoint(tmp_path)
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "MTP: complete; shared embed <- embed.weight, head <- head.weight" in out
    assert "quant mtp.0  attn=bf16" in out


def test_inspect_json_has_the_documented_keys(tmp_path, capsys):
    main(["inspect", str(make_checkpoint(tmp_path)), "--json"])
    rep = json.loads(capsys.readouterr().out)
    for key in ("path", "ok", "tensors", "bytes", "files", "naming", "num_hidden_layers", "mtp_layers", "unmapped",
                "missing", "errors", "mtp", "quant"):
        assert key in rep
    assert set(rep["mtp"]) >= {"complete", "shared"} and set(rep["quant"]) == {"main", "mtp.0"}


def test_corrupt_header_is_reported_not_a_traceback(tmp_path, capsys):
    d = make_checkpoint(tmp_path)
    f = d / "model-00001-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[10:14] = b"@@@@"
    f.write_bytes(bytes(data))
    assert main(["inspect", str(d), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and "model-00001-of-00002.safetensors" in rep["errors"][0]


def test_exit_codes_for_usage_and_missing_path(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "vllm_deepseek_v4.cli.main", *a], capture_output=True, text=True)
    assert run("frobnicate").returncode == 2
    assert run("verify").returncode == 2
    r = run("verify", str(tmp_path / "nope"))
    assert r.returncode == 3 and "no such artifact" in r.stderr


def test_each_kind_of_problem_keeps_its_line_and_json_shape(tmp_path, capsys):
    """Errors name file, tensor and reason; unmapped tensors and missing parameters say so; verify lists errors,
    then unmapped, then missing."""
    from vllm_deepseek_v4.checkpoint import scan_checkpoint

    def damage(t):
        t["layers.0.attn.mystery.weight"] = torch.zeros(2)
        del t["layers.2.attn.compressor.wgate.weight"]
        t["layers.1.attn.attn_sink"] = torch.zeros(5)
    d = make_checkpoint(tmp_path, edit=damage)
    ck = scan_checkpoint(d)
    mystery, sink = ck["layers.0.attn.mystery.weight"].file, ck["layers.1.attn.attn_sink"].file
    error = f"{sink}: layers.1.attn.attn_sink: expected shape [4] for layers.1.attn.attn_sink, found [5]"
    assert main(["verify", str(d)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        error, f"{mystery}: layers.0.attn.mystery.weight: unmapped: matches no naming rule",
        "layers.2.attn.compressor.wgate.weight: missing: not found under any known spelling"]
    assert main(["inspect", str(d), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["errors"] == [error]
    assert rep["unmapped"] == [{"name": "layers.0.attn.mystery.weight", "file": mystery, "reason": "matches no naming rule"}]
    assert rep["missing"] == [{"param": "layers.2.attn.compressor.wgate.weight",
                               "reason": "not found under any known spelling"}]
    assert rep["mtp"]["complete"]                      # none of them is about the MTP block
