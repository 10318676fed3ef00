"""Tiny DSv4 configs and random models for tests (importable by any test module: ``from tiny import ...``).

The default tiny config has all three attention types and a hash layer: main ratios ``[0, 4, 8, 4]``
(sliding, CSA, plain compressor, CSA) and a sliding MTP layer; window 8 and index_topk 4, so sequences of
40+ tokens exercise the window, the compressors and the top-k selection.
"""
from __future__ import annotations

from typing import Any

import torch

from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.model import DSV4Model, init_random_

__all__ = ["TINY", "make_config", "make_model"]

# HF-style config.json fields (what DSV4Config.from_dict reads and artifacts carry).
TINY: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "head_dim": 64, "qk_rope_head_dim": 16, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "num_hash_layers": 1, "num_nextn_predict_layers": 1, "compress_ratios": [0, 4, 8, 4, 0],
    "index_n_heads": 2, "index_head_dim": 32, "index_topk": 4, "sliding_window": 8,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def make_config(**overrides: Any) -> DSV4Config:
    """The tiny config with HF-style field overrides (e.g. ``compress_ratios=[0, 4, 128, 4, 0]``)."""
    return DSV4Config.from_dict({**TINY, **overrides})


def make_model(cfg: DSV4Config | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> DSV4Model:
    """A randomly initialised bf16-scheme model on CPU (fp32 by default, for tight comparisons)."""
    model = DSV4Model(cfg or make_config(), dtype=dtype)
    return init_random_(model, seed=seed).eval()
