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


# ---- values of the wrong JSON type or impossible size: ConfigError naming the field, never a TypeError ----
@pytest.mark.parametrize("change, field, says", [
    ({"hidden_size": "64"}, "hidden_size", "expected a JSON number, found str '64'"),
    ({"hidden_size": 64.5}, "hidden_size", "expected an integer, found 64.5"),
    ({"num_hidden_layers": True}, "num_hidden_layers", "expected a JSON number, found bool True"),
    ({"compress_ratios": "0,4"}, "compress_ratios", "expected a JSON array"),
    ({"compress_ratios": [0, None, 128, 0]}, "compress_ratios", "expected a value, found nothing"),
    ({"rope_scaling": {"factor": "16"}}, "rope_scaling.factor", "expected a JSON number"),
    ({"norm_topk_prob": "false"}, "norm_topk_prob", "expected a JSON true/false"),
    ({"quantization_config": ["fp8"]}, "quantization_config", "expected a JSON object"),
    ({"o_groups": 0}, "o_groups", "expected a positive integer, found 0"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok", "expected at most n_routed_experts=4, found 5"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers", "expected an integer >= 0, found -1"),
])
def test_bad_field_is_a_config_error_naming_it(change, field, says):
    with pytest.raises(ConfigError) as e:
        DSV4Config.from_dict({**make_config(), **change})
    assert str(e.value).startswith(f"{field}: ") and says in str(e.value), str(e.value)


def test_whole_number_floats_are_integers():
    """``64.0`` is 64 (some exporters write every number as a float); ``64.5`` is refused above."""
    assert DSV4Config.from_dict({**make_config(), "hidden_size": 64.0}) == DSV4Config.from_dict(make_config())


@pytest.mark.parametrize("text, says", [("[1, 2]", "expected a JSON object of DSv4 fields, found list"),
                                        ("null", "found NoneType"), ('{"a": ', "not valid JSON")])
def test_config_json_that_is_not_an_object_names_the_file(tmp_path, text, says):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / "config.json")) and says in str(e.value)


def test_config_json_that_is_a_directory_names_the_file(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: expected a regular file, found a directory"):
        load_config(str(tmp_path))
