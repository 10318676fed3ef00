"""Load plan: every convention and quant format plans completely; every bad input names tensor and file."""
from __future__ import annotations

import json

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import NATIVE, canonical_tensors, make_checkpoint, make_config, to_convention, write_artifact
from safetensors.torch import save_file

from vllm_deepseek_v4.errors import PlanError
from vllm_deepseek_v4.loader import Problem, build_plan
from vllm_deepseek_v4.loader.records import (ALIAS_SHAPE, DTYPE, DUPLICATE, EXTRA_MTP_LAYER, FOREIGN_MTP, MISSING,
                                             CONFIG, MTP_DROPPED, MTP_ONLY, QUANT, SHAPE, UNMAPPED)

BF16_MAIN = {"attn": "bf16", "compressor": "bf16", "experts": "bf16", "indexer": "bf16", "router": "bf16",
             "shared_experts": "bf16"}
BF16_MTP = {"attn": "bf16", "e_proj": "bf16", "experts": "bf16", "h_proj": "bf16", "router": "bf16",
            "shared_experts": "bf16"}


def plan_of(tmp_path, **kw):
    return build_plan(str(make_checkpoint(tmp_path, **kw)))


# ---- every convention and format ----
@pytest.mark.parametrize("convention,naming", [("upstream", "upstream"), ("hf", "hf"), ("nemo", "nemo"),
                                               ("vllm", "vllm"), ("hf_saved", "mixed")])
def test_bf16_artifact_plans_completely_in_every_convention(tmp_path, convention, naming):
    plan = plan_of(tmp_path, convention=convention)
    assert plan.problems() == []
    assert plan.naming == naming       # hf_saved keeps mtp.* upstream-style under a transformers trunk
    assert plan.quant_report() == {"main": BF16_MAIN, "mtp.0": BF16_MTP}
    assert plan.mtp_report()["complete"]


def test_save_pretrained_output_without_mtp_is_hf_naming_and_flags_missing_mtp(tmp_path):
    plan = plan_of(tmp_path, convention="hf_saved", include_mtp=False)
    assert plan.naming == "hf"
    [dropped] = plan.missing
    assert (dropped.kind, dropped.part, dropped.tensor) == (MTP_DROPPED, "mtp.*", "mtp.*")
    assert "saved through transformers" in dropped.reason
    assert build_plan(plan.path, include_mtp=False).ok


FORMATS = {
    "native fp8 + mxfp4 experts": (NATIVE, "", {"attn": "fp8_block", "experts": "mxfp4"}, {"attn": "fp8_block", "experts": "mxfp4"}),
    "fp8 with f32 scales (Flash-Base)": ({"main": {"attn": "fp8_block", "experts": "fp8_block"}}, "f32",
                                         {"attn": "fp8_block", "experts": "fp8_block"}, {"attn": "bf16", "experts": "bf16"}),
    "nvfp4 trunk + bf16 mtp (compressed-tensors)": ({"main": {"experts": "nvfp4", "attn": "fp8_block"}}, "",
                                                    {"experts": "nvfp4", "attn": "fp8_block"}, {"experts": "bf16", "attn": "bf16"}),
    "nvfp4 trunk + nvfp4 mtp": ({"main": {"experts": "nvfp4"}, "mtp.0": {"experts": "nvfp4"}}, "",
                                {"experts": "nvfp4"}, {"experts": "nvfp4"}),
    "modelopt nvfp4 trunk, mxfp4 mtp": ({"main": {"experts": "nvfp4"}, "mtp.0": {"experts": "mxfp4"}}, "modelopt",
                                        {"experts": "nvfp4"}, {"experts": "mxfp4"}),
    "w4a16 trunk experts": ({"main": {"experts": "w4a16", "attn": "fp8_block"}}, "", {"experts": "w4a16"}, {"experts": "bf16"}),
}


@pytest.mark.parametrize("label", list(FORMATS))
def test_quant_scheme_is_detected_per_group_for_trunk_and_mtp(tmp_path, label):
    schemes, flavor, want_main, want_mtp = FORMATS[label]
    plan = plan_of(tmp_path, schemes=schemes, flavor=flavor)
    assert plan.problems() == []
    rep = plan.quant_report()
    assert {g: rep["main"][g] for g in want_main} == want_main
    assert {g: rep["mtp.0"][g] for g in want_mtp} == want_mtp


