# SPDX-License-Identifier: Apache-2.0
"""DeepSeek-V4 target + MTP loaded through the load plan (``vllm/models/deepseek_v4/loading``), on CPU.

The ``nvidia`` and ``xpu`` classes are constructed with CPU stand-ins (``cpu_standins.py``: CUDA / XPU
streams, the device capability, kernel oracles; no forward pass runs); ``amd`` needs ROCm to import. Artifacts are written from ``layouts.json``: the real
tensor names, dtypes and shapes of each layout at a small geometry the nvidia classes accept, with seeded
random values. Each class is loaded by its own ``load_weights``, fed vLLM's safetensors iterator, as vLLM's
default loader does.

    VLLM_PLUGINS= python -m pytest tests/models/deepseek_v4
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TREE = HERE.parents[2]
sys.path.insert(0, str(HERE))
from cpu_standins import HF_OVERRIDES, cpu_standins, ensure_distributed  # noqa: E402

LAYOUTS = {k: v for k, v in json.loads((HERE / "layouts.json").read_text()).items() if not k.startswith("_")}
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E8M0": torch.float8_e8m0fnu, "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32,
          "I64": torch.int64}
L = 4     # trunk layers of the test geometry; the MTP block is vLLM layer 4


def _fp8_trunk_bf16_mtp(rows: list, files: dict) -> tuple[list, dict]:
    """vllm#43304: an FP8 + MXFP4 trunk with a BF16 MTP block (quantizers skip the MTP), config still FP8."""
    bf16 = [r for r in LAYOUTS["upstream_bf16"]["tensors"] if r[0].startswith("mtp.")]
    return [r for r in rows if not r[0].startswith("mtp.")] + bf16, files


DERIVED = {"fp8_trunk_bf16_mtp": ("upstream_fp8_mxfp4", _fp8_trunk_bf16_mtp)}


def write_artifact(layout: str, out: Path) -> Path:
    from safetensors.torch import save_file

    base, mutate = DERIVED.get(layout, (layout, None))
    rows, files = LAYOUTS[base]["tensors"], dict(LAYOUTS[base]["files"])
    if mutate is not None:
        rows, files = mutate(rows, files)
    g = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, dt, shape, fname in rows:
        dtype = DTYPES[dt]
        if dtype in (torch.bfloat16, torch.float16, torch.float32) and "scale" in name.rsplit(".", 1)[-1]:
            # float block / group / global scales must be finite and > 0 (the loader checks the values)
            t = (torch.rand(shape, generator=g) * 0.02 + 1e-3).to(dtype)
        elif dtype in (torch.bfloat16, torch.float16, torch.float32):
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        elif dtype in (torch.int32, torch.int64):
            t = torch.randint(0, 8, shape, generator=g, dtype=dtype)
        else:                                     # fp8 / e8m0 / packed fp4: random bytes
            t = torch.randint(0, 120, shape, generator=g, dtype=torch.uint8).view(dtype)
        shards.setdefault(fname, {})[name] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for fname, doc in files.items():
        (out / fname).write_text(json.dumps(doc))
    return out


def vllm_config(path: Path):
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig

    mc = ModelConfig(model=str(path), tokenizer=str(path), skip_tokenizer_init=True, dtype="bfloat16",
                     hf_overrides=dict(HF_OVERRIDES), enforce_eager=True, max_model_len=1024)
    pc = ParallelConfig(tensor_parallel_size=1)
    sc = SpeculativeConfig(method="mtp", num_speculative_tokens=1, target_model_config=mc, target_parallel_config=pc)
    return VllmConfig(model_config=mc, parallel_config=pc, speculative_config=sc)


