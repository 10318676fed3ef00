"""TP/EP sharding: every parameter has one shard kind, and every rank's slices rebuild the full tensors exactly."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from vllm_deepseek_v4.devtools.artifacts import NATIVE, make_checkpoint, make_config
from hypothesis import given
from hypothesis import strategies as st

from vllm_deepseek_v4.errors import AmbiguousRuleError, ConfigError, TensorShapeError, UnmappedTensorError
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.loader import sharding
from vllm_deepseek_v4.loader.sharding import (COLUMN, EXPERT, HEADS, REPLICATED, ROW, SHARD_RULES, VOCAB, ShardRule,
                                              apply_ops, experts_of_rank, heads_of_rank, local_name, rank_reads,
                                              shard_rule)
from vllm_deepseek_v4.loader.stream import PositionalReader

# Every TP split divides: 8 heads in 8 output groups (one head each), 8 index heads, vocab 256, I = 64, 4 experts.
BF16_CFG = make_config(num_attention_heads=8, o_groups=8, index_n_heads=8, vocab_size=256, moe_intermediate_size=64)
# Quantized: the fp8 splits of wq_b [512 rows], wo_a [1024], wo_b [in 1024] and the shared experts [512]
# keep whole 128-blocks up to tp 4, as do the indexer's wq_b rows [8 x 128]; I = 512 keeps mxfp4/nvfp4/w4a16
# in-splits on 32-blocks up to tp 8.
QUANT_CFG = make_config(num_attention_heads=8, o_groups=8, o_lora_rank=128, index_n_heads=8, index_head_dim=128,
                        vocab_size=256, moe_intermediate_size=512)
FP4_INT4 = {"main": {"experts": "nvfp4", "shared_experts": "w4a16"},
            "mtp.0": {"experts": "w4a16", "shared_experts": "nvfp4"}}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Plans built once per module, keyed by label."""
    made = {}

    def get(label, cfg, **kw):
        if label not in made:
            made[label] = build_plan(str(make_checkpoint(tmp_path_factory.mktemp(label), cfg, **kw)))
            assert made[label].problems() == []
        return made[label]
    return get


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare 1-byte float formats (e4m3, e8m0) by their bits: torch.equal does not cover them on CPU."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype.is_floating_point else t


def assert_ranks_rebuild(plan, tp: int, *, ep: int = 1) -> Counter:
    """Read every rank's slice of every role; split roles concatenate back, whole roles are identical."""
    seen: Counter = Counter()
    with PositionalReader(plan.checkpoint) as reader:
        for name, pp in plan.params.items():
            rule = shard_rule(name)
            dim = rule.dim(ep_size=ep)
            reads = [rank_reads(pp, tp_rank=r % tp, tp_size=tp, ep_rank=r % ep, ep_size=ep, cfg=plan.cfg)
                     for r in range(max(tp, ep))]
            held = [rd for rd in reads if rd]
            assert len(held) == (1 if rule.kind == EXPERT and ep > 1 else len(reads)), name
            for role, src in pp.roles.items():
                raw = reader.read_source(plan.checkpoint.tensors[src.tensor])
                full = apply_ops(raw, src.ops)
                parts = [apply_ops(raw, src.ops + rd[role]) for rd in held]
                if dim is None or all(rd[role] == () for rd in held):
                    assert all(torch.equal(bits(p), bits(full)) for p in parts), f"{name}.{role}"
                    seen[REPLICATED if dim is None else "whole role"] += 1
                    continue
                assert {rd[role][-1][1] for rd in held} == {dim}, f"{name}.{role}"
                assert len(held) == tp and len({p.shape for p in parts}) == 1, f"{name}.{role}"
                assert torch.equal(bits(torch.cat(parts, dim)), bits(full)), f"{name}.{role}"
                seen[rule.tp_kind or rule.kind] += 1
    return seen


# ---- the table ----
def test_every_tiny_plan_parameter_matches_exactly_one_rule(plans):
    plan = plans("bf16", BF16_CFG)
    kinds = Counter(shard_rule(name).kind for name in plan.params)
    n_blocks = plan.cfg.n_layers + plan.cfg.n_mtp_layers
    assert kinds[HEADS] == n_blocks and kinds[VOCAB] == 2
    assert kinds[EXPERT] == n_blocks * plan.cfg.n_routed_experts * 3
    n_csa = sum(plan.cfg.ratio(i) == 4 for i in range(n_blocks))
    # wq_b, wo_a, shared w1/w3 (+ indexer wq_b, weights_proj on CSA layers); wo_b, shared w2
    assert kinds[COLUMN] == n_blocks * 4 + n_csa * 2 and kinds[ROW] == n_blocks * 2


