"""Where vLLM's DeepSeek-V4 forward has no kernel for a module's format, ours runs (``native/draft_kernels.py``).

The one gap in vLLM 0.32's ``nvidia`` classes under the draft's own quant config: the attention output
projection reads ``wo_a.weight`` directly (``fp8_einsum`` for e4m3, else ``torch.bmm``), so an NVFP4 ``wo_a``
would be multiplied as packed bytes. Shown here on CPU:

- ``kernels.dense_triton.dense_fp4`` (Triton, run in its CPU interpreter in a subprocess) decodes every fp4
  variant exactly as the torch reference ``quant.numerics.dequantize``;
- on the compressed-tensors NVFP4 layout (vLLM geometry), vLLM alone leaves ``wo_a.weight`` as uint8 codes
  after its processing; with ours the draft's (and trunk's) ``wo_a`` report ``DenseFp4WeightMethod``, load the
  same bytes, and after ``process_weights_after_loading`` hold a 16-bit weight decoded by the Triton kernel,
  whose grouped product (vLLM's non-FP8 ``o_proj`` step) matches ``grouped_linear_ref`` on the checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = "nvfp4_trunk_nvfp4_mtp"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _interpret(code: str, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLLM_PLUGINS": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DSV4_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


_DENSE = """
import json, torch
from vllm_deepseek_v4.kernels.dense_triton import dense_fp4
from vllm_deepseek_v4.quant.numerics import dequantize, quantize
out = {}
for scheme, opts in (("nvfp4", {"flavor": "compressed-tensors"}), ("nvfp4", {"flavor": "modelopt"}),
                     ("mxfp4", {"flavor": "deepseek"}), ("mxfp4", {"flavor": "compressed-tensors"})):
    torch.manual_seed(0)
    N, K = 37, 288                      # rows not a multiple of the block, K not of the 256-column program
    parts = quantize(scheme, torch.randn(N, K) * 3, **opts)
    ref = dequantize(scheme, parts, N, K, dtype=torch.float32)
    got = dense_fp4(scheme, parts, N, K, torch.float32)
    out[f"{scheme}-{opts['flavor']}"] = [float((got - ref).abs().max()), float(ref.abs().max())]
print("RESULT " + json.dumps(out))
"""


@needs_triton
def test_dense_fp4_decode_equals_the_torch_reference() -> None:
    doc = _interpret(_DENSE)
    assert set(doc) == {"nvfp4-compressed-tensors", "nvfp4-modelopt", "mxfp4-deepseek", "mxfp4-compressed-tensors"}
    for variant, (err, peak) in doc.items():
        assert peak > 1.0, variant                                 # a real matrix, not zeros
        assert err <= 1e-6 * peak, (variant, err)                  # exact up to fp32 rounding order


@pytest.fixture(scope="module")
def nvfp4_layout(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("draft_kernels")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/vllm_geometry_model.py"), str(base / "geo")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    from vllm_deepseek_v4.devtools.zoo import copy_tokenizer, read_source, write_layout

    floats, raw, cfg = read_source(str(base / "geo"))
    write_layout(base / LAYOUT, LAYOUT, floats, raw, cfg)
    copy_tokenizer(str(base / "geo"), base / LAYOUT)
    return base / LAYOUT


_LOAD = """
import json, sys, torch
from vllm_deepseek_v4.kernels.linear import grouped_linear_ref
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.loader.stream import iter_plan_tensors
from vllm_deepseek_v4.native import load_native
from vllm_deepseek_v4.quant.numerics import dequantize

