"""One tiny model written in many layouts: naming, quant format and aliases change nothing they should not.

Every layout is written from the same BF16 weights (``artifacts.float_tensors``); quantized layouts hold the
real quantization of those weights (``quant.numerics.quantize``), not random bytes. Checked:

- layouts holding the same values give bit-identical main *and* MTP draft logits (each draft is fed its own
  artifact's main-model streams and the ids shifted by one);
- a quantized layout computes exactly the BF16 model whose quantized linears are replaced by
  ``dequantize(quantize(w))``: per module, and end to end (bit-identical logits);
- a quantized layout is close to the BF16 model: its logits' relative error is bounded by a small multiple of
  the relative error quantization puts on the weights themselves (on a config with no discrete selection
  left, so near-tied expert / indexer picks cannot flip and amplify the difference).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import NATIVE, canonical_tensors, float_tensors, make_config, to_convention, write_artifact

from vllm_deepseek_v4.kernels.linear import dequantized_weight
from vllm_deepseek_v4.loader.load import load_model
from vllm_deepseek_v4.model.linear import QLinear
from vllm_deepseek_v4.quant.numerics import dequantize, quantize

CFG = make_config()
NO_SELECTION = make_config(num_experts_per_tok=4, index_topk=128)     # every expert, every compressed entry
NVFP4_TRUNK = {"main": {"attn": "nvfp4", "shared_experts": "nvfp4", "experts": "nvfp4"}}   # MTP stays BF16
FP8_ONLY = {"main": {"attn": "fp8_block", "indexer": "fp8_block", "shared_experts": "fp8_block",
                     "experts": "fp8_block"}}


def _dup_aliases(t: dict[str, torch.Tensor]) -> None:
    t["mtp.0.head.weight"] = t["head.weight"].float()             # an fp32 copy of the shared head
    t["mtp.0.emb.tok_emb.weight"] = t["embed.weight"].clone()


# name -> (schemes, flavor, convention, fuse, edit)
Layout = tuple[dict[str, dict[str, str]] | None, str, str, bool, Callable[[dict[str, torch.Tensor]], None] | None]
LAYOUTS: dict[str, Layout] = {
    "upstream fp8 attn + mxfp4 experts (native)": (NATIVE, "", "upstream", True, None),
    "HF names, fp8 weight_scale_inv + mxfp4": (NATIVE, "hf", "hf", False, None),
    "upstream bf16": (None, "", "upstream", True, None),
    "HF names bf16": (None, "", "hf", True, None),
    "vLLM-internal names bf16 (fused)": (None, "", "vllm", True, None),
    "duplicated head/embed aliases in mtp.0": (None, "", "upstream", True, _dup_aliases),
    "nvfp4 trunk + bf16 mtp (compressed-tensors)": (NVFP4_TRUNK, "", "upstream", True, None),
    "nvfp4 trunk + bf16 mtp (ModelOpt)": (NVFP4_TRUNK, "modelopt", "upstream", True, None),
    "fp8 everywhere in the trunk, bf16 mtp": (FP8_ONLY, "", "upstream", True, None),
}
SAME_VALUES = {   # layouts that must compute bit-identically, first one is the reference
    "bf16": ["upstream bf16", "HF names bf16", "vLLM-internal names bf16 (fused)",
             "duplicated head/embed aliases in mtp.0"],
    "native": ["upstream fp8 attn + mxfp4 experts (native)", "HF names, fp8 weight_scale_inv + mxfp4"],
}
QUANTIZED = [name for name, (schemes, *_) in LAYOUTS.items() if schemes]


def write_layout(path: Any, cfg: dict[str, Any], name: str) -> Any:
    schemes, flavor, convention, fuse, edit = LAYOUTS[name]
    t = to_convention(canonical_tensors(cfg, schemes, flavor=flavor), convention, cfg, fuse=fuse)
    if edit:
        edit(t)
    return write_artifact(path, t, cfg)


def run(model: Any, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Main and MTP-draft logits on 264 tokens (window 8, ratios 4 and 128: every compressor emits)."""
    ids = torch.randint(0, cfg["vocab_size"], (1, 264), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        main, hidden = model(ids)
        draft, _ = model.forward_mtp(hidden[:, :-1], ids[:, 1:], model.new_mtp_state(), k=0)
    return main, draft


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, dict[str, Any]], tuple[Any, Any, Any]]:
    """``(cfg_label, layout) -> (model, main logits, draft logits)``, each built and loaded once."""
    cache: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def get(name: str, cfg: dict[str, Any] = CFG) -> tuple[Any, Any, Any]:
        key = (name, "no-selection" if cfg is NO_SELECTION else "default")
        if key not in cache:
            path = write_layout(tmp_path_factory.mktemp("layout"), cfg, name)
            model, plan = load_model(str(path), dtype=torch.float32, progress=False)
            assert plan.naming == LAYOUTS[name][2]
            cache[key] = (model, *run(model, cfg))
        return cache[key]
    return get


