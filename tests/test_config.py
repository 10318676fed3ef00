"""Config dialects: the HF-style config.json, the official inference config and transformers' 5.x form."""
from __future__ import annotations

import json

import pytest
from vllm_deepseek_v4.devtools.artifacts import make_config

from vllm_deepseek_v4.config import DSV4Config, load_config
from vllm_deepseek_v4.errors import ConfigError


def test_hf_dialect_reads_mtp_ratio_and_hash_layers():
    c = DSV4Config.from_dict(make_config())
    assert c.n_layers == 3 and c.n_mtp_layers == 1 and c.compress_ratios == (0, 4, 128, 0)
    assert c.is_hash_layer(0) and not c.is_hash_layer(1) and not c.is_hash_layer(3)
    assert c.rope_factor == 16 and c.original_seq_len == 65536 and c.dialect == "hf"


def test_official_inference_dialect_matches_hf_dialect():
    hf = make_config()
    official = {"vocab_size": 256, "dim": 64, "moe_inter_dim": 32, "n_layers": 3, "n_hash_layers": 1,
                "n_mtp_layers": 1, "n_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1,
                "n_activated_experts": 2, "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0,
                "q_lora_rank": 32, "head_dim": 64, "rope_head_dim": 16, "norm_eps": 1e-6, "o_groups": 2,
                "o_lora_rank": 32, "window_size": 8, "compress_ratios": [0, 4, 128, 0], "compress_rope_theta": 160000,
                "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
                "index_n_heads": 2, "index_head_dim": 32, "index_topk": 4, "hc_mult": 4, "hc_sinkhorn_iters": 20,
                "hc_eps": 1e-6, "max_position_embeddings": 4096}
    a, b = DSV4Config.from_dict(hf), DSV4Config.from_dict(official)
    assert b.dialect == "official"
    assert a == b


def test_transformers_layer_types_form_appends_sliding_mtp_layer():
    cfg = make_config()
    del cfg["compress_ratios"], cfg["num_hash_layers"]
    cfg["layer_types"] = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    cfg["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    cfg["mlp_layer_types"] = ["hash_moe", "moe", "moe"]
    c = DSV4Config.from_dict(cfg)
    assert c.compress_ratios == (0, 4, 128, 0) and c.n_hash_layers == 1


def test_missing_required_field_names_it(tmp_path):
    cfg = make_config()
    del cfg["q_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: q_lora_rank: expected a value, found nothing"):
        load_config(str(tmp_path))


def test_ratio_list_too_short_is_refused():
    with pytest.raises(ConfigError, match="compress_ratios: expected >= 3 entries, found 2"):
        DSV4Config.from_dict(make_config(compress_ratios=[0, 4]))


def test_without_mtp_drops_the_mtp_layers_and_their_ratios():
    c = DSV4Config.from_dict(make_config(num_nextn_predict_layers=1, compress_ratios=[0, 4, 128, 4]))
    main = c.without_mtp()
    assert main.n_mtp_layers == 0 and main.compress_ratios == (0, 4, 128)
    assert main.replace(n_mtp_layers=1, compress_ratios=c.compress_ratios) == c
