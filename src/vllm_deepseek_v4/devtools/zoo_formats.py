"""Quantized tensors and ``quantization_config`` blocks as the real producers write them (for ``zoo``).

Producers (the on-disk roles of one linear ``X`` from its float weight):

- ``deepseek``: the official release: FP8 block ``X.weight`` F8_E4M3 + ``X.scale`` F8_E8M0; MXFP4 experts
  ``X.weight`` I8 + ``X.scale`` F8_E8M0 (``quant.numerics``, bit-exact with the official decoders);
- ``ct``: compressed-tensors 0.17 itself where it has a compressor: NVFP4 (``NVFP4PackedCompressor``, scales
  from ``generate_gparam`` / ``calculate_qparams``, fed the exact fp32 image of the BF16 weight) and W4A16
  (``PackedQuantizationCompressor``, group 32, symmetric, fed the BF16 weight as llm-compressor does, so its
  scales are BF16). FP8_BLOCK (``X.weight`` + ``X.weight_scale`` F32) comes from ``quant.numerics``, which
  tests/test_quant_numerics.py shows bit-exact with compressed-tensors' own ``quantize``;
- ``modelopt``: ModelOpt NVFP4 ``X.weight`` U8 + ``X.weight_scale`` F8_E4M3 + ``X.weight_scale_2`` F32 +
  ``X.input_scale`` F32 (``quant.numerics``; ModelOpt itself is not installable here). ``input_scale`` is not
  calibrated (1.0): the portable model and our plugin dequantize weights and never read it.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from vllm_deepseek_v4.quant.numerics import quantize

__all__ = ["PRODUCERS", "quantize_linear", "deepseek_fp8_config", "ct_config", "modelopt_configs", "CT_GROUPS"]

PRODUCERS = ("deepseek", "ct", "modelopt")
W4A16_GROUP = 32          # canada-quant's W4A16 experts (docs/checkpoint-formats.md §6.6)


def _ct_nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.utils import helpers

    wf = w.float()
    g = helpers.generate_gparam(wf.min(), wf.max())
    groups = wf.reshape(wf.shape[0], -1, 16)
    scale, _ = helpers.calculate_qparams(groups.amin(-1), groups.amax(-1), _ct_scheme("NVFP4A16").weights,
                                         global_scale=g)
    with torch.compiler.set_stance("force_eager"):      # its e2m1 rounding is torch.compile'd; eager is the same
        out = NVFP4PackedCompressor.compress({"weight": wf, "weight_scale": scale, "weight_global_scale": g},
                                             _ct_scheme("NVFP4A16"))
    return dict(out)


def _ct_w4a16(w: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import helpers

    scheme = _ct_scheme("W4A16")
    groups = w.reshape(w.shape[0], -1, W4A16_GROUP)
    scale, zp = helpers.calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    return dict(PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                      scheme))


def _ct_scheme(preset: str, targets: list[str] | None = None) -> Any:
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    fields = dict(PRESET_SCHEMES[preset])
    if preset == "W4A16":
        fields["weights"] = fields["weights"].model_copy(update={"group_size": W4A16_GROUP})
    return QuantizationScheme(targets=targets or ["Linear"], **fields)


def quantize_linear(scheme: str, producer: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """On-disk role suffix -> tensor for the float weight ``w [out, in]`` (e.g. ``{"weight", "scale"}``)."""
    key = (scheme, producer)
    if key == ("fp8_block", "deepseek"):
        parts = quantize("fp8_block", w, scale_dtype="e8m0")
        return {"weight": parts["weight"], "scale": parts["scale"]}
    if key == ("mxfp4", "deepseek"):
        return quantize("mxfp4", w, flavor="deepseek")
    if key == ("fp8_block", "ct"):
        parts = quantize("fp8_block", w, scale_dtype="f32")
        return {"weight": parts["weight"], "weight_scale": parts["scale"]}
    if key == ("nvfp4", "ct"):
        return _ct_nvfp4(w)
    if key == ("w4a16", "ct"):
        return _ct_w4a16(w)
    if key == ("nvfp4", "modelopt"):
        return quantize("nvfp4", w, flavor="modelopt", with_input_scale=True)
    raise ValueError(f"no producer {producer!r} for scheme {scheme!r} (have: deepseek fp8_block/mxfp4, "
                     "ct fp8_block/nvfp4/w4a16, modelopt nvfp4)")


# ---- quantization_config blocks ----
def deepseek_fp8_config(**extra: Any) -> dict[str, Any]:
    """The official release's block (no ignore list: unquantized modules simply have no ``.scale``)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], **extra}


