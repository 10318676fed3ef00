"""Naming rules: anchored, reasoned, unambiguous; indices captured whole; MTP placement by layer index."""
from __future__ import annotations

import re

import pytest
from vllm_deepseek_v4.devtools.artifacts import RENAMERS, make_config
from hypothesis import given
from hypothesis import strategies as st

from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.errors import AmbiguousRuleError
from vllm_deepseek_v4.naming import RULES, Resolver, Rule
from vllm_deepseek_v4.naming.rules import upstream
from vllm_deepseek_v4.naming.tables import compile_rules

CFG = DSV4Config.from_dict(make_config(num_hidden_layers=12, compress_ratios=[0] * 13, num_hash_layers=0))


def test_every_table_entry_is_a_checked_rule_and_the_other_construction_checks_hold():
    # Anchoring and reasons are enforced by Rule.__post_init__ (next test), so the tables hold them iff every
    # entry went through Rule; the remaining construction checks must refuse as well.
    from vllm_deepseek_v4.naming.rule import Unfuse

    assert RULES and all(type(r) is Rule for r in RULES)
    with pytest.raises(ValueError, match=r"unknown conventions \['bogus'\]"):
        Rule(re.compile("^x$"), "x", "why", conventions=("bogus",))
    with pytest.raises(ValueError, match=r"an unfuse with parts needs \{part\} in its target"):
        Rule(re.compile("^x$"), "x", "why", unfuse=Unfuse(parts=("a", "b")))


def test_rule_without_reason_or_anchor_is_rejected():
    with pytest.raises(ValueError, match="no reason"):
        Rule(re.compile("^x$"), "x", " ")
    with pytest.raises(ValueError, match="not anchored"):
        Rule(re.compile("x"), "x", "why")


def test_tables_disagreeing_on_one_pattern_are_refused():
    class Bad:
        CONVENTION = "hf"
        TOP = (("embed.weight", "head.weight", "wrong target"),)
        SCOPES, BLOCK, MTP = (), (), ()
    with pytest.raises(ValueError, match="naming tables disagree on"):
        compile_rules([upstream, Bad])


def test_name_matching_two_rules_names_both_reasons():
    rules = RULES + (Rule(re.compile(r"^norm\.weight$"), "norm.weight", "a second spelling for the test"),)
    with pytest.raises(AmbiguousRuleError, match="norm.weight.*matches several naming rules.*a second spelling"):
        Resolver(CFG, rules).resolve("norm.weight", (64,))


@given(layer=st.integers(0, 11), expert=st.integers(0, 300), conv=st.sampled_from(["upstream", "hf_saved"]))
def test_layer_and_expert_indices_are_captured_whole(layer, expert, conv):
    canon = f"layers.{layer}.ffn.experts.{expert}.w2.weight"
    name = RENAMERS[conv](canon, CFG.n_layers)
    res = Resolver(CFG).resolve(name, (64, 32))
    assert [p.canonical for p in res.pieces] == [canon]


@given(k=st.integers(0, 3), conv=st.sampled_from(["upstream", "vllm", "nemo"]))
def test_mtp_names_land_in_mtp_block_k(k, conv):
    cfg = DSV4Config.from_dict(make_config(num_nextn_predict_layers=4, compress_ratios=[0, 4, 128, 0, 0, 0, 0]))
    r = Resolver(cfg)
    for local in ("e_proj.weight", "attn.wq_b.weight", "ffn.experts.1.w3.weight"):
        canon = f"mtp.{k}.{local}"
        name = RENAMERS[conv](canon, cfg.n_layers)
        assert [p.canonical for p in r.resolve(name, (4, 4)).pieces] == [canon], name


def test_layer_index_at_or_above_L_is_mtp_in_dsv3_style_exports():
    r = Resolver(CFG)
    assert r.resolve("layers.12.enorm.weight", (64,)).pieces[0].canonical == "mtp.0.enorm.weight"
    assert r.resolve("layers.13.attn.wq_a.weight", (32, 64)).pieces[0].canonical == "mtp.1.attn.wq_a.weight"
    assert r.resolve("layers.11.attn.wq_a.weight", (32, 64)).pieces[0].canonical == "layers.11.attn.wq_a.weight"


def test_mtp_copies_of_head_and_embed_resolve_to_the_shared_tensors():
    r = Resolver(CFG)
    for name, canon in (("mtp.0.head.weight", "head.weight"), ("mtp.0.emb.tok_emb.weight", "embed.weight"),
                        ("mtp.0.embed.weight", "embed.weight"), ("model.layers.12.shared_head.head.weight", "head.weight"),
                        ("model.layers.12.embed_tokens.weight", "embed.weight")):
        res = r.resolve(name, (256, 64))
        assert [p.canonical for p in res.pieces] == [canon] and res.rule.shared, name


def test_mtp_norm_is_not_confused_with_compressor_norm():
    r = Resolver(CFG)
    assert r.resolve("mtp.0.norm.weight", (64,)).pieces[0].canonical == "mtp.0.norm.weight"
    assert r.resolve("model.layers.12.shared_head.norm.weight", (64,)).pieces[0].canonical == "mtp.0.norm.weight"
    got = r.resolve("mtp.0.attn.compressor.norm.weight", (64,)).pieces[0].canonical
    assert got == "mtp.0.attn.compressor.norm.weight"


def test_vl_prefix_is_normalised():
    assert Resolver(CFG).resolve("model.language_model.layers.3.self_attn.q_a_proj.weight", (32, 64)).pieces[0].canonical \
        == "layers.3.attn.wq_a.weight"


def test_dsv3_fused_eh_proj_splits_columns():
    pieces = Resolver(CFG).resolve("mtp.0.eh_proj.weight", (64, 128)).pieces
    assert [(p.canonical, p.ops, p.shape) for p in pieces] == [
        ("mtp.0.e_proj.weight", (("narrow", 1, 0, 64),), (64, 64)),
        ("mtp.0.h_proj.weight", (("narrow", 1, 64, 64),), (64, 64))]


def test_unknown_name_is_unmapped_with_reason():
    res = Resolver(CFG).resolve("layers.0.attn.wq_c.weight", (1, 1))
    assert res.rule is None and res.problem == "matches no naming rule"