def test_hf_fp8_weight_scale_inv_is_fp8_block(tmp_path):
    plan = plan_of(tmp_path, schemes={"main": {"attn": "fp8_block"}}, flavor="hf")
    assert plan.ok and plan.params["layers.0.attn.wq_a"].quant.variant == "hf-fp8"
    assert plan.params["layers.0.attn.wq_a"].roles["scale"].tensor == "layers.0.attn.wq_a.weight_scale_inv"


def test_hf_names_with_quantized_per_expert_linears(tmp_path):
    cfg = make_config()
    t = to_convention(canonical_tensors(cfg, NATIVE), "hf", cfg, fuse=False)
    plan = build_plan(str(write_artifact(tmp_path, t, cfg)))
    assert plan.problems() == [] and plan.quant_report()["mtp.0"]["experts"] == "mxfp4"


def test_fused_vllm_tensors_split_in_shard_order(tmp_path):
    plan = plan_of(tmp_path, convention="vllm")
    wq_a, wkv = plan.params["layers.0.attn.wq_a"].roles["weight"], plan.params["layers.0.attn.wkv"].roles["weight"]
    assert wq_a.tensor == wkv.tensor == "model.layers.0.attn.fused_wqa_wkv.weight"
    assert wq_a.ops == (("narrow", 0, 0, 32),) and wkv.ops == (("narrow", 0, 32, 64),)
    w3 = plan.params["mtp.0.ffn.experts.2.w3"].roles["weight"]
    assert w3.tensor == "model.layers.3.mtp_block.ffn.experts.routed_experts.w13_weight"
    assert w3.ops == (("select", 0, 2), ("narrow", 0, 32, 32))


def test_nemo_stacked_experts_are_transposed_back(tmp_path):
    plan = plan_of(tmp_path, convention="nemo")
    w1 = plan.params["layers.1.ffn.experts.3.w1"].roles["weight"]
    assert w1.tensor == "model.layers.1.mlp.experts.gate_and_up_projs"
    assert w1.ops == (("select", 0, 3), ("narrow", 1, 0, 32), ("t",)) and w1.shape == (32, 64)


# ---- MTP and shared tensors ----
def test_duplicated_head_and_embed_are_aliases_of_the_top_level(tmp_path):
    def dup(t):
        t["mtp.0.head.weight"] = t["head.weight"].float()           # canada-quant's fp32 copy
        t["mtp.0.emb.tok_emb.weight"] = t["embed.weight"].clone()
    plan = plan_of(tmp_path, edit=dup)
    assert plan.ok
    rep = plan.mtp_report()
    assert rep["shared"] == {"embed": "embed.weight", "head": "head.weight"}
    assert rep["aliases"] == {"embed": ["mtp.0.emb.tok_emb.weight"], "head": ["mtp.0.head.weight"]}


def test_head_only_inside_mtp_block_still_fills_the_shared_head(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("mtp.0.head.weight", t.pop("head.weight")))
    assert plan.ok and plan.mtp_report()["shared"]["head"] == "mtp.0.head.weight"


def test_conflicting_alias_shapes_name_both_tensors(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("mtp.0.head.weight", torch.zeros(255, 64)))
    assert not plan.ok and not plan.mtp_report()["complete"]
    [p] = plan.errors
    assert (p.kind, p.part, p.tensor) == (ALIAS_SHAPE, "mtp.0", "mtp.0.head.weight")
    assert p.reason == "alias of head.weight with a conflicting shape: expected [256, 64], found [255, 64]"
    assert plan.mtp_problems() == [f"{p.file}: mtp.0.head.weight: {p.reason}"]


def test_missing_mtp_block_says_what_happened(tmp_path):
    plan = plan_of(tmp_path, include_mtp=False)
    assert not plan.ok and not plan.mtp_report()["complete"]
    assert [(p.kind, p.part) for p in plan.missing] == [(MTP_DROPPED, "mtp.*")]
    assert "num_nextn_predict_layers=1" in plan.missing[0].reason and "transformers" in plan.missing[0].reason
    assert plan.to_json()["missing"] == [{"param": "mtp.*", "reason": plan.missing[0].reason}]
    assert build_plan(plan.path, include_mtp=False).ok