def build_and_load(path: Path, platform: str = "nvidia"):
    """vLLM's ``platform`` target and MTP built as vLLM builds them (the target's quant config from the
    artifact, passed to the draft too), each loaded by its own ``load_weights`` from vLLM's safetensors
    iterator."""
    import importlib

    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.utils.torch_utils import set_default_torch_dtype

    base = f"vllm.models.deepseek_v4.{platform}"
    DeepseekV4ForCausalLM = importlib.import_module(base + ".model").DeepseekV4ForCausalLM
    DeepSeekV4MTP = importlib.import_module(base + ".mtp").DeepSeekV4MTP

    files = sorted(str(p) for p in path.glob("*.safetensors"))
    out = {}
    with cpu_standins():
        vc = vllm_config(path)
        ensure_distributed(vc)
        for kind, cls, mc in (("target", DeepseekV4ForCausalLM, vc.model_config),
                              ("mtp", DeepSeekV4MTP, vc.speculative_config.draft_model_config)):
            with set_default_torch_dtype(mc.dtype), torch.device("cpu"):
                model = initialize_model(vc, model_class=cls, model_config=mc)
            loaded = model.load_weights(safetensors_weights_iterator(files, False))
            out[kind] = (model, loaded)
    return out


def methods(model) -> dict[str, str]:
    return {n: type(m.quant_method).__name__ for n, m in model.named_modules()
            if getattr(m, "quant_method", None) is not None}


# layout -> the MTP draft's quant methods (e_proj, routed experts)
MTP_METHODS = {
    "upstream_bf16": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
    "upstream_fp8_mxfp4": ("Fp8LinearMethod", "Mxfp4MoEMethod"),
    "fp8_trunk_bf16_mtp": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),      # vllm#43304
    "modelopt_mixed": ("Fp8LinearMethod", "Mxfp4MoEMethod"),           # NVFP4 trunk experts, MXFP4 draft experts
    "hf_names_with_mtp": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
    "vllm_internal": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
    "head_embed_duplicated": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
    # compressed-tensors trunks: stock vLLM raises KeyError (...weight_global_scale / weight_shape) on the target
    "nvfp4_trunk_bf16_mtp": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
    "nvfp4_trunk_nvfp4_mtp": ("CompressedTensorsLinearMethod", "CompressedTensorsW4A4Nvfp4MoEMethod"),
    "w4a16_trunk": ("UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"),
}
# layout -> the target's routed-experts method where its config had to be rebuilt from the plan
TARGET_EXPERTS = {
    "nvfp4_trunk_bf16_mtp": ("CompressedTensorsW4A4Nvfp4MoEMethod",),
    "nvfp4_trunk_nvfp4_mtp": ("CompressedTensorsW4A4Nvfp4MoEMethod",),
    "w4a16_trunk": ("CompressedTensorsWNA16MoEMethod", "CompressedTensorsWNA16MarlinMoEMethod"),
}


