"""HF transformers 5.x names (``DeepseekV4ForCausalLM`` parameters) and what ``save_pretrained`` writes.

transformers has no MTP module; ``model.mtp.K.`` / ``mtp.layers.K.`` spellings come from forks and NeMo-style
exports. ``save_pretrained`` (5.23) writes upstream block names under ``model.layers.N.`` (so the upstream
block table applies there too) and the lossy ``attn.norm.weight`` for ``attn.kv_norm.weight``.
"""
from __future__ import annotations

from ..rule import Unfuse
from . import upstream

CONVENTION = "hf"

TOP = (
    ("model.embed_tokens.weight", "embed.weight", "HF token embedding", {"shared": True, "conventions": ("hf", "vllm", "nemo")}),
    ("lm_head.weight", "head.weight", "HF output head", {"shared": True, "conventions": ("hf", "vllm", "nemo")}),
    ("model.norm.weight", "norm.weight", "HF final norm", {"conventions": ("hf", "vllm", "nemo")}),
    ("model.hc_head.hc_{p:fn|base|scale}", "hc_head_{p}", "HF hyper-connection head", {"conventions": ("hf", "nemo")}),
)

SCOPES = (
    ("model.layers.{L}.", "layers.{layer}.", "HF decoder layer (an index >= L is an MTP layer)", {}),
    ("model.mtp.{K}.", "mtp.{mtp}.", "MTP block under the HF model prefix", {"scope_mtp": True}),
)

_HF_ONLY = (
    ("self_attn.sinks", "attn.attn_sink", "HF name of attn_sink"),
    ("self_attn.q_a_proj.{Q}", "attn.wq_a.{role}", "HF name of wq_a"),
    ("self_attn.q_b_proj.{Q}", "attn.wq_b.{role}", "HF name of wq_b"),
    ("self_attn.kv_proj.{Q}", "attn.wkv.{role}", "HF name of wkv"),
    ("self_attn.o_a_proj.{Q}", "attn.wo_a.{role}", "HF name of wo_a (grouped, same 2-D shape)"),
    ("self_attn.o_b_proj.{Q}", "attn.wo_b.{role}", "HF name of wo_b"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight", "HF name of q_norm"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight", "HF/NeMo name of kv_norm", {"conventions": ("hf", "nemo")}),
    ("self_attn.compressor.kv_proj.{Q}", "attn.compressor.wkv.{role}", "HF name of compressor.wkv"),
    ("self_attn.compressor.gate_proj.{Q}", "attn.compressor.wgate.{role}", "HF name of compressor.wgate"),
    ("self_attn.compressor.position_bias", "attn.compressor.ape", "HF name of compressor.ape"),
    ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight", "HF/NeMo name of compressor.norm",
     {"conventions": ("hf", "nemo")}),
    ("self_attn.compressor.indexer.q_b_proj.{Q}", "attn.indexer.wq_b.{role}", "HF name of indexer.wq_b"),
    ("self_attn.compressor.indexer.scorer.weights_proj.{Q}", "attn.indexer.weights_proj.{role}",
     "HF (>= 5.10.1) name of indexer.weights_proj"),
    ("self_attn.compressor.indexer.weights_proj.{Q}", "attn.indexer.weights_proj.{role}",
     "older HF / NeMo name of indexer.weights_proj", {"conventions": ("hf", "nemo")}),
    ("self_attn.compressor.indexer.kv_proj.{Q}", "attn.indexer.compressor.wkv.{role}", "HF indexer compressor wkv"),
    ("self_attn.compressor.indexer.gate_proj.{Q}", "attn.indexer.compressor.wgate.{role}", "HF indexer compressor wgate"),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape", "HF indexer compressor ape"),
    ("self_attn.compressor.indexer.kv_norm.weight", "attn.indexer.compressor.norm.weight",
     "HF/NeMo indexer compressor norm", {"conventions": ("hf", "nemo")}),
    ("input_layernorm.weight", "attn_norm.weight", "HF name of attn_norm", {"conventions": ("hf", "nemo")}),
    ("post_attention_layernorm.weight", "ffn_norm.weight", "HF name of ffn_norm", {"conventions": ("hf", "nemo")}),
    ("{s:attn|ffn}_hc.{p:fn|base|scale}", "hc_{s}_{p}", "HF name of hc_*", {"conventions": ("hf", "nemo")}),
    ("mlp.gate.weight", "ffn.gate.weight", "HF router weight", {"conventions": ("hf", "nemo")}),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias", "HF name of gate.bias", {"conventions": ("hf", "nemo")}),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid", "HF hash routing table", {"conventions": ("hf", "nemo")}),
    ("mlp.shared_experts.gate_proj.{Q}", "ffn.shared_experts.w1.{role}", "HF shared expert gate",
     {"conventions": ("hf", "nemo")}),
    ("mlp.shared_experts.up_proj.{Q}", "ffn.shared_experts.w3.{role}", "HF shared expert up", {"conventions": ("hf", "nemo")}),
    ("mlp.shared_experts.down_proj.{Q}", "ffn.shared_experts.w2.{role}", "HF shared expert down",
     {"conventions": ("hf", "nemo")}),
    ("mlp.experts.gate_up_proj", "ffn.experts.{expert}.{part}.weight", "HF fused experts [E, 2I, D], w1 rows first",
     {"unfuse": Unfuse(parts=("w1", "w3"), stacked=True)}),
    ("mlp.experts.down_proj", "ffn.experts.{expert}.w2.weight", "HF fused experts down [E, D, I]",
     {"unfuse": Unfuse(stacked=True)}),
    ("mlp.experts.{E}.gate_proj.{Q}", "ffn.experts.{expert}.w1.{role}", "llm-compressor per-expert gate", {"conventions": ("hf", "nemo")}),
    ("mlp.experts.{E}.up_proj.{Q}", "ffn.experts.{expert}.w3.{role}", "llm-compressor per-expert up", {"conventions": ("hf", "nemo")}),
    ("mlp.experts.{E}.down_proj.{Q}", "ffn.experts.{expert}.w2.{role}", "llm-compressor per-expert down", {"conventions": ("hf", "nemo")}),
)

BLOCK = _HF_ONLY + upstream.BLOCK + (
    ("attn.norm.weight", "attn.kv_norm.weight", "transformers save_pretrained's lossy spelling of attn.kv_norm"),
)

MTP = upstream.MTP + (
    ("hc_head.hc_{p:fn|base|scale}", "hc_head_{p}", "HF/NeMo spelling of the MTP hc_head", {"conventions": ("hf", "nemo")}),
)
