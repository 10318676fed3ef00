"""vLLM's own DeepSeek-V4 classes (``nvidia`` target + MTP) loaded natively from our plan, on CPU.

The artifacts: ``scripts/vllm_geometry_model.py`` (a tiny DSv4 in the geometry vLLM's GPU classes accept)
written into every zoo layout with MTP by ``scripts/build_zoo.py``, once per session. Expected values are
derived here from the checkpoint's canonical tensors with explicit, test-local rules (fused shards
concatenated, experts stacked, roles renamed) -- independent of ``native/tables.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("upstream_bf16", "upstream_fp8_mxfp4", "hf_names_with_mtp", "nvfp4_trunk_bf16_mtp", "nvfp4_trunk_nvfp4_mtp",
           "modelopt_mixed", "w4a16_trunk", "head_embed_duplicated", "vllm_internal")
L = 4          # the geometry model's trunk layers; its MTP layer is vLLM layer 4


@pytest.fixture(scope="session")
def geo_zoo(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("native")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for cmd in ([sys.executable, str(ROOT / "scripts/vllm_geometry_model.py"), str(base / "geo")],
                [sys.executable, str(ROOT / "scripts/build_zoo.py"), str(base / "geo"), str(base / "zoo"), "--no-load"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return base / "zoo"


# ---- expected values, test-local ----
_FUSED = {"attn.fused_wqa_wkv": ("attn.wq_a", "attn.wkv"), "compressor.fused_wkv_wgate": ("compressor.wkv", "compressor.wgate"),
          "shared_experts.gate_up_proj": ("shared_experts.w1", "shared_experts.w3")}
# vLLM parameter suffix -> canonical roles it may hold (whichever the module has on disk)
_ROLES = {"weight": ("weight",), "weight_scale_inv": ("scale",), "weight_scale": ("weight_scale", "scale"),
          "weight_packed": ("weight", "weight_packed"), "weight_global_scale": ("weight_global_scale",),
          "input_global_scale": ("input_global_scale",), "weight_scale_2": ("weight_scale_2",),
          "input_scale": ("input_scale",), "weight_shape": ("weight_shape",), "weight_zero_point": ("weight_zero_point",)}


def _canonical(kind: str, pname: str) -> str:
    """vLLM parameter path -> canonical module/tensor path (without the role)."""
    if kind == "target":
        name = {"lm_head.weight": "head.weight", "model.embed_tokens.weight": "embed.weight"}.get(pname, pname)
        name = re.sub(r"^model\.", "", name)
    else:
        m = re.match(r"^model\.layers\.(\d+)\.(mtp_block\.)?(.*)$", pname)
        name = f"mtp.{int(m.group(1)) - L}.{m.group(3).replace('shared_head.norm', 'norm')}"
    return name.replace("gate.e_score_correction_bias", "gate.bias").replace("shared_experts.down_proj",
                                                                              "shared_experts.w2")


def _role(canon: dict, module: str, suffix: str):
    for r in _ROLES[suffix]:
        if f"{module}.{r}" in canon:
            return canon[f"{module}.{r}"]
    raise KeyError(f"{module}.{suffix}")


def _expected(torch, canon: dict, kind: str, pname: str, n_experts: int):
    name = _canonical(kind, pname)
    if name in canon:                                   # plain tensors
        return canon[name]
    module, _, suffix = name.rpartition(".")
    m = re.match(r"^(.*)\.experts\.routed_experts\.(w13|w2)_(.*)$", module + "." + suffix)
    if m:
        ffn, which, sfx = m.groups()
        parts = ("w1", "w3") if which == "w13" else ("w2",)
        return torch.stack([_join(torch, [_role(canon, f"{ffn}.experts.{e}.{p}", sfx) for p in parts], sfx)
                            for e in range(n_experts)])
    for fused, shards in _FUSED.items():
        if module.endswith(fused):
            head = module[: -len(fused)]
            return _join(torch, [_role(canon, head + s, suffix) for s in shards], suffix)
    return _role(canon, module, suffix)


def _join(torch, shards: list, suffix: str):
    """Shards of one merged vLLM parameter: concatenated along the output dim; a W4A16 ``weight_shape``
    (vLLM keeps one logical shape per merged module: every shard writes the same value) must agree."""
    if suffix == "weight_shape":
        assert all(torch.equal(t, shards[0]) for t in shards), shards
        return shards[0]
    return torch.cat([t.reshape(1) if t.dim() == 0 else t for t in shards])


def _same(torch, got, want) -> bool:
    if got.numel() != want.numel():
        return False
    want = want.reshape(got.shape)
    if got.dtype == want.dtype:
        return torch.equal(got, want)
    if got.element_size() == want.element_size() and not (got.is_floating_point() and want.is_floating_point()
                                                          and got.dtype != torch.float8_e8m0fnu):
        return torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))     # same bytes
    return torch.equal(got.float(), want.float())


def _check_values(res, canon: dict) -> list[str]:
    import torch

    bad = []
    n_exp = res.plan.cfg.n_routed_experts
    for kind, model in (("target", res.target), ("mtp", res.mtp)):
        rep = res.reports[kind]
        pads = {p["param"] for p in rep.padding}
        for pname, p in model.named_parameters():
            if kind == "mtp" and pname in rep.shared:
                continue
            got = p.detach()
            if pname.endswith("attn_sink"):
                h = res.plan.cfg.n_heads
                want = canon[_canonical(kind, pname)]
                if not (torch.equal(got[:h], want) and bool(torch.isinf(got[h:]).all())):
                    bad.append(pname)
                continue
            if pname in pads:                    # vLLM-only parameters: the reason's value
                if not bool((got == 1.0).all()):
                    bad.append(f"{pname} (vLLM-only, expected 1.0)")
                continue
            try:
                want = _expected(torch, canon, kind, pname, n_exp)
            except KeyError as e:
                bad.append(f"{pname}: no expected value ({e})")
                continue
            if not _same(torch, got, want):
                bad.append(f"{pname}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}")
    return bad


# what the MTP's quant methods must be, per layout (module family -> vLLM class name)
MTP_METHODS = {
    "upstream_bf16": {"linear": "UnquantizedLinearMethod", "experts": "UnquantizedFusedMoEMethod"},
    "nvfp4_trunk_bf16_mtp": {"linear": "UnquantizedLinearMethod", "experts": "UnquantizedFusedMoEMethod"},
    "w4a16_trunk": {"linear": "UnquantizedLinearMethod", "experts": "UnquantizedFusedMoEMethod"},
    "upstream_fp8_mxfp4": {"linear": "Fp8LinearMethod", "experts": "Mxfp4MoEMethod"},
    "modelopt_mixed": {"linear": "Fp8LinearMethod", "experts": "Mxfp4MoEMethod"},
    "nvfp4_trunk_nvfp4_mtp": {"linear": "CompressedTensorsLinearMethod(CompressedTensorsW4A4Fp4)",
                              "experts": "CompressedTensorsW4A4Nvfp4MoEMethod"},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_native_cpu_load_equals_checkpoint(geo_zoo: Path, layout: str) -> None:
    from vllm_deepseek_v4.loader import build_plan
    from vllm_deepseek_v4.loader.stream import iter_plan_tensors
    from vllm_deepseek_v4.native import load_native

    path = str(geo_zoo / layout)
    plan = build_plan(path)
    res = load_native(path, device="cpu", plan=plan)
    assert res.ok, (res.problems, {k: r.to_json() for k, r in res.reports.items()})
    for kind, rep in res.reports.items():
        assert rep.covered + sum(1 for p in rep.padding if p["param"] not in rep.filled
                                 and not p["param"].endswith("attn_sink")) == rep.params, kind
    canon = dict(iter_plan_tensors(plan, progress=False))
    assert _check_values(res, canon) == []
    # PP = 1: the draft uses the target's embedding and head modules (no second copy), sourced top-level
    assert res.mtp.model.embed_tokens is res.target.model.embed_tokens
    assert res.mtp.model.layers[str(L)].shared_head.head is res.target.lm_head
    assert {s["source"] for s in res.reports["mtp"].shared.values()} <= {"embed.weight", "head.weight",
                                                                         "model.embed_tokens.weight", "lm_head.weight"}
    methods = res.reports["mtp"].quant_methods
    want = MTP_METHODS.get(layout)
    if want:
        for mod, cls in methods.items():
            if mod.endswith(("embed_tokens", "shared_head.head", "ffn.gate")):
                continue
            kind = "experts" if mod.endswith("routed_experts") else "linear"
            nvfp4_linear = want[kind].startswith("CompressedTensorsLinearMethod(CompressedTensorsW4A4")
            if mod.endswith("attn.wo_a") and nvfp4_linear:
                # vLLM's o_proj has no kernel for an NVFP4 wo_a: ours wraps vLLM's method (draft_kernels.GAPS)
                assert cls == want[kind].replace("CompressedTensorsLinearMethod", "DenseFp4WeightMethod"), (mod, cls)
                continue
            assert cls == want[kind], (mod, cls)
    res.process_weights()
    assert res.processed


@pytest.mark.slow
def test_stock_vllm_bugs_are_reported(geo_zoo: Path) -> None:
    from vllm_deepseek_v4.native import check_vllm

    doc = check_vllm(str(geo_zoo / "modelopt_mixed"))
    assert doc["ok"], doc["problems"]
    unloaded = {u["param"] for u in doc["stock"]["mtp"]["unloaded"]}
    assert {"model.layers.4.mtp_block.ffn.experts.routed_experts.w13_input_scale",
            "model.layers.4.mtp_block.ffn.experts.routed_experts.w2_weight_scale_2"} <= unloaded
    assert doc["mtp"]["quant_methods"]["model.layers.4.mtp_block.ffn.experts.routed_experts"] == "Mxfp4MoEMethod"
    doc = check_vllm(str(geo_zoo / "nvfp4_trunk_nvfp4_mtp"))
    assert doc["ok"], doc["problems"]
    assert doc["stock"]["target"]["exception"].startswith("KeyError")
    assert doc["stock"]["mtp"]["exception"].startswith("KeyError")
    assert doc["target"]["uncovered"] == [] and doc["mtp"]["uncovered"] == []


def test_stock_configs_ignore_the_portable_pass_through(geo_zoo: Path) -> None:
    """A process that registered the portable engine's pass-through quant config (it claims every DSv4
    ``quantization_config``) still gets vLLM's own config for the stock baseline and the native builds: a
    pass-through there leaves vLLM's linears without a quant method (``All linear layers should support quant
    method``). Regression: the suite ran portable-engine tests before these and failed three native tests."""
    from vllm.config import ModelConfig

    from vllm_deepseek_v4.native.build import make_vllm_config
    from vllm_deepseek_v4.native.standins import HF_OVERRIDES, cpu_standins
    from vllm_deepseek_v4.vllm_plugin.quant import QUANT_NAME, register_quant_config

    path = str(geo_zoo / "upstream_fp8_mxfp4")
    register_quant_config()
    with cpu_standins():
        claimed = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, hf_overrides=dict(HF_OVERRIDES),
                              max_model_len=1024)
        assert claimed.quantization == QUANT_NAME       # the pass-through is live in this process
        vc = make_vllm_config(path, native=False)
    assert vc.model_config.quantization != QUANT_NAME
    assert vc.quant_config is not None and vc.quant_config.get_name() != QUANT_NAME
    assert vc.speculative_config.draft_model_config.quantization != QUANT_NAME


@pytest.mark.slow
def test_cli_json_and_exit_codes(geo_zoo: Path, tmp_path: Path) -> None:
    dsv4 = [sys.executable, "-m", "vllm_deepseek_v4.cli.main", "check-vllm"]
    r = subprocess.run([*dsv4, str(geo_zoo / "upstream_fp8_mxfp4"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert {"path", "ok", "device", "tp", "target", "mtp", "stock"} <= set(doc)
    assert {"params", "covered", "uncovered", "unused"} <= set(doc["target"])
    assert {"params", "covered", "uncovered", "quant_methods"} <= set(doc["mtp"])
    assert doc["device"] == "meta" and doc["mtp"]["covered"] == doc["mtp"]["params"]
    assert subprocess.run([*dsv4, str(tmp_path / "nope")], capture_output=True).returncode == 3
    assert subprocess.run([*dsv4, str(geo_zoo / "upstream_bf16"), "--tp", "2", "--device", "cpu"],
                          capture_output=True).returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("upstream_fp8_mxfp4", "nvfp4_trunk_nvfp4_mtp", "modelopt_mixed", "w4a16_trunk"))
def test_native_meta_tp2(geo_zoo: Path, layout: str) -> None:
    """TP = 2 on meta: every rank's vLLM parameters (per-rank shapes, vLLM's TP slicing) filled or explained."""
    from vllm_deepseek_v4.native import check_vllm, load_native

    doc = check_vllm(str(geo_zoo / layout), tp=2, stock=False)
    assert doc["ok"], (doc["problems"], doc["target"]["uncovered"], doc["target"]["errors"], doc["mtp"]["errors"])
    res = load_native(str(geo_zoo / layout), device="meta", tp=2, rank=1)
    wq_b = dict(res.target.named_parameters())
    key = next(k for k in wq_b if k.startswith("model.layers.1.attn.wq_b.weight"))
    assert wq_b[key].shape[0] == 1024 // 2                  # n_heads * head_dim split over 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("layout", ("upstream_fp8_mxfp4", "head_embed_duplicated"))
def test_pp2_draft_loads_head_and_embed_itself(geo_zoo: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PP > 1: vLLM's proposer (``SpecDecodeBaseProposer._maybe_share_embeddings``) keeps the draft's own
    embedding (the target's lives on the first rank); stock vLLM never loads it (its MTP loader skips the
    top-level ``embed``). The registered native draft loads it, and every ``shared_head.head``, from the
    artifact's top-level tensors and records ``case: own`` (also where ``mtp.0`` carries copies). At PP = 1 the
    same proposer code replaces it with the target's module (the ``shared`` case)."""
    import torch
    from vllm.v1.spec_decode import llm_base_proposer
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    import vllm_support as vs
    from vllm_deepseek_v4.loader import build_plan
    from vllm_deepseek_v4.loader.stream import iter_plan_tensors

    path = str(geo_zoo / layout)
    vc, built, _ = vs.load_registered_native(path)
    target, draft = built["target"], built["mtp"]
    canon = dict(iter_plan_tensors(build_plan(path), progress=False))
    head = f"model.layers.{L}.shared_head.head.weight"
    assert draft.dsv4_head_embed == {"model.embed_tokens.weight": {"case": "own", "source": "embed.weight"},
                                     head: {"case": "own", "source": "head.weight"}}
    own_embed = draft.model.embed_tokens
    assert torch.equal(own_embed.weight, canon["embed.weight"].to(own_embed.weight.dtype))
    assert torch.equal(draft.model.layers[str(L)].shared_head.head.weight, canon["head.weight"].to(torch.bfloat16))

    # the proposer state these two methods read (vLLM's SpecDecodeBaseProposer sets them in __init__)
    proposer = type("Proposer", (), {"model": draft, "vllm_config": vc, "use_local_argmax_reduction": False})()
    monkeypatch.setattr(llm_base_proposer, "get_pp_group", lambda: type("PP", (), {"world_size": 2})())
    SpecDecodeBaseProposer._maybe_share_embeddings(proposer, target)
    assert draft.model.embed_tokens is own_embed                  # PP = 2: the draft keeps (and uses) its own
    SpecDecodeBaseProposer._maybe_share_lm_head(proposer, target)
    assert draft.model.layers[str(L)].shared_head.head is target.lm_head       # lm_head: shared at any PP
    monkeypatch.setattr(llm_base_proposer, "get_pp_group", lambda: type("PP", (), {"world_size": 1})())
    SpecDecodeBaseProposer._maybe_share_embeddings(proposer, target)
    assert draft.model.embed_tokens is target.model.embed_tokens  # PP = 1: the target's module
