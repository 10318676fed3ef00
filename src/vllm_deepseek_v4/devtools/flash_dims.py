"""A random DSv4 with DeepSeek-V4-Flash's true per-layer dimensions, small enough to serve on a CPU.

Every attention dimension is Flash's (``flash.config()``: D = 4096, 64 heads of 512 with RoPE 64, q_lora 1024,
8 output groups of o_lora 1024, indexer 64 x 128 with top-k 512, window 128, hc_mult 4); only what does not
shape attention is cut down: 3 layers (Flash's layers 1-3: sliding + hash routing, CSA ratio 4 + hash
routing, HCA ratio 128 + biased routing), one MTP layer (sliding, as Flash's), 4 routed experts (top-2) and
one shared one of width 256, and a 1024-token vocabulary. That is 0.56 B parameters (1.1 GB in BF16).

The tensors come from ``artifacts.canonical_tensors`` (random, scaled so activations stay O(1)), with the
MTP layer made a good-but-imperfect draft (``artifacts.make_draft_agree_``, ``agree = 0.15``: the trunk's
blocks add ``0.15 x`` their output, so greedy tokens still vary, and drafts are accepted about half the time,
so vLLM's accept *and* reject paths both run), and are written by ``artifacts.write_artifact``.
``write(..., native=True)`` writes Flash's published format instead (FP8 block attention / shared experts /
MTP projections, MXFP4 routed experts: ``artifacts.NATIVE``). Each artifact records its :func:`key` (a hash
of the config, seed, format and this generator) in ``flash_dims.json``, so a cache directory can reuse it.
Command line: ``scripts/flash_dims_model.py``.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..config import DSV4Config
from ..loader.expected import expected_params
from . import flash
from .artifacts import NATIVE, canonical_tensors, make_draft_agree_, write_artifact

__all__ = ["ATTENTION_KEYS", "config", "param_count", "key", "write", "cached"]

# The config.json fields that shape attention (and the hyper-connections around it): all Flash's own here.
ATTENTION_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "qk_rope_head_dim",
                  "q_lora_rank", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
                  "sliding_window", "hc_mult", "hc_sinkhorn_iters", "rope_theta", "compress_rope_theta",
                  "rope_scaling")
# Flash's layers 1-3 (layer 0 is a second sliding hash layer): every attention kind and both routings.
RATIOS, HASH_LAYERS = [0, 4, 128], 2
MANIFEST = "flash_dims.json"


def config(*, experts: int = 4, top_k: int = 2, moe_inter: int = 256, vocab: int = 1024,
           native: bool = False) -> dict[str, Any]:
    """Flash's published ``config.json`` with 3 layers + 1 MTP layer, fewer/narrower experts, a small
    vocabulary; Flash's ``quantization_config`` only for the ``native`` (FP8 + MXFP4) format."""
    cfg = flash.config()
    qconfig = cfg.pop("quantization_config")
    cfg.update(num_hidden_layers=len(RATIOS), compress_ratios=RATIOS + [0], num_hash_layers=HASH_LAYERS,
               n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_inter,
               vocab_size=vocab, num_nextn_predict_layers=1)
    if native:
        cfg["quantization_config"] = qconfig
    return cfg


def param_count(cfg: dict[str, Any]) -> int:
    """Parameters of the model ``cfg`` describes, MTP layer included (logical shapes, before quantization)."""
    return sum(math.prod(s.shape) for s in expected_params(DSV4Config.from_dict(cfg), include_mtp=True))


def key(cfg: dict[str, Any], seed: int, agree: float | None, native: bool) -> str:
    """What the artifact's content is a function of: config, seed, draft agreement, format and this
    generator's source."""
    h = hashlib.sha256(json.dumps([cfg, seed, agree, native], sort_keys=True).encode())
    for src in (Path(__file__), Path(__file__).with_name("artifacts.py")):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def write(out: Path | str, *, seed: int = 0, agree: float | None = 0.15, native: bool = False,
          **dims: Any) -> Path:
    """Write the artifact to ``out`` (BF16, or Flash's FP8 + MXFP4 with ``native``); ``agree=None`` leaves
    the MTP layer as random as the rest (its drafts are then almost never accepted). Returns ``out``."""
    cfg = config(native=native, **dims)

    def edit(tensors: dict[str, Any]) -> None:
        if agree is not None:
            make_draft_agree_(tensors, DSV4Config.from_dict(cfg), agree)
    tensors = canonical_tensors(cfg, {p: dict(g) for p, g in NATIVE.items()} if native else None, seed=seed,
                                edit=edit)
    manifest = {"key": key(cfg, seed, agree, native), "seed": seed, "agree": agree,
                "format": "fp8+mxfp4" if native else "bf16", "parameters": param_count(cfg)}
    # the manifest goes last: a directory with one is complete
    path = write_artifact(out, tensors, cfg, shards=4)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def cached(root: Path | str, *, seed: int = 0, agree: float | None = 0.15, native: bool = False,
           **dims: Any) -> Path:
    """The artifact under ``root/<key>``: written there unless a complete one with that key exists."""
    k = key(config(native=native, **dims), seed, agree, native)
    path = Path(root) / k
    manifest = path / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == k:
        return path
    return write(path, seed=seed, agree=agree, native=native, **dims)
