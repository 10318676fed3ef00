"""Where each canonical DSv4 tensor goes in vLLM's own DeepSeek-V4 classes: rules as data.

Canonical names are the upstream release names the load plan speaks (``layers.3.attn.wq_a`` + role
``scale``; ``mtp.0.e_proj``; ``embed.weight``). A rule maps a canonical *scope* (``layers.{L}.``, ``mtp.{K}.``,
the top level) times a *local* row to vLLM's module path, the shard id vLLM's ``weight_loader`` takes for a
fused module, and how the tensor reaches the parameter. Quant roles become vLLM parameter suffixes through
:data:`ROLE_NAMES`, keyed by the vLLM quant-config *family* the module is built under. Routed experts are not
listed per expert: vLLM's own expert mapping (``RoutedExperts.build_expert_params_mapping``) names their
stacked parameters and shard ids at load time.

Nothing here imports torch or vLLM; ``native/loader.py`` applies the tables, ``docs/native.md`` explains them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["Row", "BLOCK_ROWS", "MTP_ROWS", "TOP_ROWS", "MTP_SHARED_ROWS", "SCOPES", "ROLE_NAMES", "PADDINGS",
           "PLATFORMS", "VLLM_ONLY", "EXPERT_RE", "FAMILIES", "lookup", "VllmTarget"]

# how a tensor reaches its parameter
LINEAR = "linear"     # a linear module: each quant role -> <vllm module>.<ROLE_NAMES suffix>, via weight_loader
PLAIN = "plain"       # a plain tensor -> one parameter (weight_loader if it has one, else a checked copy)
SINK = "sink"         # attention sink: heads narrowed to this TP rank, copied into the first n; rest is padding
EXPERTS = "experts"   # routed experts: vLLM's expert mapping gives the stacked parameter and (expert, shard) ids


@dataclass(frozen=True)
class Row:
    """One canonical local name (module for ``LINEAR``/``EXPERTS``, tensor otherwise) and where vLLM keeps it."""

    canonical: str
    vllm: str
    kind: str = PLAIN
    shard: int | str | None = None
    reason: str = ""


# ---- the decoder block: the trunk's layers.{L}. and the MTP's mtp.{K}. (as ...mtp_block.) share these rows ----
BLOCK_ROWS: Final[tuple[Row, ...]] = (
    Row("attn.wq_a", "attn.fused_wqa_wkv", LINEAR, 0, "wq_a and wkv read the same input: one merged column GEMM"),
    Row("attn.wkv", "attn.fused_wqa_wkv", LINEAR, 1, "second shard of fused_wqa_wkv"),
    Row("attn.wq_b", "attn.wq_b", LINEAR), Row("attn.wo_a", "attn.wo_a", LINEAR), Row("attn.wo_b", "attn.wo_b", LINEAR),
    Row("attn.q_norm.weight", "attn.q_norm.weight"), Row("attn.kv_norm.weight", "attn.kv_norm.weight"),
    Row("attn.attn_sink", "attn.attn_sink", SINK, reason="one sink per head; vLLM pads heads for its kernels"),
    Row("attn.compressor.wkv", "attn.compressor.fused_wkv_wgate", LINEAR, 0, "compressor wkv/wgate merged"),
    Row("attn.compressor.wgate", "attn.compressor.fused_wkv_wgate", LINEAR, 1, "second shard of fused_wkv_wgate"),
    Row("attn.compressor.ape", "attn.compressor.ape"), Row("attn.compressor.norm.weight", "attn.compressor.norm.weight"),
    Row("attn.indexer.wq_b", "attn.indexer.wq_b", LINEAR),
    Row("attn.indexer.weights_proj", "attn.indexer.weights_proj", LINEAR),
    Row("attn.indexer.compressor.wkv", "attn.indexer.compressor.fused_wkv_wgate", LINEAR, 0, "indexer compressor merged"),
    Row("attn.indexer.compressor.wgate", "attn.indexer.compressor.fused_wkv_wgate", LINEAR, 1,
        "second shard of the indexer's fused_wkv_wgate"),
    Row("attn.indexer.compressor.ape", "attn.indexer.compressor.ape"),
    Row("attn.indexer.compressor.norm.weight", "attn.indexer.compressor.norm.weight"),
    Row("attn_norm.weight", "attn_norm.weight"), Row("ffn_norm.weight", "ffn_norm.weight"),
    *(Row(f"hc_{s}_{p}", f"hc_{s}_{p}") for s in ("attn", "ffn") for p in ("fn", "base", "scale")),
    Row("ffn.gate", "ffn.gate", LINEAR),
    Row("ffn.gate.bias", "ffn.gate.e_score_correction_bias", reason="vLLM's name for the noaux_tc router bias"),
    Row("ffn.gate.tid2eid", "ffn.gate.tid2eid", reason="hash-layer table; vLLM keeps it int32"),
    Row("ffn.shared_experts.w1", "ffn.shared_experts.gate_up_proj", LINEAR, 0, "w1 (gate) and w3 (up) merged"),
    Row("ffn.shared_experts.w3", "ffn.shared_experts.gate_up_proj", LINEAR, 1, "second shard of gate_up_proj"),
    Row("ffn.shared_experts.w2", "ffn.shared_experts.down_proj", LINEAR, reason="vLLM's name for w2"),
    Row("ffn.experts", "ffn", EXPERTS, reason="stacked w13_/w2_ parameters, named by vLLM's expert mapping"),
)
# ---- the MTP layer's own tensors, below mtp.{K}. -> model.layers.{L+K}. ----
MTP_ROWS: Final[tuple[Row, ...]] = (
    Row("e_proj", "e_proj", LINEAR), Row("h_proj", "h_proj", LINEAR),
    Row("enorm.weight", "enorm.weight"), Row("hnorm.weight", "hnorm.weight"),
    Row("norm.weight", "shared_head.norm.weight", reason="the draft's final norm lives in shared_head"),
    Row("hc_head_fn", "hc_head_fn"), Row("hc_head_base", "hc_head_base"), Row("hc_head_scale", "hc_head_scale"),
)
# ---- top level (target) ----
TOP_ROWS: Final[tuple[Row, ...]] = (
    Row("embed.weight", "model.embed_tokens.weight"), Row("head", "lm_head", LINEAR),
    Row("norm.weight", "model.norm.weight"),
    Row("hc_head_fn", "model.hc_head_fn"), Row("hc_head_base", "model.hc_head_base"),
    Row("hc_head_scale", "model.hc_head_scale"),
)
# ---- the top-level tensors the MTP draft reads: shared with the target (PP = 1) or loaded by the draft ----
MTP_SHARED_ROWS: Final[tuple[Row, ...]] = (
    Row("embed.weight", "model.embed_tokens.weight", reason="the draft embeds with the trunk's embedding"),
    Row("head", "model.layers.{M}.shared_head.head", LINEAR, reason="the draft's logits use the trunk's head"),
)
# canonical scope -> vLLM prefix, per class ({M} = L + K, the runtime layer index of MTP layer K)
SCOPES: Final[dict[str, dict[str, str]]] = {
    "target": {"layers.{L}.": "model.layers.{L}."},
    "mtp": {"mtp.{K}.": "model.layers.{M}.mtp_block.", "mtp.{K}.#own": "model.layers.{M}."},
}

# vLLM quant-config families (what native/quant_config.py builds) -> scheme -> canonical role -> vLLM suffix.
# Routed experts prepend vLLM's w13_/w2_ (from the expert mapping) to the same suffixes.
FAMILIES: Final[tuple[str, ...]] = ("unquantized", "deepseek_fp8", "compressed_tensors")
ROLE_NAMES: Final[dict[str, dict[str, dict[str, str]]]] = {
    "unquantized": {"bf16": {"weight": "weight"}},
    # DeepseekV4FP8Config (an Fp8Config): block FP8 linears keep the inverse-named scale; MXFP4 experts
    # (Mxfp4MoEMethod) and ModelOpt NVFP4 experts (moe_quant_algo NVFP4) use their own names
    "deepseek_fp8": {
        "bf16": {"weight": "weight"},
        "fp8_block": {"weight": "weight", "scale": "weight_scale_inv"},
        "mxfp4": {"weight": "weight", "scale": "weight_scale"},
        "nvfp4": {"weight": "weight", "weight_scale": "weight_scale", "weight_scale_2": "weight_scale_2",
                  "input_scale": "input_scale"},
    },
    # CompressedTensorsConfig: W8A8 FP8 block, NVFP4 (W4A4 / W4A16), WNA16 pack-quantized
    "compressed_tensors": {
        "bf16": {"weight": "weight"},
        "fp8_block": {"weight": "weight", "scale": "weight_scale"},
        "nvfp4": {"weight": "weight_packed", "weight_scale": "weight_scale",
                  "weight_global_scale": "weight_global_scale", "input_global_scale": "input_global_scale"},
        "w4a16": {"weight_packed": "weight_packed", "weight_scale": "weight_scale", "weight_shape": "weight_shape",
                  "weight_zero_point": "weight_zero_point"},
    },
}

# Parameters (or parts of them) vLLM allocates beyond the checkpoint, with the reason; matched on the vLLM name.
PADDINGS: Final[tuple[tuple[str, str], ...]] = (
    (r"\.attn\.attn_sink$", "heads padded to the attention kernel's head count (FlashMLA: 64 or 128 per rank); "
                            "padded sinks stay -inf (no sink)"),
    (r"\.shared_experts\.(gate_up_proj|down_proj)\.weight(_scale_inv)?$",
     "block-FP8 shared experts: intermediate rounded up to TP x 128 so every rank holds whole blocks; the "
     "extra rows/columns are zero"),
)

# Parameters vLLM allocates that no checkpoint of that scheme carries: (pattern on the vLLM name, the
# detected scheme it applies to, the value the native loader writes, why). Anything else unfilled is an error.
VLLM_ONLY: Final[tuple[tuple[str, str, float, str], ...]] = (
    (r"\.w(13|2)_input_global_scale$", "nvfp4-weight-only", 1.0,
     "weight-only NVFP4 (no input_global_scale on disk): vLLM's compressed-tensors NVFP4 MoE method allocates "
     "activation global scales anyway (torch.empty) and its A16 path takes no activation scale; written as "
     "1.0 so nothing is left uninitialised"),
)

# What each of vLLM's platform variants names or pads differently (vllm/models/deepseek_v4/<platform>/).
PLATFORMS: Final[dict[str, dict[str, str]]] = {
    "nvidia": {"heads_padding": "FlashMLA: n_local_heads padded to 64 or 128 (FlashInfer SM12x: its own rule)",
               "experts_prefix": "routed_experts", "mtp_quant": "built with the target's quant_config object",
               "mtp_embed_head": "top-level embed/head skipped by the MTP loader; shared by the proposer"},
    "amd": {"heads_padding": "none (get_padded_num_q_heads returns n_heads)",
            "experts_prefix": "routed_experts, or '' under the AITER mega-MoE",
            "mtp_quant": "align_mtp_quant_config() re-keys model.mtp.K. -> model.layers.{L+K}.",
            "mtp_scale": "also renames .weight_scale -> .weight_scale_inv for native block-FP8 layers",
            "import": "vllm/platforms/rocm.py queries CUDA device properties at import: not importable on CPU"},
    "xpu": {"heads_padding": "none", "experts_prefix": "routed_experts, or '' under the mega-MoE",
            "mtp_quant": "the target's quant_config object"},
}

EXPERT_RE: Final = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])$")


@dataclass(frozen=True)
class VllmTarget:
    """Where one canonical module/tensor goes: vLLM module path (or parameter for plain tensors), shard, kind."""

    vllm: str
    kind: str
    shard: int | str | None
    row: Row
    expert: int | None = None          # routed experts: the expert id (shard is w1/w2/w3)


def _index(rows: tuple[Row, ...]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for r in rows:
        if r.canonical in out:
            raise ValueError(f"two rows for {r.canonical!r}")
        out[r.canonical] = r
    return out


_BLOCK, _MTP_OWN, _TOP, _SHARED = (_index(BLOCK_ROWS), _index(MTP_ROWS), _index(TOP_ROWS), _index(MTP_SHARED_ROWS))
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTPK = re.compile(r"^mtp\.(\d+)\.(.+)$")


def _local(row_table: dict[str, Row], local: str, prefix: str) -> VllmTarget | None:
    row = row_table.get(local)
    if row is not None:
        return VllmTarget(prefix + row.vllm, row.kind, row.shard, row)
    m = EXPERT_RE.match(local)
    if m and "ffn.experts" in row_table:
        row = row_table["ffn.experts"]
        return VllmTarget(prefix + row.vllm, EXPERTS, m.group(2), row, int(m.group(1)))
    return None


def lookup(model: str, canonical: str, n_layers: int, mtp_layer: int | None = None) -> VllmTarget | None:
    """Where canonical ``canonical`` goes in vLLM's ``model`` (``"target"`` or ``"mtp"``); None: not this class's.

    For the MTP class, top-level ``embed.weight`` / ``head`` map to the draft's own copies (``mtp_layer``: the
    MTP layer whose ``shared_head`` receives the head). Canonical names of the other class return None.
    """
    if model == "target":
        m = _LAYER.match(canonical)
        if m:
            return _local(_BLOCK, m.group(2), SCOPES["target"]["layers.{L}."].format(L=m.group(1)))
        row = _TOP.get(canonical)
        return VllmTarget(row.vllm, row.kind, row.shard, row) if row else None
    m = _MTPK.match(canonical)
    if m:
        M = n_layers + int(m.group(1))
        own = _local(_MTP_OWN, m.group(2), SCOPES["mtp"]["mtp.{K}.#own"].format(M=M))
        return own or _local(_BLOCK, m.group(2), SCOPES["mtp"]["mtp.{K}."].format(M=M))
    row = _SHARED.get(canonical)
    if row is None:
        return None
    return VllmTarget(row.vllm.format(M=n_layers + (mtp_layer or 0)), row.kind, row.shard, row)


def padding_reason(param: str) -> str | None:
    for pat, reason in PADDINGS:
        if re.search(pat, param):
            return reason
    return None
