"""KV-cache bytes per token of context: the plugin's real cache specs vs their content and vLLM's FP8 layout.

For each config (DSv4-Flash, DSv4-Pro, the shipped tiny model) this builds the plugin's cache layers exactly
as the served model does (``vllm_plugin.kv.PagedKV`` for every trunk layer and ``mtp.0``, under a vLLM
config), collects their ``KVCacheSpec``s and lets vLLM 0.32 group them (``get_kv_cache_groups``, the path the
engine takes for one page size). vLLM allocates one block pool: a block of any group costs ``bytes_per_block``
(the widest group's pages, so groups with fewer layers pay padding). Then:

- ``bytes_per_token``: what one more token of context costs, i.e. the full-attention (compressed-entry)
  groups: ``sum(bytes_per_block / block_size)``; the window caches are a fixed cost per request
  (``window_bytes_per_request``: the blocks a decoding request holds, ``cdiv(window, block) + 1`` per group);
- ``content_bytes_per_token``: the entries themselves in fp32: ``(head_dim + index_head_dim) * 4 / 4`` per
  CSA layer, ``head_dim * 4 / r`` per other compressed layer;
- ``vllm_fp8_bytes_per_token``: vLLM's own DSv4 cache (``tokens_per_state = r``): a 584-byte ``fp8_ds_mla``
  entry per ``r`` tokens per compressed layer plus, on CSA layers, a 132-byte FP8 indexer key
  (``vllm/models/deepseek_v4/attention.py``); its window caches are per request too;
- ``before_*``: the layout this replaced (one fp32 row width ``W`` for every cache layer, one row per token
  position in the compressed caches, block 256), built as vLLM specs and grouped the same way;
- ``fp8_entries_*``: what the same arithmetic gives if entries and indexer keys were stored in vLLM's 584- and
  132-byte FP8 formats (window rows staying fp32): the page, the largest block, the bytes per token.

Pro's numbers (docs/dsv4-architecture.md §1.1/§1.2, derived from the published HF config, not read from an
official ``inference/config.json``): 61 layers, hidden 7168, 128 heads, head_dim 512, index_head_dim 128,
window 128, ratios ``[128, 128] + [4, 128] * 29 + [4]`` + the sliding MTP layer.

  python benchmarks/kv_bytes.py [--out benchmarks/results/kv_bytes]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_deepseek_v4.config import DSV4Config  # noqa: E402
from vllm_deepseek_v4.devtools import flash  # noqa: E402
from vllm_deepseek_v4.devtools.records import meta, write_json  # noqa: E402
from vllm_deepseek_v4.model.compressor import CSA_RATIO  # noqa: E402
from vllm_deepseek_v4.vllm_plugin import kv_layout  # noqa: E402

GOAL = 1.25                  # bytes_per_token <= GOAL x content at the Flash config
VLLM_ENTRY, VLLM_INDEX_KEY = 584, 132          # bytes: fp8_ds_mla entry (448 fp8 + 64 bf16 + 8 scale), fp8 key + scale
OLD_BLOCK = 256              # the old layout used vLLM's block size (256 on CPU for deepseek_v4) everywhere
PRO = dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
           n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5, index_topk=1024,
           compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0])


def configs() -> dict[str, DSV4Config]:
    from vllm_deepseek_v4.assets import tiny_model_path

    with open(os.path.join(tiny_model_path(), "config.json")) as fh:
        tiny = json.load(fh)
    return {"flash": DSV4Config.from_dict(flash.config()), "pro": DSV4Config.from_dict({**flash.config(), **PRO}),
            "tiny": DSV4Config.from_dict(tiny)}


def plugin_specs(cfg: DSV4Config) -> dict[str, Any]:
    """``{cache layer name: KVCacheSpec}`` of the served model: every trunk layer and ``mtp.0``."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_deepseek_v4.vllm_plugin.kv import PagedKV, StepInputs

    step, names = StepInputs(), [f"model.layers.{i}.attn" for i in range(cfg.n_layers)] + ["mtp.0.attn"]
    with set_current_vllm_config(VllmConfig()):
        kvs = [PagedKV(cfg, cfg.ratio(i), name, step, OLD_BLOCK) for i, name in enumerate(names)]
    return {c.layer_name: c.spec for kv in kvs for c in (kv.row_cache, kv.entry_cache, kv.index_cache) if c is not None}


