"""Planning whole checkpoints, checked against expectations worked out by hand.

Counts come from the published configs (a formula per block, written out below), every tensor on disk must
be used or explained exactly once, and the same weights written in every naming convention must plan the
same parameters with the same schemes.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from vllm_deepseek_v4.checkpoint import scan_checkpoint
from vllm_deepseek_v4.config import load_config
from vllm_deepseek_v4.devtools.artifacts import NATIVE, make_checkpoint, make_config
from vllm_deepseek_v4.loader import account as account_mod
from vllm_deepseek_v4.loader import build_plan
from vllm_deepseek_v4.naming import Resolver
from vllm_deepseek_v4.naming.batch import at_least, forms


def parameter_count(layers: int, experts: int, ratios: list[int], mtp_layers: int) -> int:
    """Parameters of a DSv4 config (docs/dsv4-architecture.md §1-§10), counted block by block.

    A decoder block has 5 attention linears, the router, 3 shared-expert and 3 per routed-expert linears, and
    12 plain tensors (sink, q/kv norms, two block norms, 2x3 hyper-connection mixers, and the gate bias -- or,
    in a hash layer, tid2eid instead).
    A compressed layer adds its compressor (ape, norm, wkv, wgate); a ratio-4 layer adds the indexer (wq_b,
    weights_proj, and a compressor of its own). An MTP block adds e/h projections, 3 norms and its hc head.
    """
    block = 5 + 1 + 3 + 3 * experts + 12
    extra = {0: 0, 4: 4 + 6, 128: 4}
    top = 3 + 3                             # embed, head, norm, hc_head fn/base/scale
    main = layers * block + sum(extra[r] for r in ratios[:layers])
    mtp = mtp_layers * (block + 2 + 3 + 3)   # MTP layers are uncompressed (ratio 0) in both releases
    return top + main + mtp


def used_once(plan) -> Counter:
    """How often each on-disk tensor fills a role, an alias, or is explained; a fused tensor counts once."""
    uses: Counter = Counter()
    for pp in plan.params.values():
        uses.update({src.tensor for src in (*pp.roles.values(), *pp.aliases)})
    uses.update(e["name"] for e in plan.explained)
    return uses


def test_flash_plan_counts_follow_from_the_published_config(flash_dir):
    plan = build_plan(str(flash_dir))
    assert plan.ok and plan.problems() == [] and plan.naming == "upstream"
    assert len(plan.checkpoint) == 69_187                                     # the published inventory
    ratios = [0, 0] + [4, 128] * 20 + [4]
    assert len(plan.params) == parameter_count(43, 256, ratios, 1) == 35_020
    # fp8 / mxfp4 linears read a weight and a scale, the bf16 ones one tensor; every tensor is used once
    roles = sum(len(pp.roles) for pp in plan.params.values())
    assert roles == 69_187 and set(used_once(plan).values()) == {1} and len(used_once(plan)) == 69_187
    rep = plan.to_json()
    assert rep["mtp"]["complete"] and rep["mtp"]["shared"] == {"embed": "embed.weight", "head": "head.weight"}
    assert rep["quant"]["main"]["attn"] == rep["quant"]["mtp.0"]["attn"] == "fp8_block"
    assert rep["quant"]["main"]["experts"] == rep["quant"]["mtp.0"]["experts"] == "mxfp4"


def test_the_flash_layout_is_planned_a_column_at_a_time(flash_dir, monkeypatch):
    """The speed claim in benchmarks/plan_speed.py rests on this: no Flash tensor or module is handled alone."""
    def one_by_one(*args):
        raise AssertionError(f"module settled one by one: {args[0]}")
    monkeypatch.setattr(account_mod, "_plan_module", one_by_one)
    ck = scan_checkpoint(flash_dir)
    names = list(ck.tensors)
    assert len(forms(names)) < 200                      # one regex match per form (and per w1/w2/w3 spelling)
    res = Resolver(load_config(str(flash_dir))).resolve_names(names, lambda i: ())   # no shape is read
    assert not (res.fused or res.unmapped or res.refused or res.misplaced)
    assert sum(len(b.index) for b in res.batches) == 69_187 and len(res.batches) < 200
    assert build_plan(str(flash_dir), checkpoint=ck).ok


def test_tiny_config_counts_follow_from_its_config(tmp_path):
    cfg = make_config()                                 # 3 layers (ratios 0, 4, 128), 4 experts, 1 MTP layer
    plan = build_plan(str(make_checkpoint(tmp_path, schemes=NATIVE)))
    assert plan.ok and len(plan.params) == parameter_count(3, 4, cfg["compress_ratios"], 1) == 160
    quantized = sum(pp.scheme in ("fp8_block", "mxfp4") for pp in plan.params.values())
    assert len(plan.checkpoint) == 160 + quantized                          # + one scale per quantized linear
    assert set(used_once(plan).values()) == {1} and len(used_once(plan)) == len(plan.checkpoint)


@pytest.mark.parametrize("convention", ["hf", "hf_saved", "nemo", "vllm"])
def test_every_convention_plans_the_same_parameters_as_upstream(tmp_path, convention):
    """Same weights, other names: the same parameters (in the same order), schemes and logical shapes; every
    tensor used (fused ones by several parameters) or explained."""
    upstream = build_plan(str(make_checkpoint(tmp_path / "upstream")))
    plan = build_plan(str(make_checkpoint(tmp_path / convention, convention=convention)))
    assert plan.ok and list(plan.params) == list(upstream.params)
    for name, pp in plan.params.items():
        ref = upstream.params[name]
        assert pp.scheme == ref.scheme and {r: s.shape for r, s in pp.roles.items()} == \
            {r: s.shape for r, s in ref.roles.items()}, name
    assert set(used_once(plan)) == set(plan.checkpoint.tensors)


def test_mixed_schemes_per_layer_are_planned_per_module(tmp_path):
    """Layer 1's experts stored BF16 in an otherwise MXFP4 artifact: the weight and scale columns cover different
    modules, and each module gets the scheme of its own tensors."""
    def bf16_layer_1(t):
        for n in [n for n in t if n.startswith("layers.1.ffn.experts.") and n.endswith(".scale")]:
            del t[n]
            w = n[:-len("scale")] + "weight"
            t[w] = torch.zeros(t[w].shape[0], t[w].shape[1] * 2, dtype=torch.bfloat16)
    plan = build_plan(str(make_checkpoint(tmp_path, schemes=NATIVE, edit=bf16_layer_1)))
    assert plan.ok and plan.quant_report()["main"]["experts"] == "mixed:bf16+mxfp4"
    schemes = {n: pp.scheme for n, pp in plan.params.items() if ".ffn.experts." in n}
    assert all(s == ("bf16" if n.startswith("layers.1.") else "mxfp4") for n, s in schemes.items())


def test_one_bad_module_among_many_of_its_kind_is_reported_alone(tmp_path):
    def bad_scale(t):
        t["layers.1.ffn.experts.2.w3.scale"] = t["layers.1.ffn.experts.2.w3.scale"][:, :1].clone()
    plan = build_plan(str(make_checkpoint(tmp_path, schemes=NATIVE, edit=bad_scale)))
    assert [p.tensor for p in plan.errors] == ["layers.1.ffn.experts.2.w3.scale"]
    assert "layers.1.ffn.experts.2.w3" not in plan.params and "layers.1.ffn.experts.2.w1" in plan.params
    assert not plan.missing                                                  # reported, not also missing


@pytest.mark.parametrize("n", [0, 1, 9, 10, 43, 61, 99, 100, 128])
def test_at_least_matches_exactly_the_digit_runs_worth_n_or_more(n):
    rx = re.compile(at_least(n) + r"\Z")
    for v in range(0, 1200):
        for s in (str(v), "0" + str(v), "00" + str(v)):
            assert bool(rx.match(s)) == (v >= n), (n, s)
