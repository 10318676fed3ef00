"""The native loader's rule tables and quant-family choice (no vLLM, no torch needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_deepseek_v4.native import tables as T
from vllm_deepseek_v4.native.quant_config import ModuleScheme, choose_family, runtime_name, shard_names
from vllm_deepseek_v4.quant import SCHEMES


def test_import_is_light() -> None:
    code = ("import sys, vllm_deepseek_v4.native, vllm_deepseek_v4.native.tables, "
            "vllm_deepseek_v4.native.quant_config, vllm_deepseek_v4.native.loader, vllm_deepseek_v4.native.standins;"
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("canonical, kind, vllm, shard", [
    ("layers.1.attn.wq_a", "target", "model.layers.1.attn.fused_wqa_wkv", 0),
    ("layers.1.attn.wkv", "target", "model.layers.1.attn.fused_wqa_wkv", 1),
    ("layers.2.attn.compressor.wgate", "target", "model.layers.2.attn.compressor.fused_wkv_wgate", 1),
    ("layers.1.attn.indexer.compressor.wkv", "target", "model.layers.1.attn.indexer.compressor.fused_wkv_wgate", 0),
    ("layers.0.ffn.shared_experts.w3", "target", "model.layers.0.ffn.shared_experts.gate_up_proj", 1),
    ("layers.0.ffn.shared_experts.w2", "target", "model.layers.0.ffn.shared_experts.down_proj", None),
    ("layers.3.ffn.gate.bias", "target", "model.layers.3.ffn.gate.e_score_correction_bias", None),
    ("head", "target", "lm_head", None),
    ("embed.weight", "target", "model.embed_tokens.weight", None),
    ("mtp.0.attn.wq_a", "mtp", "model.layers.4.mtp_block.attn.fused_wqa_wkv", 0),
    ("mtp.0.e_proj", "mtp", "model.layers.4.e_proj", None),
    ("mtp.0.norm.weight", "mtp", "model.layers.4.shared_head.norm.weight", None),
    ("mtp.0.hc_head_fn", "mtp", "model.layers.4.hc_head_fn", None),
    ("head", "mtp", "model.layers.4.shared_head.head", None),
])
def test_lookup(canonical: str, kind: str, vllm: str, shard: object) -> None:
    t = T.lookup(kind, canonical, 4, 0)
    assert t is not None and (t.vllm, t.shard) == (vllm, shard)


def test_experts_and_other_class() -> None:
    t = T.lookup("target", "layers.2.ffn.experts.7.w3", 4)
    assert (t.kind, t.vllm, t.expert, t.shard) == (T.EXPERTS, "model.layers.2.ffn", 7, "w3")
    t = T.lookup("mtp", "mtp.0.ffn.experts.1.w2", 4)
    assert (t.vllm, t.expert, t.shard) == ("model.layers.4.mtp_block.ffn", 1, "w2")
    assert T.lookup("target", "mtp.0.e_proj", 4) is None
    assert T.lookup("mtp", "layers.0.attn.wq_a", 4) is None


def test_role_names_cover_scheme_roles() -> None:
    """Every role a scheme can have on disk has a vLLM name in each family that builds that scheme."""
    for family, schemes in T.ROLE_NAMES.items():
        for scheme, names in schemes.items():
            roles = {r.name for r in SCHEMES[scheme].roles}
            if family == "deepseek_fp8" and scheme == "nvfp4":
                roles -= {"weight_global_scale", "input_global_scale"}     # ModelOpt spelling only
            if family == "compressed_tensors" and scheme == "nvfp4":
                roles -= {"weight_scale_2", "input_scale"}                 # compressed-tensors spelling only
            assert roles <= set(names), (family, scheme, roles - set(names))


def test_runtime_names() -> None:
    assert runtime_name("model.layers.4.mtp_block.attn.wq_b") == "model.layers.4.attn.wq_b"
    assert shard_names("model.layers.4.mtp_block.attn.fused_wqa_wkv") == [
        "model.layers.4.attn.wq_a", "model.layers.4.attn.wkv", "model.layers.4.attn.fused_wqa_wkv"]


def test_choose_family() -> None:
    fp8 = ModuleScheme("fp8_block", "deepseek", "F8_E8M0")
    assert choose_family({"m.attn.wq_b": ModuleScheme("bf16")}).family == "unquantized"
    c = choose_family({"m.attn.wq_b": fp8, "m.ffn.experts": ModuleScheme("mxfp4", "deepseek")})
    assert (c.family, c.experts, c.scale_e8m0, c.problems) == ("deepseek_fp8", "mxfp4", True, [])
    c = choose_family({"m.attn.wq_b": ModuleScheme("nvfp4", "compressed-tensors"),
                       "m.ffn.experts": ModuleScheme("w4a16", "compressed-tensors", group=32)})
    assert c.family == "compressed_tensors" and not c.problems
    c = choose_family({"m.attn.wq_b": fp8, "m.ffn.experts": ModuleScheme("nvfp4", "compressed-tensors")})
    assert c.problems and "one config per model" in c.problems[0]
    c = choose_family({"a.ffn.experts": ModuleScheme("mxfp4", "deepseek"), "b.ffn.experts": fp8})
    assert any("one expert method per model" in p for p in c.problems)
