"""NeMo Automodel internal names: HF-like, with ``sinks_param``/``ape_param`` and transposed stacked experts."""
from __future__ import annotations

from ..rule import Unfuse
from . import hf

CONVENTION = "nemo"

TOP = hf.TOP  # same spellings; the rows already list nemo among their conventions

SCOPES = (
    ("model.layers.{L}.", "layers.{layer}.", "NeMo decoder layer", {}),
    ("mtp.layers.{K}.", "mtp.{mtp}.", "NeMo MTP block", {"scope_mtp": True}),
)

BLOCK = tuple(r for r in hf.BLOCK if "nemo" in (r[3].get("conventions", ()) if len(r) > 3 else ())) + (
    ("self_attn.sinks_param.weight", "attn.attn_sink", "NeMo name of attn_sink"),
    ("self_attn.{m:wq_a|wq_b|wkv|wo_a|wo_b}.{Q}", "attn.{m}.{role}", "NeMo keeps upstream projection names"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight", "NeMo q_norm"),
    ("self_attn.compressor.{m:wkv|wgate}.{Q}", "attn.compressor.{m}.{role}", "NeMo compressor projection"),
    ("self_attn.compressor.ape_param.weight", "attn.compressor.ape", "NeMo compressor position bias"),
    ("self_attn.compressor.indexer.wq_b.{Q}", "attn.indexer.wq_b.{role}", "NeMo indexer wq_b"),
    ("self_attn.compressor.indexer.{m:wkv|wgate}.{Q}", "attn.indexer.compressor.{m}.{role}", "NeMo indexer compressor"),
    ("self_attn.compressor.indexer.ape_param.weight", "attn.indexer.compressor.ape", "NeMo indexer compressor ape"),
    ("hc_{s:attn|ffn}_{p:fn|base|scale}", "hc_{s}_{p}", "older NeMo spelling of hc mixers"),
    ("mlp.experts.gate_and_up_projs", "ffn.experts.{expert}.{part}.weight", "NeMo stacked experts [E, D, 2I] (transposed)",
     {"unfuse": Unfuse(parts=("w1", "w3"), stacked=True, transposed=True)}),
    ("mlp.experts.down_projs", "ffn.experts.{expert}.w2.weight", "NeMo stacked experts down [E, I, D] (transposed)",
     {"unfuse": Unfuse(stacked=True, transposed=True)}),
)

MTP = (
    ("{m:e_proj|h_proj}.{Q}", "{m}.{role}", "MTP input projections"),
    ("{m:enorm|hnorm|norm}.weight", "{m}.weight", "MTP RMSNorms"),
    ("hc_head.hc_{p:fn|base|scale}", "hc_head_{p}", "NeMo MTP hyper-connection head"),
)
