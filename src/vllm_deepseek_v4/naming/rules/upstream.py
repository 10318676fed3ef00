"""Upstream (official DeepSeek release) names: the canonical space itself, so every target is the source."""
from __future__ import annotations

from ..rule import Unfuse

CONVENTION = "upstream"

TOP = (
    ("embed.weight", "embed.weight", "token embedding [vocab, D]", {"shared": True}),
    ("head.weight", "head.weight", "output head [vocab, D]; transformers' save_pretrained also writes it here",
     {"shared": True, "conventions": ("upstream", "hf")}),
    ("norm.weight", "norm.weight", "final RMSNorm before the head"),
    ("hc_head_{p:fn|base|scale}", "hc_head_{p}", "hyper-connection head mixer (fp32)"),
)

SCOPES = (
    ("layers.{L}.", "layers.{layer}.", "decoder layer (an index >= L is an MTP layer, DSv3-style exports)", {}),
    ("mtp.{K}.", "mtp.{mtp}.", "MTP block", {"scope_mtp": True}),
    ("model.mtp.{K}.", "mtp.{mtp}.", "MTP block as vLLM's target weight mapper renames it", {"scope_mtp": True}),
)

BLOCK = (
    ("attn.attn_sink", "attn.attn_sink", "per-head attention sink logit [H] (fp32)"),
    ("attn.{m:wq_a|wq_b|wkv|wo_a|wo_b}.{Q}", "attn.{m}.{role}", "attention projection"),
    ("attn.{m:q_norm|kv_norm}.weight", "attn.{m}.weight", "attention RMSNorm"),
    ("attn.compressor.ape", "attn.compressor.ape", "compressor absolute position bias (fp32)"),
    ("attn.compressor.{m:wkv|wgate}.{Q}", "attn.compressor.{m}.{role}", "compressor projection"),
    ("attn.compressor.norm.weight", "attn.compressor.norm.weight", "compressor RMSNorm"),
    ("attn.indexer.{m:wq_b|weights_proj}.{Q}", "attn.indexer.{m}.{role}", "indexer projection"),
    ("attn.indexer.compressor.ape", "attn.indexer.compressor.ape", "indexer compressor position bias"),
    ("attn.indexer.compressor.{m:wkv|wgate}.{Q}", "attn.indexer.compressor.{m}.{role}", "indexer compressor projection"),
    ("attn.indexer.compressor.norm.weight", "attn.indexer.compressor.norm.weight", "indexer compressor RMSNorm"),
    ("{m:attn_norm|ffn_norm}.weight", "{m}.weight", "block RMSNorm"),
    ("hc_{s:attn|ffn}_{p:fn|base|scale}", "hc_{s}_{p}", "hyper-connection mixer (fp32)"),
    ("ffn.gate.weight", "ffn.gate.weight", "router weight [E, D]"),
    ("ffn.gate.bias", "ffn.gate.bias", "router selection bias [E] (non-hash layers)"),
    ("ffn.gate.e_score_correction_bias", "ffn.gate.bias", "DeepSeek-V3/HF alias of gate.bias"),
    ("ffn.gate.tid2eid", "ffn.gate.tid2eid", "hash routing table [vocab, top-k] (hash layers)"),
    ("ffn.experts.{E}.{m:w1|w2|w3}.{Q}", "ffn.experts.{expert}.{m}.{role}", "routed expert linear"),
    ("ffn.shared_experts.{m:w1|w2|w3}.{Q}", "ffn.shared_experts.{m}.{role}", "shared expert linear"),
)

MTP = (
    ("{m:e_proj|h_proj}.{Q}", "{m}.{role}", "MTP input projections"),
    ("eh_proj.{Q}", "{part}.{role}", "DSv3-style fused [D, 2D]: columns [:D] are e_proj, [D:] h_proj",
     {"unfuse": Unfuse(parts=("e_proj", "h_proj"), sizes=("dim", "dim"), split_in=True)}),
    ("{m:enorm|hnorm|norm}.weight", "{m}.weight", "MTP RMSNorms (embedding, hidden, final)"),
    ("hc_head_{p:fn|base|scale}", "hc_head_{p}", "the MTP block's own hyper-connection head (fp32)"),
    ("head.weight", "head.weight", "copy of the shared head (some artifacts duplicate it)", {"shared": True}),
    ("{m:emb.tok_emb|embed|embed_tokens}.weight", "embed.weight",
     "copy of the shared embedding (some artifacts duplicate it)", {"shared": True}),
)