def old_specs(cfg: DSV4Config) -> dict[str, Any]:
    """The replaced layout as vLLM specs: width ``W`` = the widest window row or entry|key row, block 256."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec

    ratios = set(cfg.compress_ratios)
    W = max(max(kv_layout.RowLayout.of(cfg, r).window_width, cfg.head_dim + (cfg.index_head_dim if r == CSA_RATIO
                                                                               else 0)) for r in ratios)
    common = dict(block_size=OLD_BLOCK, num_kv_heads=1, head_size=W, dtype=_fp32(), max_tp_shards=1)
    out = {}
    for i in range(cfg.n_layers + 1):
        out[f"{i}.kv_window"] = SlidingWindowMLASpec(sliding_window=kv_layout.cache_geometry(cfg).window, **common)
        if cfg.ratio(i):
            out[f"{i}.kv_compressed"] = MLAAttentionSpec(**common)
    return out


def _fp32() -> Any:
    import torch
    return torch.float32


def grouped(specs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's grouping of ``specs`` and what a token / a request costs in its block pool."""
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    vc = VllmConfig()
    vc.cache_config.kv_cache_layout = "LBNHC"        # what the CPU engine resolves (one page size: any layout)
    groups = get_kv_cache_groups(vc, dict(specs))
    pages = {g.kv_cache_spec.page_size_bytes for g in groups}
    assert len(pages) == 1, f"mixed page sizes {sorted(pages)}"
    slots = max(len(g.layer_names) for g in groups)
    block_bytes = slots * pages.pop()                # every group's block spans every slot (vLLM pads groups)
    per_token, per_request, sizes = 0.0, 0, []
    for g in groups:
        spec = g.kv_cache_spec
        sizes.append(spec.block_size)
        if isinstance(spec, SlidingWindowSpec):
            per_request += (math.ceil(spec.sliding_window / spec.block_size) + 1) * block_bytes
        else:
            assert isinstance(spec, FullAttentionSpec), spec
            per_token += block_bytes / spec.block_size
    padding = sum(slots - len(g.layer_names) for g in groups)
    return {"bytes_per_token": per_token, "window_bytes_per_request": per_request, "groups": len(groups),
            "layers_per_group": slots, "padding_layers": padding, "page_bytes": block_bytes // slots,
            "block_sizes": sorted(set(sizes)), "prefix_hit_granularity_tokens": math.lcm(*sizes)}


def content(cfg: DSV4Config) -> float:
    """fp32 bytes of compressed entries (and CSA indexer keys) per token of context, trunk layers."""
    return sum((cfg.head_dim + (cfg.index_head_dim if r == CSA_RATIO else 0)) * 4 / r
               for r in cfg.compress_ratios[: cfg.n_layers] if r)


def vllm_fp8(cfg: DSV4Config) -> float:
    return sum((VLLM_ENTRY + (VLLM_INDEX_KEY if r == CSA_RATIO else 0)) / r
               for r in cfg.compress_ratios[: cfg.n_layers] if r)