@pytest.mark.parametrize("group", list(SAME_VALUES))
def test_layouts_with_the_same_values_give_bit_identical_main_and_mtp_logits(loaded, group):
    _, main, draft = loaded(SAME_VALUES[group][0])
    for name in SAME_VALUES[group][1:]:
        _, m, d = loaded(name)
        assert torch.equal(m, main), f"{name}: main logits differ from {SAME_VALUES[group][0]}"
        assert torch.equal(d, draft), f"{name}: MTP draft logits differ from {SAME_VALUES[group][0]}"


def test_at_least_six_layouts_and_real_quantized_values():
    assert len(LAYOUTS) >= 6
    t = canonical_tensors(CFG, NATIVE)
    w = float_tensors(CFG)["layers.1.attn.wq_a.weight"]
    parts = {"weight": t["layers.1.attn.wq_a.weight"], "scale": t["layers.1.attn.wq_a.scale"]}
    assert torch.equal(parts["weight"].view(torch.uint8), quantize("fp8_block", w)["weight"].view(torch.uint8))
    assert (dequantize("fp8_block", parts, *w.shape) - w.float()).abs().max() < 0.1 * w.float().abs().max()


def _qdq_reference(loaded, name: str) -> Any:
    """The BF16 model with every linear that ``name`` quantizes replaced by ``dequantize(quantize(w))``."""
    ref, _, _ = loaded("upstream bf16")
    model, _, _ = loaded(name)
    expected = float_tensors(CFG)
    checked = 0
    ref = copy.deepcopy(ref)
    ref_mods = dict(ref.named_modules())
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, QLinear):
            continue
        w = expected[f"{mod_name}.weight"]
        got = dequantized_weight(mod, torch.float32)
        if mod.scheme == "bf16":
            assert torch.equal(got, w.float()), mod_name
            continue
        opts = {"flavor": "modelopt"} if "ModelOpt" in name else {}
        want = dequantize(mod.scheme, quantize(mod.scheme, w, **opts), *w.shape)
        assert torch.equal(got, want), f"{name}: {mod_name} ({mod.scheme}) is not the quantize->dequantize of bf16"
        ref_mods[mod_name].weight = torch.nn.Parameter(want, requires_grad=False)
        checked += 1
    assert checked > 0
    return ref


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_layout_computes_exactly_the_qdq_of_the_bf16_model(loaded, name):
    ref = _qdq_reference(loaded, name)
    _, main, draft = loaded(name)
    want_main, want_draft = run(ref, CFG)
    assert torch.equal(main, want_main) and torch.equal(draft, want_draft)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _weight_rel_error(schemes: dict[str, dict[str, str]], flavor: str) -> float:
    """Relative error quantization puts on the weights of the quantized linears (all of them together)."""
    bf16, q = float_tensors(NO_SELECTION), canonical_tensors(NO_SELECTION, schemes, flavor=flavor)
    num = den = 0.0
    for key, w in bf16.items():
        stem = key[: -len(".weight")]
        stored = q.get(key, q.get(stem + ".weight_packed"))
        if w.ndim == 2 and stored is not None and stored.dtype != w.dtype:      # this linear was quantized
            roles = {k[len(stem) + 1:]: t for k, t in q.items() if k.startswith(stem + ".")}
            scheme = next(s for s in ("fp8_block", "mxfp4", "nvfp4") if _fits(s, roles))
            roles = {_CANONICAL_ROLE.get(r, r): t for r, t in roles.items()}
            d = dequantize(scheme, roles, *w.shape) - w.float()
            num, den = num + float(d.pow(2).sum()), den + float(w.float().pow(2).sum())
    return (num / den) ** 0.5


_CANONICAL_ROLE = {"weight_packed": "weight", "weight_scale_inv": "scale"}     # on-disk suffix -> role


def _fits(scheme: str, roles: dict[str, torch.Tensor]) -> bool:
    w = roles.get("weight", roles.get("weight_packed"))
    return {"fp8_block": w.dtype == torch.float8_e4m3fn, "mxfp4": w.dtype == torch.int8,
            "nvfp4": w.dtype == torch.uint8}[scheme]


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_layout_is_close_to_bf16(loaded, name):
    _, main_bf16, draft_bf16 = loaded("upstream bf16", NO_SELECTION)
    _, main, draft = loaded(name, NO_SELECTION)
    w_err = _weight_rel_error(LAYOUTS[name][0] or {}, LAYOUTS[name][1])
    for what, got, want in (("main", main, main_bf16), ("mtp", draft, draft_bf16)):
        err = _rel(got, want)
        assert 0 < err < 3 * w_err, f"{name} {what}: logits rel error {err:.3g}, weights {w_err:.3g}"
