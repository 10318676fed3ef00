"""Naming rules: anchored, reasoned, unambiguous; indices captured whole; MTP placement by layer index."""
from __future__ import annotations

import re

import pytest
from vllm_deepseek_v4.devtools.artifacts import RENAMERS, make_config
from hypothesis import given
from hypothesis import strategies as st

from vllm_deepseek_v4.config import DSV4Config
from vllm_deepseek_v4.errors import AmbiguousRuleError
from vllm_deepseek_v4.naming import RULES, Resolution, Resolver, Rule
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


def resolve_one(resolver: Resolver, name: str, shape: tuple[int, ...]) -> Resolution:
    return resolver.resolve_names([name], lambda i: shape)


def canonical(resolver: Resolver, name: str, shape: tuple[int, ...] = (64, 32)) -> list[str]:
    """The canonical names ``name`` fills (one for a plain rename, several for a fused tensor)."""
    res = resolve_one(resolver, name, shape)
    assert not (res.unmapped or res.refused or res.misplaced), (name, res)
    return [c for b in res.batches for c in b.canonical or ()] + [p.canonical for _, _, ps in res.fused for p in ps]


def test_name_matching_two_rules_names_both_reasons():
    second = Rule(re.compile(r"^norm\.weight$"), "norm.weight", "a second spelling for the test", key=("", "norm.weight"))
    res = resolve_one(Resolver(CFG, RULES + (second,)), "norm.weight", (64,))
    [(i, err)] = res.refused
    assert i == 0 and isinstance(err, AmbiguousRuleError) and err.tensor == "norm.weight"
    assert re.fullmatch(r"norm\.weight: matches several naming rules: .*; \^norm\\\.weight\$ \(a second spelling "
                        r"for the test\)", str(err))


def test_rules_must_be_templates_whose_numeric_segments_are_indices():
    with pytest.raises(ValueError, match="is not its template's regex"):
        Resolver(CFG, RULES + (Rule(re.compile(r"^norm\.weight$"), "norm.weight", "no template"),))
    literal = Rule(re.compile(r"^x\.(?P<n>1|2)\.y$"), "x", "a number read as text", key=("", "x.{n:1|2}.y"))
    with pytest.raises(ValueError, match="reads a numeric segment as text"):
        Resolver(CFG, (literal,))


@given(layer=st.integers(0, 11), expert=st.integers(0, 300), conv=st.sampled_from(["upstream", "hf_saved"]))
def test_layer_and_expert_indices_are_captured_whole(layer, expert, conv):
    canon = f"layers.{layer}.ffn.experts.{expert}.w2.weight"
    name = RENAMERS[conv](canon, CFG.n_layers)
    assert canonical(Resolver(CFG), name) == [canon]


def test_names_of_one_skeleton_keep_their_own_indices():
    """A whole checkpoint at once: names that differ only in their numbers (and in w1/w2/w3) are renamed together,
    each with its own numbers, in every convention."""
    canon = [f"layers.{i}.ffn.experts.{e}.{w}.weight" for i in (0, 3, 11) for e in (0, 7, 10, 255) for w in ("w1", "w2", "w3")]
    for conv in ("upstream", "hf_saved"):
        names = [RENAMERS[conv](c, CFG.n_layers) for c in canon]
        res = Resolver(CFG).resolve_names(names, lambda i: (64, 32))
        got = {i: c for b in res.batches for i, c in zip(b.index, b.canonical)}
        assert [got[i] for i in range(len(names))] == canon, conv


@given(k=st.integers(0, 3), conv=st.sampled_from(["upstream", "vllm", "nemo"]))
def test_mtp_names_land_in_mtp_block_k(k, conv):
    cfg = DSV4Config.from_dict(make_config(num_nextn_predict_layers=4, compress_ratios=[0, 4, 128, 0, 0, 0, 0]))
    r = Resolver(cfg)
    for local in ("e_proj.weight", "attn.wq_b.weight", "ffn.experts.1.w3.weight"):
        canon = f"mtp.{k}.{local}"
        name = RENAMERS[conv](canon, cfg.n_layers)
        assert canonical(r, name, (4, 4)) == [canon], name


