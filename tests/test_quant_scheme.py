"""Quant-format facts against tables written here, not read from ``quant/scheme.py``: detection of every format
and producer from header metadata alone, the stored shape of every role, and the module -> quant-group map.

The expectations restate ``docs/checkpoint-formats.md §6`` by hand, so a wrong number in a ``Scheme`` record
fails here instead of being read back by the code under test.
"""
from __future__ import annotations

import pytest

from vllm_deepseek_v4.errors import QuantMismatchError, TensorDtypeError, TensorShapeError
from vllm_deepseek_v4.naming.rule import ROLE_SUFFIXES
from vllm_deepseek_v4.quant import GROUPS, SCHEMES, group_of, scheme_of
from vllm_deepseek_v4.quant.detect import TensorMeta, classify_module


def classify(out_f: int, in_f: int, tensors: dict[str, tuple[str, tuple[int, ...]]]):
    metas = {sfx: TensorMeta(f"m.{sfx}", dt, shape, "model.safetensors") for sfx, (dt, shape) in tensors.items()}
    return classify_module("m", metas, out_f, in_f)


# label -> ([out, in], on-disk {suffix: (dtype, shape)}, (scheme, variant, {role: suffix}))
DETECTED = {
    "bf16": ((300, 200), {"weight": ("BF16", (300, 200))}, ("bf16", "", {"weight": "weight"})),
    "f32 weight is unquantized": ((8, 16), {"weight": ("F32", (8, 16))}, ("bf16", "", {"weight": "weight"})),
    "DeepSeek FP8, e8m0 .scale, cropped edge blocks": (
        (300, 200), {"weight": ("F8_E4M3", (300, 200)), "scale": ("F8_E8M0", (3, 2))},
        ("fp8_block", "deepseek", {"weight": "weight", "scale": "scale"})),
    "V4-Flash-Base FP8, f32 .scale": (
        (2048, 4096), {"weight": ("F8_E4M3", (2048, 4096)), "scale": ("F32", (16, 32))},
        ("fp8_block", "deepseek", {"weight": "weight", "scale": "scale"})),
    "HF / DeepSeek-V3 FP8, weight_scale_inv": (
        (256, 128), {"weight": ("F8_E4M3", (256, 128)), "weight_scale_inv": ("F32", (2, 1))},
        ("fp8_block", "hf-fp8", {"weight": "weight", "scale": "weight_scale_inv"})),
    "compressed-tensors FP8_BLOCK, bf16 weight_scale": (
        (129, 257), {"weight": ("F8_E4M3", (129, 257)), "weight_scale": ("BF16", (2, 3))},
        ("fp8_block", "compressed-tensors", {"weight": "weight", "scale": "weight_scale"})),
    "DeepSeek FP4 experts (I8 + e8m0 per 32)": (
        (64, 96), {"weight": ("I8", (64, 48)), "scale": ("F8_E8M0", (64, 3))},
        ("mxfp4", "deepseek", {"weight": "weight", "scale": "scale"})),
    "compressed-tensors mxfp4-pack-quantized (U8 + U8 exponents)": (
        (64, 96), {"weight_packed": ("U8", (64, 48)), "weight_scale": ("U8", (64, 3))},
        ("mxfp4", "compressed-tensors", {"weight": "weight_packed", "scale": "weight_scale"})),
    "compressed-tensors NVFP4 (W4A4: input_global_scale)": (
        (64, 96), {"weight_packed": ("U8", (64, 48)), "weight_scale": ("F8_E4M3", (64, 6)),
                   "weight_global_scale": ("F32", (1,)), "input_global_scale": ("F32", (1,))},
        ("nvfp4", "compressed-tensors", {"weight": "weight_packed", "weight_scale": "weight_scale",
                                         "weight_global_scale": "weight_global_scale",
                                         "input_global_scale": "input_global_scale"})),
    "ModelOpt NVFP4 (weight_scale_2, input_scale scalars)": (
        (64, 96), {"weight": ("U8", (64, 48)), "weight_scale": ("F8_E4M3", (64, 6)),
                   "weight_scale_2": ("F32", ()), "input_scale": ("F32", ())},
        ("nvfp4", "modelopt", {"weight": "weight", "weight_scale": "weight_scale",
                               "weight_scale_2": "weight_scale_2", "input_scale": "input_scale"})),
    "compressed-tensors W4A16, group 25, rows padded to whole int32": (
        (64, 100), {"weight_packed": ("I32", (64, 13)), "weight_scale": ("BF16", (64, 4)),
                    "weight_shape": ("I64", (2,))},
        ("w4a16", "compressed-tensors", {"weight_packed": "weight_packed", "weight_scale": "weight_scale",
                                         "weight_shape": "weight_shape"})),
    "compressed-tensors W4A16 asymmetric (zero points packed along out)": (
        (20, 64), {"weight_packed": ("I32", (20, 8)), "weight_scale": ("F16", (20, 2)),
                   "weight_zero_point": ("I32", (3, 2))},
        ("w4a16", "compressed-tensors", {"weight_packed": "weight_packed", "weight_scale": "weight_scale",
                                         "weight_zero_point": "weight_zero_point"})),
}


@pytest.mark.parametrize("label", list(DETECTED))
def test_every_format_is_detected_from_its_headers(label):
    (out_f, in_f), tensors, (scheme, variant, roles) = DETECTED[label]
    q = classify(out_f, in_f, tensors)
    assert (q.scheme, q.variant, dict(q.roles)) == (scheme, variant, roles)