path = sys.argv[1]
plan = build_plan(path)
canon = dict(iter_plan_tensors(plan, progress=False))
docs = {}
for own in (False, True):
    res = load_native(path, device="cpu", plan=plan, own_kernels=own)
    out = docs[str(int(own))] = {"ok": res.ok, "problems": res.problems[:5], "reports": {}}
    for kind, rep in res.reports.items():
        out["reports"][kind] = {"own_kernels": rep.own_kernels, "mismatches": rep.quant_mismatches,
                                "methods": {m: v for m, v in rep.quant_methods.items() if m.endswith("wo_a")}}
    wo = res.mtp.model.layers["4"].mtp_block.attn.wo_a
    packed = canon["mtp.0.attn.wo_a.weight"].view(torch.uint8)
    out["packed_equal_before"] = bool(torch.equal(wo.weight_packed.data, packed))
    res.process_weights()
    out["after"] = {n: [str(p.dtype), list(p.shape)] for n, p in wo.named_parameters()}
    out["decoder"] = getattr(wo, "dsv4_decoder", None)
    if own:
        attn = res.mtp.model.layers["4"].mtp_block.attn
        G, o = attn.n_local_groups, attn.o_lora_rank
        parts = {r: canon[f"mtp.0.attn.wo_a.{r}"] for r in ("weight", "weight_scale", "weight_global_scale")}
        N, K = wo.weight.shape
        ref_w = dequantize("nvfp4", parts, N, K, dtype=torch.bfloat16)
        out["weight_equal"] = bool(torch.equal(wo.weight.data, ref_w))
        torch.manual_seed(1)
        x = torch.randn(5, G, K, dtype=torch.bfloat16)
        # vLLM's o_proj for a non-e4m3 wo_a (nvidia/ops/o_proj.py): bmm over weight.view(G, o_lora_rank, -1)
        z = torch.empty(5, G, o, dtype=torch.bfloat16)
        torch.bmm(x.transpose(0, 1), wo.weight.view(G, o, -1).transpose(1, 2), out=z.transpose(0, 1))
        class Ref:
            scheme, in_features, out_features = "nvfp4", K, N
            def parts(self):
                return parts
        ref = grouped_linear_ref(x.float(), Ref(), G)
        out["rel_err"] = float((z.float() - ref).norm() / ref.norm())
print("RESULT " + json.dumps(docs))
"""


@pytest.mark.slow
@needs_vllm
@needs_triton
def test_nvfp4_wo_a_runs_our_kernel(nvfp4_layout: Path) -> None:
    both = _interpret(_LOAD, str(nvfp4_layout))
    stock, doc = both["0"], both["1"]
    assert stock["ok"], stock["problems"]
    assert stock["after"]["weight"][0] == "torch.uint8"           # vLLM alone: o_proj would bmm packed codes
    assert stock["reports"]["mtp"]["own_kernels"] == {}
    assert doc["ok"], doc["problems"]
    wo_a = "model.layers.4.mtp_block.attn.wo_a"
    mtp = doc["reports"]["mtp"]
    assert mtp["methods"][wo_a] == "DenseFp4WeightMethod(CompressedTensorsW4A4Fp4)"
    assert wo_a in mtp["own_kernels"] and "Triton" in mtp["own_kernels"][wo_a]
    assert mtp["mismatches"] == [] and doc["reports"]["target"]["mismatches"] == []
    assert len(doc["reports"]["target"]["own_kernels"]) == 4       # every trunk layer's NVFP4 wo_a too
    assert doc["packed_equal_before"]                              # loading is vLLM's, byte-equal
    assert doc["decoder"] == "triton"                              # the interpreter ran our kernel
    assert doc["after"] == {"weight": ["torch.bfloat16", [256, 512]]}
    assert doc["weight_equal"]
    assert doc["rel_err"] < 1e-2                                    # bf16 products vs the fp32 reference


@needs_vllm
def test_w4a16_wo_a_is_refused() -> None:
    from types import SimpleNamespace

    from vllm_deepseek_v4.native import draft_kernels

    class CompressedTensorsLinearMethod:
        pass

    class CompressedTensorsWNA16:
        pass

    wo_a = SimpleNamespace(quant_method=CompressedTensorsLinearMethod(), scheme=CompressedTensorsWNA16())
    model = SimpleNamespace(named_modules=lambda: [("model.layers.4.mtp_block.attn.wo_a", wo_a)])
    with pytest.raises(NotImplementedError, match=r"model\.layers\.4\.mtp_block\.attn\.wo_a: a w4a16 wo_a"):
        draft_kernels.install(model, None)