# upstream-name targets of each quant group (re.match semantics: anchored at the start)
_TARGETS = {
    "attn": r"re:.*\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)$",
    "indexer": r"re:.*\.attn\.indexer\.wq_b$",
    "shared_experts": r"re:.*\.ffn\.shared_experts\.(w1|w2|w3)$",
    "experts": r"re:.*\.ffn\.experts\.\d+\.(w1|w2|w3)$",
    "e_proj": r"re:^mtp\.\d+\.e_proj$",
    "h_proj": r"re:^mtp\.\d+\.h_proj$",
}
_PRESET = {"nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"), "w4a16": ("W4A16", "pack-quantized"),
           "fp8_block": ("FP8_BLOCK", "float-quantized")}
CT_GROUPS = tuple(_TARGETS)


def ct_config(schemes: dict[str, dict[str, str]], n_layers: int) -> dict[str, Any]:
    """compressed-tensors ``quantization_config`` for ``schemes[part][group]`` (``main`` / ``mtp.0``), built
    with compressed-tensors' own ``QuantizationConfig``; one config group per scheme, targets in upstream
    names; an MTP left BF16 is ignored both by checkpoint name and by vLLM's runtime prefix ``layers.{L}``."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    mtp_quantized = any(s != "bf16" for part, g in schemes.items() if part.startswith("mtp.") for s in g.values())
    trunk_quantized = any(s != "bf16" for part, g in schemes.items() if not part.startswith("mtp.") for s in g.values())
    per_group: dict[str, str] = {}
    for part, groups in schemes.items():
        if part.startswith("mtp.") and not mtp_quantized:
            continue                                               # ignored below
        for group, scheme in groups.items():
            if per_group.setdefault(group, scheme) != scheme:     # targets name groups, not stacks
                raise ValueError(f"ct_config: group {group!r} is {per_group[group]} in one stack and {scheme} in "
                                 "another; upstream-name targets cannot tell them apart")
    by_scheme: dict[str, list[str]] = {}
    for group, scheme in per_group.items():
        if scheme != "bf16":
            target = _TARGETS[group] if trunk_quantized else _mtp_only(_TARGETS[group], n_layers)
            by_scheme.setdefault(scheme, []).append(target)
    groups = {}
    for i, (scheme, targets) in enumerate(sorted(by_scheme.items())):
        preset, fmt = _PRESET[scheme]
        g = _ct_scheme(preset, targets)
        g.format = fmt
        groups[f"group_{i}"] = g
    ignore = ["head", r"re:.*embed.*", r"re:.*norm.*", r"re:.*\.gate$", r"re:.*compressor\..*", r"re:.*hc_.*"]
    if not any("indexer" in t for ts in by_scheme.values() for t in ts):
        ignore.append(r"re:.*\.indexer\..*")
    if not mtp_quantized:
        ignore += [r"re:^mtp\..*", rf"re:.*\.layers\.{n_layers}\..*"]
    fmts = {_PRESET[s][1] for s in by_scheme}
    qc = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED,
                            format=fmts.pop() if len(fmts) == 1 else "mixed-precision")
    out: dict[str, Any] = json.loads(qc.model_dump_json())
    return out


def _mtp_only(target: str, n_layers: int) -> str:
    """``target`` restricted to the MTP block, in checkpoint names (``mtp.K.``) and vLLM's runtime prefix
    (``model.layers.{L}.``, the first MTP layer), for a draft quantized under a BF16 trunk."""
    if target.startswith(r"re:^mtp\."):
        return target
    if not target.startswith("re:.*\\."):
        raise ValueError(f"ct_config: cannot restrict target {target!r} to the MTP block")
    return rf"re:^(mtp\.\d+|model\.layers\.{n_layers})\." + target[len("re:.*\\."):]


def modelopt_configs(nvfp4_modules: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config.json quantization_config, hf_quant_config.json)`` of the published DSv4 NVFP4 layout: native
    FP8 (DeepSeek block, e8m0) everywhere it was, ModelOpt NVFP4 main routed experts, the MTP untouched
    (docs/checkpoint-formats.md §5 and §6.8; the published files themselves are unverified). vLLM reads the
    ``fp8`` block with ``moe_quant_algo: NVFP4``; ModelOpt's own file lists the NVFP4 modules
    (``MIXED_PRECISION``)."""
    excluded = ["*.attn.*", "*.ffn.shared_experts.*", "*.ffn.gate", "head", "embed", "mtp.*"]
    quantization = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "moe_quant_algo": "NVFP4",
                    "quantized_layers": {m: {"quant_algo": "NVFP4", "group_size": 16} for m in nvfp4_modules},
                    "exclude_modules": excluded}
    hf_quant = {"producer": {"name": "modelopt", "version": "none: layout emulated by vllm_deepseek_v4.devtools.zoo"},
                "quantization": quantization}
    return deepseek_fp8_config(moe_quant_algo="NVFP4"), hf_quant
