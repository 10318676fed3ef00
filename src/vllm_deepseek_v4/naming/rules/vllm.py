"""vLLM-internal names (state dicts saved from vLLM's DSv4 classes), MTP at ``model.layers.{L+K}``.

Fused vLLM parameters are split along the output dim in shard order (``wq_a`` then ``wkv``; ``wkv`` then
``wgate``; ``w1`` then ``w3``). vLLM 0.32/0.33 nest routed experts under ``routed_experts``; 0.20 did not.
"""
from __future__ import annotations

from ..rule import Unfuse

CONVENTION = "vllm"

TOP = (
    ("model.hc_head_{p:fn|base|scale}", "hc_head_{p}", "vLLM hyper-connection head"),
)  # embed/head/norm spellings are shared with HF (hf.TOP)

SCOPES = (
    ("model.layers.{L}.", "layers.{layer}.", "vLLM decoder layer (an index >= L is an MTP layer)", {}),
    ("model.layers.{L}.mtp_block.", "layers.{layer}.", "vLLM MTP block body (layer index >= L)", {"mtp_block": True}),
)

_HALVES = Unfuse(parts=("w1", "w3"))

BLOCK = (
    ("attn.attn_sink", "attn.attn_sink", "per-head attention sink (vLLM narrows it by TP head range)"),
    ("attn.fused_wqa_wkv.{Q}", "attn.{part}.{role}", "vLLM fused wq_a | wkv (rows)",
     {"unfuse": Unfuse(parts=("wq_a", "wkv"), sizes=("q_lora_rank", "head_dim"))}),
    ("attn.{m:wq_a|wq_b|wkv|wo_a|wo_b}.{Q}", "attn.{m}.{role}", "attention projection (wq_a/wkv also unfused)"),
    ("attn.{m:q_norm|kv_norm}.weight", "attn.{m}.weight", "attention RMSNorm"),
    ("attn.compressor.fused_wkv_wgate.{Q}", "attn.compressor.{part}.{role}", "vLLM fused compressor wkv | wgate",
     {"unfuse": Unfuse(parts=("wkv", "wgate"))}),
    ("attn.compressor.ape", "attn.compressor.ape", "compressor position bias"),
    ("attn.compressor.norm.weight", "attn.compressor.norm.weight", "compressor RMSNorm"),
    ("attn.indexer.{m:wq_b|weights_proj}.{Q}", "attn.indexer.{m}.{role}", "indexer projection"),
    ("attn.indexer.compressor.fused_wkv_wgate.{Q}", "attn.indexer.compressor.{part}.{role}",
     "vLLM fused indexer compressor wkv | wgate", {"unfuse": Unfuse(parts=("wkv", "wgate"))}),
    ("attn.indexer.compressor.ape", "attn.indexer.compressor.ape", "indexer compressor position bias"),
    ("attn.indexer.compressor.norm.weight", "attn.indexer.compressor.norm.weight", "indexer compressor RMSNorm"),
    ("{m:attn_norm|ffn_norm}.weight", "{m}.weight", "block RMSNorm"),
    ("hc_{s:attn|ffn}_{p:fn|base|scale}", "hc_{s}_{p}", "hyper-connection mixer"),
    ("ffn.gate.weight", "ffn.gate.weight", "router weight"),
    ("ffn.gate.e_score_correction_bias", "ffn.gate.bias", "vLLM name of gate.bias"),
    ("ffn.gate.tid2eid", "ffn.gate.tid2eid", "hash routing table"),
    ("ffn.shared_experts.gate_up_proj.{Q}", "ffn.shared_experts.{part}.{role}", "vLLM fused shared expert w1 | w3",
     {"unfuse": _HALVES}),
    ("ffn.shared_experts.down_proj.{Q}", "ffn.shared_experts.w2.{role}", "vLLM shared expert down"),
    ("ffn.experts.{E}.{m:w1|w2|w3}.{Q}", "ffn.experts.{expert}.{m}.{role}",
     "per-expert linears as vLLM's loader names them before stacking"),
    ("ffn.shared_experts.{m:w1|w2|w3}.{Q}", "ffn.shared_experts.{m}.{role}", "unfused shared expert linears"),
    ("ffn.experts.w13_{Q}", "ffn.experts.{expert}.{part}.{role}", "vLLM 0.20 stacked experts w1 | w3",
     {"unfuse": Unfuse(parts=("w1", "w3"), stacked=True)}),
    ("ffn.experts.w2_{Q}", "ffn.experts.{expert}.w2.{role}", "vLLM 0.20 stacked experts down",
     {"unfuse": Unfuse(stacked=True)}),
    ("ffn.experts.routed_experts.w13_{Q}", "ffn.experts.{expert}.{part}.{role}", "vLLM >= 0.32 stacked experts w1 | w3",
     {"unfuse": Unfuse(parts=("w1", "w3"), stacked=True)}),
    ("ffn.experts.routed_experts.w2_{Q}", "ffn.experts.{expert}.w2.{role}", "vLLM >= 0.32 stacked experts down",
     {"unfuse": Unfuse(stacked=True)}),
)

MTP = (
    ("{m:e_proj|h_proj}.{Q}", "{m}.{role}", "MTP input projections"),
    ("{m:enorm|hnorm|norm}.weight", "{m}.weight", "MTP RMSNorms (same spelling as upstream)"),
    ("shared_head.norm.weight", "norm.weight", "vLLM name of the MTP final norm"),
    ("hc_head_{p:fn|base|scale}", "hc_head_{p}", "MTP hyper-connection head"),
    ("shared_head.head.weight", "head.weight", "vLLM copy of the shared head", {"shared": True}),
    ("{m:emb.tok_emb|embed|embed_tokens}.weight", "embed.weight", "copy of the shared embedding", {"shared": True}),
)