# label -> ([out, in], tensors, error class, text the message must contain)
REFUSED = {
    "FP8 weight without its scale": ((256, 128), {"weight": ("F8_E4M3", (256, 128))}, QuantMismatchError,
                                     "an FP8 scale companion"),
    "per-channel FP8 scale": ((256, 128), {"weight": ("F8_E4M3", (256, 128)), "weight_scale": ("BF16", (256, 1))},
                              TensorShapeError, "128x128 block scales of shape [2, 1]"),
    "e4m3 FP8 scale": ((256, 128), {"weight": ("F8_E4M3", (256, 128)), "scale": ("F8_E4M3", (2, 1))},
                       TensorDtypeError, "block scales"),
    "MXFP4 scale per 16": ((64, 96), {"weight": ("I8", (64, 48)), "scale": ("F8_E8M0", (64, 6))}, TensorShapeError,
                           "per-32 scales [64, 3]"),
    "NVFP4 with both global scales": (
        (64, 96), {"weight_packed": ("U8", (64, 48)), "weight_scale": ("F8_E4M3", (64, 6)),
                   "weight_global_scale": ("F32", (1,)), "weight_scale_2": ("F32", ())},
        QuantMismatchError, "exactly one of weight_global_scale / weight_scale_2"),
    "NVFP4 global of two elements": (
        (64, 96), {"weight_packed": ("U8", (64, 48)), "weight_scale": ("F8_E4M3", (64, 6)),
                   "weight_global_scale": ("F32", (2,))}, TensorShapeError, "an F32 scalar"),
    "W4A16 group not dividing in": ((64, 100), {"weight_packed": ("I32", (64, 13)), "weight_scale": ("BF16", (64, 3))},
                                    TensorShapeError, "group scales [64, 100/group]"),
    "companion of another format": ((8, 16), {"weight": ("BF16", (8, 16)), "scale": ("F32", (1, 1))},
                                    QuantMismatchError, "extra scale"),
}


@pytest.mark.parametrize("label", list(REFUSED))
def test_inconsistent_headers_are_refused_by_name(label):
    (out_f, in_f), tensors, cls, text = REFUSED[label]
    with pytest.raises(cls) as e:
        classify(out_f, in_f, tensors)
    assert text in str(e.value) and "model.safetensors" in str(e.value)


# scheme -> role -> stored shape of a logical [300, 256] weight (w4a16 at its default group of 32)
SHAPES_300x256 = {
    "bf16": {"weight": (300, 256)},
    "fp8_block": {"weight": (300, 256), "scale": (3, 2)},
    "mxfp4": {"weight": (300, 128), "scale": (300, 8)},
    "nvfp4": {"weight": (300, 128), "weight_scale": (300, 16), "weight_global_scale": (1,), "weight_scale_2": (1,),
              "input_global_scale": (1,), "input_scale": (1,)},
    "w4a16": {"weight_packed": (300, 32), "weight_scale": (300, 8), "weight_shape": (2,),
              "weight_zero_point": (38, 8)},
}


@pytest.mark.parametrize("scheme", list(SHAPES_300x256))
def test_scheme_records_give_the_documented_role_shapes(scheme):
    record = SCHEMES[scheme]
    assert {r.name: record.shape(r.name, 300, 256) for r in record.roles} == SHAPES_300x256[scheme]


def test_w4a16_zero_points_follow_the_group_read_off_disk():
    assert SCHEMES["w4a16"].shape("weight_zero_point", 300, 256, group=128) == (38, 2)
    assert SCHEMES["w4a16"].block("weight_scale", group=128) == (1, 128)
    assert SCHEMES["fp8_block"].block("scale", group=7) == (128, 128)        # only w4a16 reads its group


def test_every_on_disk_role_suffix_belongs_to_a_scheme_record():
    """The naming rules accept exactly the suffixes some format stores (and nothing a format stores is unnamed)."""
    on_disk = {sfx for s in SCHEMES.values() for r in s.roles for sfx in r.suffixes}
    assert on_disk == set(ROLE_SUFFIXES)


def test_nvfp4_global_scales_combine_as_their_producers_do():
    assert dict(SCHEMES["nvfp4"].globals) == {"weight_global_scale": "divide", "weight_scale_2": "multiply"}


MODULE_GROUPS = {
    "attn.wq_a": "attn", "attn.wq_b": "attn", "attn.wkv": "attn", "attn.wo_a": "attn", "attn.wo_b": "attn",
    "attn.compressor.wkv": "compressor", "attn.compressor.wgate": "compressor",
    "attn.indexer.compressor.wkv": "compressor", "attn.indexer.compressor.wgate": "compressor",
    "attn.indexer.wq_b": "indexer", "attn.indexer.weights_proj": "router", "ffn.gate": "router",
    "ffn.experts.0.w1": "experts", "ffn.experts.255.w2": "experts", "ffn.shared_experts.w3": "shared_experts",
    "e_proj": "e_proj", "h_proj": "h_proj", "head": "head",
}


def test_every_linear_module_has_its_quant_group():
    assert {m: group_of(m) for m in MODULE_GROUPS} == MODULE_GROUPS
    assert GROUPS == ("attn", "compressor", "indexer", "router", "experts", "shared_experts", "e_proj", "h_proj")
    table = {g: f"s_{g}" for g in GROUPS}
    assert scheme_of(table, "attn.indexer.weights_proj") == "s_router"
    with pytest.raises(KeyError, match="no quant group"):
        group_of("ffn.unknown_proj")