def test_no_mtp_flag_explains_mtp_tensors_instead_of_loading_them(tmp_path):
    plan = build_plan(str(make_checkpoint(tmp_path)), include_mtp=False)
    assert plan.ok and any(e["name"] == "mtp.0.e_proj.weight" for e in plan.explained)


def test_dspark_shaped_mtp_block_is_refused_listing_unknown_names(tmp_path):
    def dspark(t):
        del t["mtp.0.enorm.weight"], t["mtp.0.hnorm.weight"]
        t["mtp.0.markov_head.weight"] = torch.zeros(4, 4)
        t["mtp.0.main_norm.weight"] = torch.zeros(64)
    plan = plan_of(tmp_path, edit=dspark)
    assert not plan.ok and not plan.mtp_report()["complete"]
    assert {(p.kind, p.part, p.tensor) for p in plan.unmapped} == {
        (UNMAPPED, "mtp.0", "mtp.0.markov_head.weight"), (UNMAPPED, "mtp.0", "mtp.0.main_norm.weight")}
    [refusal] = plan.errors
    assert (refusal.kind, refusal.part) == (FOREIGN_MTP, "mtp.*")
    assert refusal.reason.startswith("refusing the mtp.* block") and "mtp.0.markov_head.weight" in refusal.reason


def test_more_mtp_layers_than_config_declares_is_refused(tmp_path):
    def extra(t):
        for n in [n for n in t if n.startswith("mtp.0.")]:
            t["mtp.1." + n[6:]] = t[n].clone()
    plan = plan_of(tmp_path, edit=extra)
    assert not plan.ok and not plan.mtp_report()["complete"]
    extra_layer = [p for p in plan.unmapped if p.tensor == "mtp.1.e_proj.weight"]
    assert [(p.kind, p.part) for p in extra_layer] == [(EXTRA_MTP_LAYER, "mtp.1")]
    assert "num_nextn_predict_layers=1" in extra_layer[0].reason
    assert {p.kind for p in plan.unmapped} == {EXTRA_MTP_LAYER} and [p.kind for p in plan.errors] == [FOREIGN_MTP]


def test_mtp_only_tensor_in_a_main_layer_is_an_error(tmp_path):
    plan = plan_of(tmp_path, convention="vllm",
                   edit=lambda t: t.__setitem__("model.layers.1.e_proj.weight", torch.zeros(64, 64)))
    [p] = plan.errors
    assert (p.kind, p.part, p.tensor, p.reason) == (MTP_ONLY, "main", "model.layers.1.e_proj.weight",
                                                    "only valid in an MTP layer (index >= 3), found in layer 1")
    assert p.file.startswith("model-") and plan.mtp_report()["complete"]


def test_hash_layer_gate_bias_is_explained_not_an_error(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("layers.0.ffn.gate.bias", torch.zeros(4)))
    assert plan.ok and any(e["name"] == "layers.0.ffn.gate.bias" and "tid2eid" in e["reason"] for e in plan.explained)


# ---- bad inputs: each names the tensor and the file ----
def test_unmapped_tensor_names_file_and_tensor(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("layers.0.attn.mystery.weight", torch.zeros(2)))
    assert [(p.kind, p.part, p.tensor, p.reason) for p in plan.unmapped] == [
        (UNMAPPED, "main", "layers.0.attn.mystery.weight", "matches no naming rule")]
    with pytest.raises(PlanError, match=r"model-0000\d-of-00002\.safetensors: layers\.0\.attn\.mystery\.weight: unmapped"):
        plan.raise_if_bad()