def test_every_flash_parameter_gets_a_shard_kind_and_splits_at_tp8(flash_dir):
    plan = build_plan(str(flash_dir))
    assert plan.problems() == []
    kinds = Counter(shard_rule(name).kind for name in plan.params)
    # replicated: norm + hc_head (4); per block wq_a, wkv, 2 norms, 2 block norms, 6 hc, gate, bias/tid2eid (14 x 44);
    # compressor (4 x 41 layers with ratio > 0); indexer compressor (4 x 21 ratio-4 layers); MTP e/h_proj, 3 norms,
    # hc_head (8). Column: wq_b, wo_a, shared w1/w3 per block + the indexer's wq_b and weights_proj (index heads).
    assert kinds == {REPLICATED: 4 + 14 * 44 + 4 * 41 + 4 * 21 + 8, HEADS: 44, VOCAB: 2, COLUMN: 44 * 4 + 2 * 21,
                     ROW: 44 * 2, EXPERT: 44 * 256 * 3}
    for pp in plan.params.values():                     # Flash's published shapes keep whole fp8/fp4 blocks at tp 8
        assert rank_reads(pp, tp_rank=7, tp_size=8, cfg=plan.cfg).keys() == pp.roles.keys()


def test_flash_tp16_would_split_an_output_group_and_is_refused(flash_dir):
    plan = build_plan(str(flash_dir))
    with pytest.raises(TensorShapeError, match=re.escape(
            "model-00001-of-00046.safetensors: layers.0.attn.wo_a.weight: expected whole output groups "
            "(o_lora_rank=1024 each) of layers.0.attn.wo_a per rank, found 512 per rank at tp_size=16. "
            "choose tp_size among the divisors of 8")):
        rank_reads(plan.params["layers.0.attn.wo_a"], tp_rank=0, tp_size=16, cfg=plan.cfg)


def test_unknown_parameter_names_the_table_to_extend():
    with pytest.raises(UnmappedTensorError, match=re.escape(
            "layers.3.attn.wq_c: expected exactly one sharding rule, found none. add a row for 'attn.wq_c' with its "
            "reason to SHARD_RULES (loader/sharding.py)")):
        shard_rule("layers.3.attn.wq_c")


def test_two_matching_rows_are_an_error_naming_both_reasons(monkeypatch):
    dup = ShardRule(re.compile(r"^attn\.wq_b$"), REPLICATED, "a conflicting row")
    monkeypatch.setattr(sharding, "SHARD_RULES", SHARD_RULES + (dup,))
    with pytest.raises(AmbiguousRuleError, match=re.escape(
            "layers.0.attn.wq_b: expected exactly one sharding rule, found 2 rows: ^attn\\.wq_b$ (rows are head-major "
            "[H*d]: whole heads per rank, matching attn_sink's head range); ^attn\\.wq_b$ (a conflicting row)")):
        shard_rule("layers.0.attn.wq_b")


@pytest.mark.parametrize("pattern,kw,message", [
    (r"^attn\.wq_b$", dict(kind=COLUMN, reason=" "), "has no reason"),
    (r"attn\.wq_b", dict(kind=COLUMN, reason="r"), "is not anchored"),
    (r"^ffn\.experts\.\d+\.w1$", dict(kind=EXPERT, reason="r"), "need tp_kind"),
    (r"^attn\.wq_b$", dict(kind=COLUMN, reason="r", tp_kind=ROW), "need tp_kind"),
])
def test_malformed_rows_are_rejected(pattern, kw, message):
    with pytest.raises(ValueError, match=message):
        ShardRule(re.compile(pattern), **kw)


@given(st.sampled_from(["layers", "mtp"]), st.integers(0, 200),
       st.sampled_from(["attn.wq_b", "attn.attn_sink", "ffn.experts.11.w2", "ffn.gate", "hc_ffn_fn", "norm.weight"]))
def test_rule_depends_on_the_local_name_only(scope, index, local):
    name = f"{scope}.{index}.{local}"
    assert local_name(name) == local
    assert shard_rule(name) is shard_rule(f"layers.1.{local}")