def test_layer_index_at_or_above_L_is_mtp_in_dsv3_style_exports():
    r = Resolver(CFG)
    assert canonical(r, "layers.12.enorm.weight", (64,)) == ["mtp.0.enorm.weight"]
    assert canonical(r, "layers.13.attn.wq_a.weight") == ["mtp.1.attn.wq_a.weight"]
    assert canonical(r, "layers.11.attn.wq_a.weight") == ["layers.11.attn.wq_a.weight"]


def test_mtp_only_name_below_L_is_misplaced():
    res = resolve_one(Resolver(CFG), "model.layers.3.e_proj.weight", (64, 64))
    [(i, rule, why)] = res.misplaced
    assert i == 0 and rule.mtp_only and why == "only valid in an MTP layer (index >= 12), found in layer 3"


def test_mtp_copies_of_head_and_embed_resolve_to_the_shared_tensors():
    r = Resolver(CFG)
    for name, canon in (("mtp.0.head.weight", "head.weight"), ("mtp.0.emb.tok_emb.weight", "embed.weight"),
                        ("mtp.0.embed.weight", "embed.weight"), ("model.layers.12.shared_head.head.weight", "head.weight"),
                        ("model.layers.12.embed_tokens.weight", "embed.weight")):
        [batch] = resolve_one(r, name, (256, 64)).batches
        assert batch.canonical == [canon] and batch.rule.shared, name


def test_mtp_norm_is_not_confused_with_compressor_norm():
    r = Resolver(CFG)
    assert canonical(r, "mtp.0.norm.weight", (64,)) == ["mtp.0.norm.weight"]
    assert canonical(r, "model.layers.12.shared_head.norm.weight", (64,)) == ["mtp.0.norm.weight"]
    assert canonical(r, "mtp.0.attn.compressor.norm.weight", (64,)) == ["mtp.0.attn.compressor.norm.weight"]


def test_vl_prefix_is_normalised():
    name = "model.language_model.layers.3.self_attn.q_a_proj.weight"
    assert canonical(Resolver(CFG), name) == ["layers.3.attn.wq_a.weight"]


def test_dsv3_fused_eh_proj_splits_columns():
    [(_, _, pieces)] = resolve_one(Resolver(CFG), "mtp.0.eh_proj.weight", (64, 128)).fused
    assert [(p.canonical, p.source, p.ops, p.shape) for p in pieces] == [
        ("mtp.0.e_proj.weight", "mtp.0.eh_proj.weight", (("narrow", 1, 0, 64),), (64, 64)),
        ("mtp.0.h_proj.weight", "mtp.0.eh_proj.weight", (("narrow", 1, 64, 64),), (64, 64))]


def test_fused_tensor_that_does_not_cut_evenly_is_refused():
    [(i, err)] = resolve_one(Resolver(CFG), "mtp.0.eh_proj.weight", (64, 127)).refused
    assert i == 0 and err.tensor == "mtp.0.eh_proj.weight"
    assert str(err) == "mtp.0.eh_proj.weight: expected dim 1 proportional to 128 (('e_proj', 'h_proj')), found [64, 127]"


@pytest.mark.parametrize("name", ["layers.0.attn.wq_c.weight", "layers.\u0663.attn.attn_sink", "layers.0.attn.attn_sink\n",
                                  "layers.#.attn.attn_sink", "norm.weight.", ""])
def test_unknown_or_malformed_name_is_unmapped(name):
    """Indices are runs of ASCII digits: a name with other characters where a number goes matches no rule."""
    assert resolve_one(Resolver(CFG), name, (1, 1)).unmapped == [0]