def test_missing_parameter_is_listed(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.pop("layers.2.attn.compressor.wgate.weight"))
    assert plan.missing == [Problem(MISSING, "main", "layers.2.attn.compressor.wgate.weight", "",
                                    "not found under any known spelling")]
    plan = plan_of(tmp_path / "mtp", edit=lambda t: t.pop("mtp.0.enorm.weight"))
    assert plan.missing == [Problem(MISSING, "mtp.0", "mtp.0.enorm.weight", "",
                                    "MTP parameter not found under any known spelling")]
    assert not plan.mtp_report()["complete"] and plan.mtp_problems() == plan.problems()


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("layers.1.attn.wq_a.weight", torch.zeros(33, 64, dtype=torch.bfloat16)))
    [p] = plan.errors
    assert (p.kind, p.part, p.tensor, p.reason) == (QUANT, "main", "layers.1.attn.wq_a.weight",
                                                    "expected shape [32, 64], found [33, 64]")
    assert p.file.startswith("model-") and plan.problems() == [f"{p.file}: {p.tensor}: {p.reason}"]


def test_plain_shape_mismatch(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("layers.1.attn.attn_sink", torch.zeros(5)))
    assert [(p.kind, p.tensor, p.reason) for p in plan.errors] == [
        (SHAPE, "layers.1.attn.attn_sink", "expected shape [4] for layers.1.attn.attn_sink, found [5]")]


def test_dtype_mismatch_names_tensor(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("layers.0.ffn.gate.tid2eid", torch.zeros(256, 2, dtype=torch.float32)))
    assert [(p.kind, p.tensor, p.reason) for p in plan.errors] == [
        (DTYPE, "layers.0.ffn.gate.tid2eid", "expected dtype I64 or I32 (expert ids), found F32")]


def test_missing_scale_companion_names_the_weight(tmp_path):
    plan = plan_of(tmp_path, schemes=NATIVE, edit=lambda t: t.pop("layers.1.attn.wo_b.scale"))
    [p] = plan.errors
    assert (p.kind, p.tensor) == (QUANT, "layers.1.attn.wo_b.weight")
    assert p.reason.startswith("expected an FP8 scale companion")


def test_scale_without_weight_names_the_scale(tmp_path):
    plan = plan_of(tmp_path, schemes=NATIVE, edit=lambda t: t.pop("layers.1.attn.wo_b.weight"))
    [p] = plan.errors
    assert (p.kind, p.tensor) == (QUANT, "layers.1.attn.wo_b.scale")
    assert p.reason.startswith("expected layers.1.attn.wo_b.weight")


def test_wrong_block_scale_shape(tmp_path):
    plan = plan_of(tmp_path, schemes=NATIVE,
                   edit=lambda t: t.__setitem__("layers.1.attn.wq_b.scale", t["layers.1.attn.wq_b.scale"].repeat(2, 1)))
    [p] = plan.errors
    assert (p.kind, p.tensor) == (QUANT, "layers.1.attn.wq_b.scale")
    assert p.reason.startswith("expected 128x128 block scales of shape [2, 1]") and p.reason.endswith("found [4, 1]")


def test_same_parameter_from_two_spellings_is_a_duplicate(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("model.layers.0.self_attn.q_a_norm.weight", t["layers.0.attn.q_norm.weight"]))
    [p] = plan.errors
    assert (p.kind, p.part, p.tensor, p.file) == (DUPLICATE, "main", "layers.0.attn.q_norm.weight", "")
    assert p.reason.startswith("filled by 2 tensors: ") and "model.layers.0.self_attn.q_a_norm.weight" in p.reason


def test_same_linear_role_from_two_spellings_is_a_duplicate(tmp_path):
    plan = plan_of(tmp_path, edit=lambda t: t.__setitem__("model.layers.0.self_attn.q_a_proj.weight",
                                                          t["layers.0.attn.wq_a.weight"]))
    [p] = plan.errors
    assert (p.kind, p.part, p.tensor) == (DUPLICATE, "main", "layers.0.attn.wq_a.weight")
    assert "layers.0.attn.wq_a" not in plan.params and not plan.missing      # reported once, not also missing


def test_extra_tensor_in_header_but_not_in_index_is_a_checkpoint_error(tmp_path):
    from vllm_deepseek_v4.errors import CheckpointError
    d = make_checkpoint(tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="norm.weight"):
        build_plan(str(d))


def test_stray_shard_content_is_refused(tmp_path):
    d = make_checkpoint(tmp_path)
    save_file({"x": torch.zeros(1)}, str(d / "model-00002-of-00002.safetensors"))
    from vllm_deepseek_v4.errors import CheckpointError
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        build_plan(str(d))