def fp8_entries(cfg: DSV4Config) -> dict[str, Any]:
    """The same page arithmetic (``kv_layout.cache_geometry``) with vLLM's FP8 entry and key sizes."""
    kinds = kv_layout.config_kinds(cfg)
    state = {"kv_window": lambda k: k.state_bytes, "kv_compressed": lambda k: VLLM_ENTRY,
             "kv_index": lambda k: VLLM_INDEX_KEY}
    need = [(state[k.suffix](k), k.tokens_per_state) for k in kinds]
    m = kv_layout.MIN_BLOCK
    page = math.lcm(*(s * (m // math.gcd(m, t)) for s, t in need))
    return {"page_bytes": page, "largest_block": max(page // s * t for s, t in need)}


def measure(cfg: DSV4Config) -> dict[str, Any]:
    new, old = grouped(plugin_specs(cfg)), grouped(old_specs(cfg))
    c, v = content(cfg), vllm_fp8(cfg)
    return {"bytes_per_token": new["bytes_per_token"], "content_bytes_per_token": c, "vllm_fp8_bytes_per_token": v,
            "ratio_to_content": new["bytes_per_token"] / c, "ratio_to_vllm_fp8": new["bytes_per_token"] / v,
            **{k: new[k] for k in new if k != "bytes_per_token"},
            "before_bytes_per_token": old["bytes_per_token"], "before_ratio_to_content": old["bytes_per_token"] / c,
            "before_window_bytes_per_request": old["window_bytes_per_request"],
            "fp8_entries": fp8_entries(cfg),
            "compressed_layers": sum(1 for r in cfg.compress_ratios[: cfg.n_layers] if r)}


def markdown(results: dict[str, Any], m: dict[str, Any]) -> str:
    rows = [("bytes per token of context (compact layout)", "bytes_per_token", "{:,.0f}"),
            ("content in fp32", "content_bytes_per_token", "{:,.0f}"),
            ("ratio to content", "ratio_to_content", "{:.3f}"),
            ("vLLM's own FP8 layout", "vllm_fp8_bytes_per_token", "{:,.0f}"),
            ("ratio to vLLM FP8", "ratio_to_vllm_fp8", "{:.2f}"),
            ("before: bytes per token (one width W, a row per position)", "before_bytes_per_token", "{:,.0f}"),
            ("before: ratio to content", "before_ratio_to_content", "{:.1f}"),
            ("window caches per decoding request (MiB)", "window_bytes_per_request", "mib"),
            ("before: window caches per request (MiB)", "before_window_bytes_per_request", "mib"),
            ("KV-cache groups / layers per group / padding layers", None, "groups"),
            ("page bytes", "page_bytes", "{:,}"),
            ("block sizes (tokens)", "block_sizes", "{}"),
            ("prefix-cache hit granularity (tokens, lcm of the block sizes)", "prefix_hit_granularity_tokens", "{:,}")]
    names = list(results)
    out = ["# KV-cache bytes per token of context", "",
           f"Machine: {m['machine']}; git {m['git_sha']}; python {m['python']}. `python benchmarks/kv_bytes.py`: "
           "the plugin's real cache specs grouped by vLLM 0.32's `get_kv_cache_groups` (no engine, no timing).", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            r = results[n]
            if fmt == "groups":
                cells.append(f"{r['groups']} / {r['layers_per_group']} / {r['padding_layers']}")
            elif fmt == "mib":
                cells.append(f"{r[key] / 2**20:,.1f}")
            else:
                cells.append(fmt.format(r[key]))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    f = results["flash"]
    verdict = "met" if f["ratio_to_content"] <= GOAL else "NOT met"
    fp8 = {n: results[n]["fp8_entries"] for n in names}
    out += ["", f"Goal <= {GOAL}x the content at the Flash config: **{verdict}** ({f['ratio_to_content']:.3f}x; "
            f"{f['before_ratio_to_content']:.1f}x before).", "",
            "Bytes per token count the compressed-entry caches (full attention: one more token of context costs "
            "them); the window caches are a fixed cost per request (the blocks a decoding request holds). "
            "Above 1.0x the content is vLLM's grouping: kinds with fewer layers than the widest group are padded.",
            "", "FP8: storing entries in vLLM's 584-byte `fp8_ds_mla` format and keys in its 132-byte format would "
            "reach vLLM's bytes per token (the same arithmetic, no padding of entries), but needs (a) quantize on "
            "write / dequantize on read matching vLLM's scales (448 FP8 NoPE dims with UE8M0 block scales + 64 "
            "BF16 RoPE dims), which changes the numerics against the fp32 reference, and (b) a larger page: one "
            "page for every kind is the lcm of the state sizes, "
            + ", ".join(f"{n} {fp8[n]['page_bytes']:,} B (largest block {fp8[n]['largest_block']:,} tokens)"
                        for n in names)
            + " instead of " + ", ".join(f"{results[n]['page_bytes']:,} B" for n in names)
            + " -- or entries padded to a power-of-two-friendly width."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/kv_bytes")
    args = p.parse_args(argv)
    results = {name: measure(cfg) for name, cfg in configs().items()}
    m = meta(argv if argv is not None else sys.argv)
    write_json(args.out + ".json", {"meta": m, **results})
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(results, m))
    f = results["flash"]
    print(f"flash: {f['bytes_per_token']:,.0f} B/token = {f['ratio_to_content']:.3f}x content "
          f"({f['content_bytes_per_token']:,.0f}), {f['ratio_to_vllm_fp8']:.2f}x vLLM FP8; before "
          f"{f['before_ratio_to_content']:.1f}x")
    return 0 if f["ratio_to_content"] <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