# ---- rank ranges ----
def test_heads_and_experts_are_contiguous_equal_ranges():
    assert [heads_of_rank(64, r, 8) for r in range(8)] == [range(8 * r, 8 * r + 8) for r in range(8)]
    assert [experts_of_rank(256, r, 4) for r in range(4)] == [range(64 * r, 64 * r + 64) for r in range(4)]


def test_uneven_expert_split_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("n_routed_experts: expected a multiple of ep_size=3, found 256. "
                                                    "choose ep_size among the divisors of 256")):
        experts_of_rank(256, 0, 3)


def test_rank_outside_the_group_is_refused():
    with pytest.raises(ValueError, match=re.escape("rank 4 is outside [0, 4) for tp_size=4")):
        heads_of_rank(64, 4, 4)


def test_wq_b_rows_wo_a_groups_and_attn_sink_cover_the_same_heads(plans):
    plan = plans("bf16-g4", make_config(num_attention_heads=8, o_groups=4, vocab_size=256, moe_intermediate_size=64))
    cfg, p = plan.cfg, "layers.1.attn."
    for r in range(2):
        heads = heads_of_rank(cfg.n_heads, r, 2)
        (_, _, q0, qn), = rank_reads(plan.params[p + "wq_b"], tp_rank=r, tp_size=2, cfg=cfg)["weight"]
        (_, _, o0, on), = rank_reads(plan.params[p + "wo_a"], tp_rank=r, tp_size=2, cfg=cfg)["weight"]
        (_, _, s0, sn), = rank_reads(plan.params[p + "attn_sink"], tp_rank=r, tp_size=2, cfg=cfg)["tensor"]
        assert range(s0, s0 + sn) == heads
        assert range(q0 // cfg.head_dim, (q0 + qn) // cfg.head_dim) == heads
        groups = range(o0 // cfg.o_lora_rank, (o0 + on) // cfg.o_lora_rank)
        per_group = cfg.n_heads // cfg.o_groups
        assert range(groups.start * per_group, groups.stop * per_group) == heads


# ---- every rank's data rebuilds the artifact ----
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_bf16_rank_slices_rebuild_every_parameter(plans, tp):
    seen = assert_ranks_rebuild(plans("bf16", BF16_CFG), tp)
    assert (seen[HEADS] > 0 and seen[VOCAB] == 2 and seen[COLUMN] > 0 and seen[ROW] > 0) == (tp > 1)


@pytest.mark.parametrize("convention", ["vllm", "nemo"])
def test_fused_and_transposed_sources_slice_after_their_own_ops(plans, convention):
    assert_ranks_rebuild(plans(f"bf16-{convention}", BF16_CFG, convention=convention), 4)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_native_fp8_and_mxfp4_rank_slices_rebuild_every_parameter(plans, tp):
    seen = assert_ranks_rebuild(plans("native", QUANT_CFG, schemes=NATIVE), tp)
    assert (seen[COLUMN] > 0 and seen[ROW] > 0) == (tp > 1)


def test_fp8_split_inside_a_128_row_block_is_refused(plans):
    plan = plans("native", QUANT_CFG, schemes=NATIVE)
    src = plan.params["layers.0.attn.wq_b"].roles["scale"]
    with pytest.raises(TensorShapeError, match=re.escape(
            f"{src.file}: layers.0.attn.wq_b.scale: expected column slices of layers.0.attn.wq_b dim 0 (out features) "
            "aligned to the 128-element blocks of its fp8_block scale, found 64 per rank at tp_size=8 "
            "(rank 3: [192, 256) of 512). choose a tp_size for which 512 / tp_size is a multiple of 128")):
        rank_reads(plan.params["layers.0.attn.wq_b"], tp_rank=3, tp_size=8, cfg=plan.cfg)


@pytest.mark.parametrize("flavor", ["", "modelopt"])
@pytest.mark.parametrize("tp", [2, 8])
def test_nvfp4_and_w4a16_companions_rebuild_and_globals_stay_whole(plans, tp, flavor):
    seen = assert_ranks_rebuild(plans(f"fp4-int4{flavor}", QUANT_CFG, schemes=FP4_INT4, flavor=flavor), tp)
    assert seen["whole role"] > 0                       # nvfp4 global scales, w4a16 weight_shape


def test_uneven_tp_split_names_the_tensor(plans):
    plan = plans("bf16", BF16_CFG)
    with pytest.raises(TensorShapeError, match=re.escape(
            "layers.0.attn.wq_b.weight: expected column split of layers.0.attn.wq_b dim 0 (512) into tp_size=3 equal "
            "parts, found 512 % 3 = 2. choose tp_size among the divisors of 512")):
        rank_reads(plan.params["layers.0.attn.wq_b"], tp_rank=0, tp_size=3)


# ---- expert parallelism ----
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_ep_ranks_hold_every_expert_exactly_once(plans, ep):
    plan = plans("bf16", BF16_CFG)
    holders: Counter = Counter()
    for name, pp in plan.params.items():
        if shard_rule(name).kind != EXPERT:
            continue
        for r in range(ep):
            reads = rank_reads(pp, tp_rank=r, tp_size=ep, ep_rank=r, ep_size=ep, cfg=plan.cfg)
            if reads:
                assert reads == {role: () for role in pp.roles}       # whole experts, never TP-split under EP
                holders[name] += 1
                assert int(name.split(".")[4]) in experts_of_rank(plan.cfg.n_routed_experts, r, ep)
    assert set(holders.values()) == {1} and len(holders) == len([n for n in plan.params if ".experts." in n])


def test_ep_with_tp_rebuilds_non_expert_parameters(plans):
    assert_ranks_rebuild(plans("native", QUANT_CFG, schemes=NATIVE), 2, ep=2)


def test_ep_needs_the_config_for_the_expert_count(plans):
    plan = plans("bf16", BF16_CFG)
    with pytest.raises(ValueError, match=re.escape("layers.0.ffn.experts.0.w1: rank_reads needs cfg")):
        rank_reads(plan.params["layers.0.ffn.experts.0.w1"], tp_rank=0, tp_size=1, ep_rank=0, ep_size=2)


# ---- the splits compute the same function ----
def rank_tensor(plan, reader, name, role, tp_rank, tp):
    pp = plan.params[name]
    src = pp.roles[role]
    raw = reader.read_source(plan.checkpoint.tensors[src.tensor])
    return apply_ops(raw, src.ops + rank_reads(pp, tp_rank=tp_rank, tp_size=tp, cfg=plan.cfg)[role]).double()


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_grouped_output_projection_sums_to_the_full_one(plans, tp):
    """wo_a COLUMN by whole groups (input unsplit per group) + wo_b ROW: the all-reduce of the ranks is exact."""
    plan = plans("bf16-g4", make_config(num_attention_heads=8, o_groups=4, vocab_size=256, moe_intermediate_size=64))
    c, p = plan.cfg, "layers.2.attn."
    o = torch.randn(c.n_heads * c.head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def project(wo_a, wo_b, o_part):  # docs/dsv4-architecture.md §5.2: z_g = W_g o_g, out = wo_b concat(z)
        g = wo_a.shape[0] // c.o_lora_rank
        z = torch.einsum("gri,gi->gr", wo_a.view(g, c.o_lora_rank, -1), o_part.view(g, -1))
        return wo_b @ z.reshape(-1)
    with PositionalReader(plan.checkpoint) as reader:
        full = project(rank_tensor(plan, reader, p + "wo_a", "weight", 0, 1),
                       rank_tensor(plan, reader, p + "wo_b", "weight", 0, 1), o)
        parts = []
        for r in range(tp):
            heads = heads_of_rank(c.n_heads, r, tp)
            parts.append(project(rank_tensor(plan, reader, p + "wo_a", "weight", r, tp),
                                 rank_tensor(plan, reader, p + "wo_b", "weight", r, tp),
                                 o[heads.start * c.head_dim:heads.stop * c.head_dim]))
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-10)    # float64: only summation order differs


@pytest.mark.parametrize("module", ["ffn.shared_experts", "ffn.experts.3"])
def test_sharded_swiglu_experts_sum_to_the_full_one(plans, module):
    """w1/w3 COLUMN + w2 ROW over the intermediate dim (TP without EP): the all-reduce of the ranks is exact."""
    plan = plans("bf16", BF16_CFG)
    x = torch.randn(plan.cfg.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = f"layers.1.{module}."

    def expert(reader, r, tp):
        w1, w3, w2 = (rank_tensor(plan, reader, p + w, "weight", r, tp) for w in ("w1", "w3", "w2"))
        return w2 @ (torch.nn.functional.silu(w1 @ x) * (w3 @ x))
    with PositionalReader(plan.checkpoint) as reader:
        full = expert(reader, 0, 1)
        parts = [expert(reader, r, 4) for r in range(4)]
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-10)