# ---- quantization_config cross-check ----
def test_ignore_list_is_matched_against_checkpoint_names_and_disagreement_reported(tmp_path):
    cfg = make_config(quantization_config={
        "quant_method": "compressed-tensors", "format": "mixed-precision",
        "config_groups": {"g": {"targets": [r"re:.*\.ffn\.experts\.\d+\.(w1|w2|w3)$"], "format": "nvfp4-pack-quantized",
                                "weights": {"num_bits": 4, "type": "float", "group_size": 16}}},
        "ignore": [r"re:.*mtp\..*"]})
    plan = plan_of(tmp_path, cfg=cfg, schemes={"main": {"experts": "nvfp4"}, "mtp.0": {"experts": "nvfp4"}})
    assert plan.ok
    assert any(w.startswith("mtp.0.ffn.experts.0.w1: quantization_config says bf16 (ignored), tensors on disk are nvfp4")
               for w in plan.warnings)
    assert not any(w.startswith("layers.") for w in plan.warnings)


# ---- a huge count in config.json: one line naming the field, before the parameter space is built ----
def _tiny_with(tmp_path, **changes):
    """A hard-linked copy of the shipped tiny model whose config.json has ``changes`` (compress_ratios padded
    with sliding layers to cover ``num_hidden_layers``)."""
    import os
    import shutil

    from vllm_deepseek_v4.assets import tiny_model_path

    d = shutil.copytree(tiny_model_path(), tmp_path / "tiny", copy_function=os.link)
    cfg = {**json.loads((d / "config.json").read_text()), **changes}
    cfg["compress_ratios"] += [0] * (cfg["num_hidden_layers"] - len(cfg["compress_ratios"]) + 1)
    (d / "config.json").unlink()                # a hard link to the shipped file: replace, never write into it
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("key, value, on_disk, evidence", [
    ("n_routed_experts", 10**6, 8, "routed experts 0-7"), ("n_routed_experts", 5 * 10**6, 8, "routed experts 0-7"),
    ("num_nextn_predict_layers", 10**5, 1, "MTP layers 0-0"), ("num_nextn_predict_layers", 10**6, 1, "MTP layers 0-0"),
    ("num_hidden_layers", 10**6, 5, "decoder layers 0-4")])
def test_huge_count_is_one_config_line_fast_and_small(tmp_path, key, value, on_disk, evidence):
    """Built in full, these were a MemoryError (10^6 experts), 23 GB (5*10^6) or millions of "missing" lines
    in 54 s (10^5 MTP layers): now the count is checked against the highest index on disk first."""
    import time
    import tracemalloc

    path = str(_tiny_with(tmp_path, **{key: value}))
    t0 = time.perf_counter()
    plan = build_plan(path)
    seconds = time.perf_counter() - t0
    tracemalloc.start()                         # a second plan, traced (tracing slows allocation ~10x)
    try:
        build_plan(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.problems() == [f"config.json: {key}: expected {on_disk} ({evidence} on disk, none above), "
                               f"found {value}"]
    [p] = plan.errors
    assert (p.kind, p.tensor, p.file) == (CONFIG, key, "config.json")
    assert seconds < 2 and peak < 200 * 2**20, (seconds, peak)


def test_huge_mtp_count_without_mtp_tensors_is_the_dropped_block_line(tmp_path):
    """No mtp.* on disk bounds nothing: one MTP layer is built, enough to report the block missing with the
    declared count."""
    d = make_checkpoint(tmp_path, convention="hf_saved", include_mtp=False)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 10**6}))
    [line] = build_plan(str(d)).problems()
    assert "no mtp.* tensors although config.json declares num_nextn_predict_layers=1000000" in line


def test_top_index_in_some_block_is_no_count_contradiction(tmp_path):
    """The highest expert is on disk in other layers: the count stands, and the one layer's hole is named
    tensor by tensor, with no config line."""
    drop = [f"layers.2.ffn.experts.3.{w}.weight" for w in ("w1", "w3", "w2")]
    plan = plan_of(tmp_path, edit=lambda t: [t.pop(n) for n in drop])
    assert [(p.kind, p.tensor) for p in plan.all_problems()] == [(MISSING, n) for n in drop]