# amd does not import on a machine without ROCm; nvidia and xpu construct on CPU with the stand-ins
@pytest.mark.parametrize("platform", ["nvidia", "xpu"])
@pytest.mark.parametrize("layout", sorted(MTP_METHODS))
def test_target_and_mtp_load_completely(layout: str, platform: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = write_artifact(layout, tmp_path / layout)
    if platform == "xpu" and layout in TARGET_EXPERTS:
        # vLLM's xpu classes build compressed-tensors routed experts without their quantized parameters
        # (w13_weight_packed, ...): the plan refuses the load, naming them, instead of leaving them empty
        from vllm.models.deepseek_v4.loading.native.glue import PlanLoadError

        with pytest.raises(PlanLoadError, match=r"routed_experts\.w13_weight_\w+, which this class does not have"):
            build_and_load(path, platform)
        return
    res = build_and_load(path, platform)
    for kind, (model, loaded) in res.items():
        assert loaded == {n for n, _ in model.named_parameters()}, kind
    target, mtp = res["target"][0], res["mtp"][0]
    # vllm#43456: the draft's embedding and head are loaded from the top-level tensors, never left empty
    assert torch.equal(mtp.model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(mtp.model.layers[str(L)].shared_head.head.weight, target.lm_head.weight)
    # a value straight from disk
    name = next(n for n in ("mtp.0.hnorm.weight", "model.mtp.0.hnorm.weight", "model.layers.4.hnorm.weight",
                            "layers.4.hnorm.weight") if any(r[0] == n for r in _rows(layout)))
    f = next(r[3] for r in _rows(layout) if r[0] == name)
    with safe_open(str(path / f), "pt") as fh:
        assert torch.equal(mtp.model.layers[str(L)].hnorm.weight, fh.get_tensor(name))
    m = methods(mtp)
    lin, exp = MTP_METHODS[layout]
    assert m[f"model.layers.{L}.e_proj"] == lin
    assert m[f"model.layers.{L}.mtp_block.ffn.experts.routed_experts"] == exp
    if layout in TARGET_EXPERTS:
        assert methods(target)["model.layers.1.ffn.experts.routed_experts"] in TARGET_EXPERTS[layout]
    # an NVFP4 wo_a: vLLM's o_proj reads the weight itself, so it is decoded at load (loading/native/draft_kernels)
    if layout.startswith("nvfp4_trunk"):
        assert methods(target)["model.layers.1.attn.wo_a"] == "DenseFp4WeightMethod"
    if layout == "nvfp4_trunk_nvfp4_mtp":
        assert m[f"model.layers.{L}.mtp_block.attn.wo_a"] == "DenseFp4WeightMethod"
    assert "vllm_deepseek_v4" not in sys.modules


def _rows(layout: str) -> list:
    base, mutate = DERIVED.get(layout, (layout, None))
    rows = LAYOUTS[base]["tensors"]
    return mutate(rows, {})[0] if mutate else rows


def test_stock_loader_switch_keeps_vllm_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``VLLM_DSV4_STOCK_LOADER=1``: vLLM's own mapping, which skips the draft's top-level head / embed."""
    monkeypatch.setenv("VLLM_DSV4_STOCK_LOADER", "1")
    path = write_artifact("upstream_bf16", tmp_path / "bf16")
    res = build_and_load(path)
    mtp, loaded = res["mtp"]
    assert "model.embed_tokens.weight" not in loaded
    assert f"model.layers.{L}.shared_head.head.weight" not in loaded


def test_unexplained_tensor_is_refused(tmp_path: Path) -> None:
    """A tensor the plan cannot place fails the load with its name (never silently skipped)."""
    from safetensors.torch import save_file

    path = write_artifact("upstream_bf16", tmp_path / "bf16")
    save_file({"mtp.0.surprise.weight": torch.zeros(4)}, str(path / "extra.safetensors"))
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["mtp.0.surprise.weight"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="surprise"):
        build_and_load(path)


def test_planner_imports_without_torch(tmp_path: Path) -> None:
    """The planner (``loading/`` minus ``native/``) is stdlib only: it plans with torch unavailable."""
    path = write_artifact("upstream_fp8_mxfp4", tmp_path / "fp8")
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(TREE / 'vllm/models/deepseek_v4')!r})\n"
            "from loading.loader import build_plan\n"
            f"plan = build_plan({str(path)!r}); assert plan.ok, plan.problems()\n"
            "print(len(plan.params))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 100


def test_every_platform_is_switched() -> None:
    """nvidia, amd and xpu: target + draft ``load_weights``, the draft's and the (compressed-tensors) target's
    quant config use the plan."""
    for platform in ("nvidia", "amd", "xpu"):
        d = TREE / "vllm/models/deepseek_v4" / platform
        model = (d / "model.py").read_text()
        assert '_plan_glue.load_weights_from_plan(\n            self, "target"' in model
        assert "_plan_glue.target_quant_config(vllm_config, vllm_config.quant_config)" in model
        assert "_plan_glue.install_own_kernels(self, vllm_config)" in model
        mtp = (d / "mtp.py").read_text()
        assert '_plan_glue.load_weights_from_plan(\n            self, "mtp"' in mtp
        assert mtp.count("_plan_glue.mtp_quant_config(vllm_config, vllm_config.quant_config)") == 2
        assert "_plan_glue.install_own_kernels(self, vllm_config)" in mtp
