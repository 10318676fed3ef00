"""The artifact zoo (``devtools.zoo``, command line ``scripts/build_zoo.py``), built here from a random tiny artifact in a temp dir.

Checked against tables written in this file (not the builder's own): every layout plans with the expected
scheme per group for ``main`` and ``mtp.0``, carries the on-disk roles and ``quantization_config`` of its real
producer, the NVFP4 tensors are what compressed-tensors computes, equivalent layouts give bit-identical main
and draft logits, transformers' save drops ``mtp.*`` and fails ``dsv4 verify`` with our message, and no zoo
artifact can be loaded into a draft with a missing or different head: the loader refuses by name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_deepseek_v4.cli.main import main as dsv4_main
from vllm_deepseek_v4.devtools.artifacts import make_checkpoint, write_artifact
from vllm_deepseek_v4.errors import AliasMismatchError, PlanError
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.loader.plan import build_plan
from vllm_deepseek_v4.model.speculative import speculative_generate
from vllm_deepseek_v4.quant.numerics import quantize

pytest.importorskip("compressed_tensors")
pytest.importorskip("transformers")
from vllm_deepseek_v4.devtools import zoo as build_zoo  # noqa: E402  (after the peer-library skips)

F8, MX, NV, W4 = "fp8_block", "mxfp4", "nvfp4", "w4a16"
NATIVE_MTP = {"attn": F8, "shared_experts": F8, "experts": MX, "e_proj": F8, "h_proj": F8}
# layout -> (main groups, mtp.0 groups) that are not bf16; None: no MTP in the artifact
EXPECTED: dict[str, tuple[dict[str, str], dict[str, str] | None]] = {
    "upstream_bf16": ({}, {}),
    "upstream_fp8_mxfp4": ({"attn": F8, "indexer": F8, "shared_experts": F8, "experts": MX}, NATIVE_MTP),
    "hf_transformers": ({}, None),
    "hf_names_with_mtp": ({}, {}),
    "nvfp4_trunk_bf16_mtp": ({"attn": NV, "shared_experts": NV, "experts": NV}, {}),
    "nvfp4_trunk_nvfp4_mtp": ({"attn": NV, "shared_experts": NV, "experts": NV},
                              {"attn": NV, "shared_experts": NV, "experts": NV, "e_proj": NV, "h_proj": NV}),
    "modelopt_mixed": ({"attn": F8, "indexer": F8, "shared_experts": F8, "experts": NV}, NATIVE_MTP),
    "w4a16_trunk": ({"attn": F8, "shared_experts": W4, "experts": W4}, {}),
    "head_embed_duplicated": ({}, {}),
    "vllm_internal": ({}, {}),
}
NAMING = {"hf_transformers": "hf", "hf_names_with_mtp": "hf", "vllm_internal": "vllm"}
EQUIVALENT = ["upstream_bf16", "hf_names_with_mtp", "head_embed_duplicated", "vllm_internal"]
WITH_MTP = [n for n, (_, mtp) in EXPECTED.items() if mtp is not None]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    src = make_checkpoint(tmp_path_factory.mktemp("src"))
    (src / "tokenizer.json").write_text("{}")          # stands in for the tokenizer files: copied verbatim
    out = tmp_path_factory.mktemp("zoo")
    index = build_zoo.build_zoo(str(src), str(out), load=True, log=lambda *_: None)
    return src, out, index


def tensors_of(path: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: (fh.get_slice(k).get_dtype(), fh.get_slice(k).get_shape()) for k in fh.keys()})
    return out


def test_the_zoo_holds_every_layout_with_its_index_and_tokenizer(zoo):
    _, out, index = zoo
    assert sorted(index["layouts"]) == sorted(EXPECTED)
    assert json.loads((out / "zoo.json").read_text()) == index
    for name in EXPECTED:
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").read_text() == "{}"
        assert index["layouts"][name]["has_mtp"] == (EXPECTED[name][1] is not None)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layout_plans_with_the_expected_schemes_for_main_and_mtp(zoo, name):
    _, out, index = zoo
    main, mtp = EXPECTED[name]
    plan = build_plan(str(out / name), include_mtp=mtp is not None)
    assert plan.ok, plan.problems()
    assert plan.naming == NAMING.get(name, "upstream")
    report = plan.quant_report()
    assert sorted(report) == (["main", "mtp.0"] if mtp is not None else ["main"])
    assert {g: s for g, s in report["main"].items() if s != "bf16"} == main
    if mtp is not None:
        assert {g: s for g, s in report["mtp.0"].items() if s != "bf16"} == mtp
    assert index["layouts"][name]["expected_schemes"] == report


def test_every_layout_with_mtp_passes_dsv4_verify(zoo, capsys):
    _, out, _ = zoo
    for name in WITH_MTP:
        assert dsv4_main(["verify", str(out / name)]) == 0, capsys.readouterr().out


def test_transformers_save_drops_mtp_and_verify_says_so(zoo, capsys):
    _, out, index = zoo
    path = out / "hf_transformers"
    names = tensors_of(path)
    assert not any(n.startswith("mtp.") or ".mtp." in n for n in names)
    assert "head.weight" in names and any(n.endswith(".attn.norm.weight") for n in names)   # its hybrid names
    assert index["layouts"]["hf_transformers"]["mtp_tensors_out"] == 0
    capsys.readouterr()
    assert dsv4_main(["verify", str(path)]) == 1
    text = capsys.readouterr().out
    assert "mtp.*: missing" in text and "saved through transformers (which drops mtp.*)" in text
    assert dsv4_main(["verify", "--no-mtp", str(path)]) == 0


def test_on_disk_roles_are_the_real_producers(zoo):
    _, out, _ = zoo
    native = tensors_of(out / "upstream_fp8_mxfp4")
    assert native["layers.0.attn.wq_a.scale"][0] == "F8_E8M0" and native["mtp.0.e_proj.weight"][0] == "F8_E4M3"
    assert native["mtp.0.ffn.experts.0.w1.weight"][0] == "I8" and native["mtp.0.ffn.experts.0.w1.scale"][0] == "F8_E8M0"
    ct = tensors_of(out / "nvfp4_trunk_bf16_mtp")
    assert ct["layers.0.ffn.experts.0.w1.weight_packed"][0] == "U8"
    assert ct["layers.0.ffn.experts.0.w1.weight_global_scale"] == ("F32", [1])
    assert ct["mtp.0.ffn.experts.0.w1.weight"][0] == "BF16" and "mtp.0.attn.wq_a.weight_packed" not in ct
    assert "mtp.0.e_proj.weight_packed" in tensors_of(out / "nvfp4_trunk_nvfp4_mtp")
    mo = tensors_of(out / "modelopt_mixed")
    assert mo["layers.0.ffn.experts.0.w1.weight"][0] == "U8" and mo["layers.0.ffn.experts.0.w1.weight_scale_2"][1] == []
    assert mo["mtp.0.ffn.experts.0.w1.weight"][0] == "I8" and mo["layers.0.attn.wq_a.scale"][0] == "F8_E8M0"
    w4 = tensors_of(out / "w4a16_trunk")
    e = "layers.0.ffn.experts.0.w1."
    assert w4[e + "weight_packed"][0] == "I32" and w4[e + "weight_shape"][0] == "I64"
    assert w4[e + "weight_scale"][0] == "BF16" and w4["layers.0.attn.wq_a.weight_scale"][0] == "F32"
    dup = tensors_of(out / "head_embed_duplicated")
    assert dup["mtp.0.head.weight"][0] == "F32" and "mtp.0.emb.tok_emb.weight" in dup
    vl = tensors_of(out / "vllm_internal")
    assert any(re.match(r"model\.layers\.3\.mtp_block\.attn\.fused_wqa_wkv\.weight$", n) for n in vl)
    assert "model.layers.3.e_proj.weight" in vl and "lm_head.weight" in vl


def test_quantization_configs_are_in_the_real_formats(zoo):
    _, out, _ = zoo
    cfg = lambda name: json.loads((out / name / "config.json").read_text()).get("quantization_config")
    assert cfg("upstream_fp8_mxfp4") == {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                         "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert cfg("upstream_bf16") is None and cfg("vllm_internal") is None
    ct = cfg("nvfp4_trunk_bf16_mtp")
    assert ct["quant_method"] == "compressed-tensors" and ct["format"] == "nvfp4-pack-quantized"
    assert ct["quantization_status"] == "compressed"
    (group,) = ct["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 16
    assert any(re.match(e[3:], "mtp.0.attn.wq_a") for e in ct["ignore"] if e.startswith("re:"))
    assert any(re.match(e[3:], "model.layers.3.attn.wq_a") for e in ct["ignore"] if e.startswith("re:"))
    ct2 = cfg("nvfp4_trunk_nvfp4_mtp")
    assert not any(re.match(e[3:], "mtp.0.attn.wq_a") for e in ct2["ignore"] if e.startswith("re:"))
    w4 = cfg("w4a16_trunk")
    assert w4["format"] == "mixed-precision"
    assert sorted(g["format"] for g in w4["config_groups"].values()) == ["float-quantized", "pack-quantized"]
    mo = cfg("modelopt_mixed")
    assert mo["quant_method"] == "fp8" and mo["moe_quant_algo"] == "NVFP4"
    hq = json.loads((out / "modelopt_mixed" / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt" and hq["quantization"]["quant_algo"] == "MIXED_PRECISION"
    layers = hq["quantization"]["quantized_layers"]
    assert layers and all(re.match(r"layers\.\d+\.ffn\.experts\.\d+\.w[123]$", m) for m in layers)
    assert "mtp.*" in hq["quantization"]["exclude_modules"]


def test_nvfp4_tensors_are_compressed_tensors_output_and_match_our_quantizer(zoo):
    src, out, _ = zoo
    w = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    name = next(n for n in sorted(w) if re.match(r"layers\.\d+\.ffn\.experts\.\d+\.w1\.weight$", n))
    ours = quantize("nvfp4", w[name])
    disk = {}
    for f in (out / "nvfp4_trunk_bf16_mtp").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            disk.update({k: fh.get_tensor(k) for k in fh.keys() if k.startswith(name[: -len("weight")])})
    stem = name[: -len("weight")]
    assert torch.equal(disk[stem + "weight_packed"], ours["weight"])
    assert torch.equal(disk[stem + "weight_scale"].view(torch.uint8), ours["weight_scale"].view(torch.uint8))
    assert torch.equal(disk[stem + "weight_global_scale"], ours["weight_global_scale"])


def test_equivalent_layouts_give_bit_identical_logits_and_identical_speculative_runs(zoo):
    _, out, _ = zoo
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for name in EQUIVALENT:
        model, _ = load_model(str(out / name), dtype=torch.float32, progress=False)
        with torch.no_grad():
            main, hidden = model(ids)
            draft, _ = model.forward_mtp(hidden[:, :-1], ids[:, 1:], model.new_mtp_state())
        tokens, stats = speculative_generate(model, ids[:, :24], 12, 2)
        results.append((name, main, draft, tokens, stats.rounds))
    for name, main, draft, tokens, rounds in results[1:]:
        assert torch.equal(main, results[0][1]) and torch.equal(draft, results[0][2]), name
        assert tokens == results[0][3] and rounds == results[0][4], name


# ---- the loader never produces a draft without the shared head ----
def _rewrite(src: Path, dst: Path, edit) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    edit(tensors)
    cfg = json.loads((src / "config.json").read_text())
    extra = {p.name: json.loads(p.read_text()) for p in src.glob("hf_quant_config.json")}
    return write_artifact(dst, tensors, cfg, extra_json=extra)


@pytest.mark.parametrize("name", WITH_MTP)
def test_a_layout_without_its_head_is_refused_by_name(zoo, tmp_path, name):
    _, out, _ = zoo
    heads = re.compile(r"(^|\.)head\.weight$|^lm_head\.weight$")

    def drop(t: dict[str, torch.Tensor]) -> None:
        gone = [n for n in t if heads.search(n)]
        assert gone
        for n in gone:
            del t[n]
    path = _rewrite(out / name, tmp_path / name, drop)
    with pytest.raises(PlanError, match=r"(?m)^\s*head(\.weight)?: missing"):
        load_model(str(path), progress=False)


def test_a_corrupted_mtp_head_copy_is_refused_by_name(zoo, tmp_path):
    _, out, _ = zoo

    def corrupt(t: dict[str, torch.Tensor]) -> None:
        t["mtp.0.head.weight"] = torch.randn(t["mtp.0.head.weight"].shape, generator=torch.Generator().manual_seed(0))
    path = _rewrite(out / "head_embed_duplicated", tmp_path / "bad", corrupt)
    with pytest.raises(AliasMismatchError, match=r"mtp\.0\.head\.weight"):
        load_model(str(path), progress=False)


def test_the_builder_refuses_a_quantized_source(zoo, tmp_path):
    _, out, _ = zoo
    with pytest.raises(build_zoo.ZooError, match="from a BF16 model"):
        build_zoo.build_zoo(str(out / "upstream_fp8_mxfp4"), str(tmp_path / "z"), log=lambda *_: None)
    shutil.rmtree(tmp_path / "z", ignore_errors=True)
